"""Cores a process may use: affinity mask capped by the cgroup v2 or v1 CPU quota."""
from __future__ import annotations

import os

import pytest

from flannel import cpus


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(cpus, "affinity_cores", lambda: 4)


def test_no_cgroup_files_means_no_quota(tmp_path, four_cores):
    assert cpus.quota_cores(tmp_path) is None
    assert cpus.usable_cores(tmp_path) == 4


@pytest.mark.parametrize("cpu_max, expected", [("max 100000", 4), ("150000 100000", 2),
                                               ("50000 100000", 1), ("800000 100000", 4)])
def test_cgroup_v2_quota_caps_the_affinity(tmp_path, four_cores, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert cpus.usable_cores(tmp_path) == expected


def test_cgroup_v1_quota(tmp_path, four_cores):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.quota_cores(tmp_path) == 2.0 and cpus.usable_cores(tmp_path) == 2
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert cpus.usable_cores(tmp_path) == 4


def test_threads_per_worker_never_below_one(tmp_path, four_cores):
    assert [cpus.threads_per_worker(w, tmp_path) for w in (1, 2, 3, 4, 16)] == [4, 2, 1, 1, 1]


def test_affinity_of_this_process_is_what_the_os_reports():
    if hasattr(os, "sched_getaffinity"):
        assert cpus.affinity_cores() == len(os.sched_getaffinity(0))
    assert 1 <= cpus.usable_cores() <= (os.cpu_count() or 1)
