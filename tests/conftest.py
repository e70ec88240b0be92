"""Shared pytest fixtures."""
from __future__ import annotations

import shutil

import pytest

from run_fixtures import add_tiny_external_evaluation, make_tiny_ensemble, make_tiny_run


@pytest.fixture(scope="session")
def tiny_run_factory(tmp_path_factory):
    """Make tiny run folders: ``factory(arch="resnet18", crop=64) -> run_dir``, each fresh."""
    def factory(arch: str = "resnet18", crop: int = 64):
        return make_tiny_run(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, crop=crop)
    return factory


@pytest.fixture
def tiny_run_dir(tmp_path):
    """A fresh resnet18 run folder (random weights, 64x64 toy images, 3 classes)."""
    return make_tiny_run(tmp_path)


@pytest.fixture(scope="session")
def exported_tiny_run(tiny_run_factory):
    """A resnet18 run folder exported once per session, with an external evaluation (archives
    need one). Read-only: copy it to modify it."""
    from flannel.export.onnx_export import export_onnx
    run_dir = tiny_run_factory("resnet18")
    export_onnx(run_dir)
    add_tiny_external_evaluation(run_dir)
    return run_dir


@pytest.fixture
def exported_run_dir(exported_tiny_run, tmp_path):
    """A private copy of ``exported_tiny_run`` that a test may modify."""
    return shutil.copytree(exported_tiny_run, tmp_path / exported_tiny_run.name)


@pytest.fixture(scope="session")
def tiny_ensemble(tmp_path_factory):
    """An ensemble folder over three random-weights learners, exported once per session.
    Read-only: copy the whole parent folder to modify it."""
    from flannel.export.onnx_export import export_onnx
    ens = make_tiny_ensemble(tmp_path_factory.mktemp("tiny-ensemble"))
    export_onnx(ens)
    return ens
