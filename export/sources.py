"""What export and parity read from a run folder: a learner run or an ensemble folder.

    python -c "from flannel.export.sources import load_source; print(load_source('runs/x').describe())"

A learner run holds ``best.pt`` (``flannel train``); an ensemble folder holds ``fusion.pt``
(``flannel ensemble train``), which names its members' checkpoints by path and sha256. Either way
export gets the module to trace (``LearnerGraph`` or ``FusedEnsemble``, both on the common input),
the served input spec, the class names, the members for the manifest, and the split manifest whose
validation images the parity gate runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from flannel.artifacts import ENSEMBLE, LEARNER, GraphSpec, sha256_file
from flannel.checkpoint import load_checkpoint, state_with_metadata
from flannel.data.records import resolve_path
from flannel.graphs import FUSION_CHECKPOINT, learner_graph, load_ensemble
from flannel.preprocess import PreprocessSpec, input_spec_for


@dataclass
class ServedSource:
    """One exportable model.

    Attributes:
        run_dir: the folder export writes ``export/`` into.
        graph: the kind's names.
        module: the eager fp32 module the graph is traced from and checked against.
        input_spec: host preprocessing of the common input.
        class_names: output order.
        model_name: default served name.
        members: per learner: unique name, arch, checkpoint path and sha256, preprocessing spec.
        checkpoint: the file the module was loaded from (``best.pt`` or ``fusion.pt``).
        split_manifest: the split manifest of the parity images.
    """

    run_dir: Path
    graph: GraphSpec
    module: nn.Module
    input_spec: PreprocessSpec
    class_names: list[str]
    model_name: str
    members: list[dict]
    checkpoint: Path
    split_manifest: Path | None

    def describe(self) -> str:
        archs = ", ".join(m["arch"] for m in self.members)
        return (f"{self.graph.kind} {self.model_name} ({archs}; input 1x{self.input_spec.resize}"
                f"x{self.input_spec.resize}; classes {self.class_names})")


def _split_manifest(config: dict, run_dir: Path) -> Path | None:
    return resolve_path(config["manifest"], run_dir) if config.get("manifest") else None


def _member(name: str, arch: str, checkpoint: Path, spec: PreprocessSpec,
            digest: str | None = None) -> dict:
    return {"name": name, "arch": arch, "checkpoint": str(checkpoint),
            "checkpoint_sha256": digest or sha256_file(checkpoint), "preprocess": spec.to_dict()}


def learner_source(run_dir: Path, checkpoint: str = "best.pt") -> ServedSource:
    path = run_dir / checkpoint
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = load_checkpoint(path)
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else ckpt.config
    return ServedSource(run_dir, LEARNER, learner_graph(ckpt), input_spec_for([ckpt.preprocess]),
                        list(ckpt.class_names), ckpt.arch,
                        [_member(ckpt.arch, ckpt.arch, path, ckpt.preprocess)], path,
                        _split_manifest(config, run_dir))


def ensemble_source(run_dir: Path) -> ServedSource:
    module, meta = load_ensemble(run_dir)
    specs = [lg.preprocess.spec for lg in module.learners]
    members = [_member(name, m["arch"], Path(m["checkpoint"]), spec, m["checkpoint_sha256"])
               for name, m, spec in zip(module.names, meta["members"], specs)]
    return ServedSource(run_dir, ENSEMBLE, module, input_spec_for(specs), list(meta["class_names"]),
                        meta.get("model_name", "ensemble"), members, run_dir / FUSION_CHECKPOINT,
                        _split_manifest(meta.get("config", {}), run_dir))


def load_source(run_dir: str | Path, checkpoint: str = "best.pt") -> ServedSource:
    """The exportable model of ``run_dir``: its ensemble when it holds ``fusion.pt``, else the
    learner checkpoint ``checkpoint``."""
    run_dir = Path(run_dir)
    if (run_dir / FUSION_CHECKPOINT).is_file():
        return ensemble_source(run_dir)
    return learner_source(run_dir, checkpoint)


def _is_fitted_at_export(key: str) -> bool:
    """State keys of what export fits (``flannel.graphs``: ``LogitScaling``, the OOD distance and
    its scale), as opposed to the networks' weights the checkpoints hold."""
    parts = key.split(".")
    return "calibration" in parts or "ood" in parts or parts[-1] == "ood_scale"


def load_fitted(source: ServedSource, export_dir: Path, manifest: dict) -> None:
    """Give ``source.module`` the calibration and OOD buffers its export fitted, read from the
    export's checked eager weights; the networks keep their checkpoints' weights.

    Raises:
        ManifestError: the eager weights are missing or differ from the manifest's sha256.
        ValueError: they lack fitted buffers the module has (an export of another model).
    """
    import io

    import torch

    from flannel.artifacts import EAGER_FP32, read_artifact

    state = torch.load(io.BytesIO(read_artifact(export_dir, manifest, EAGER_FP32)),
                       map_location="cpu", weights_only=True)
    wanted = [k for k in source.module.state_dict() if _is_fitted_at_export(k)]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"the export's eager weights lack {missing[:3]}: re-run the export")
    # With per-module versions: some modules (mnasnet) refuse a state without them.
    source.module.load_state_dict(state_with_metadata({k: state[k] for k in wanted},
                                                      source.module), strict=False)
