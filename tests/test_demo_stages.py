"""The demo's stage bookkeeping: reuse only when inputs and outputs are as recorded, and
training sized by measured speed."""
from __future__ import annotations

import pytest

from flannel.demo_stages import Stages, epochs_for_budget, fingerprint


def test_a_stage_is_reused_only_with_the_same_inputs_and_its_outputs_present(tmp_path):
    data = tmp_path / "manifest.csv"
    data.write_text("a,b\n")
    out = tmp_path / "best.pt"
    out.write_bytes(b"x")
    stages = Stages(tmp_path / "work")
    key = fingerprint({"epochs": 6}, [data])
    lines = []
    assert not stages.unchanged("learners", key, [out], print_=lines.append)
    stages.done("learners", key, epochs=4)
    assert stages.unchanged("learners", key, [out], print_=lines.append)
    assert stages.recorded("learners")["epochs"] == 4 and stages.reused == ["learners"]
    assert lines == ["learners: reused what the previous run built (its inputs are unchanged)"]
    assert not stages.unchanged("learners", key=fingerprint({"epochs": 7}, [data]), outputs=[out])
    data.write_text("a,c\n")  # the same path with other contents is another input
    assert fingerprint({"epochs": 6}, [data]) != key
    assert not stages.unchanged("learners", key=fingerprint({"epochs": 6}, [data]), outputs=[out])
    out.unlink()
    assert not stages.unchanged("learners", key=key, outputs=[out])
    stages.forget("learners")
    assert stages.recorded("learners") == {}


def test_stage_times_add_up_and_name_the_cpu(tmp_path):
    stages = Stages(tmp_path)
    with stages.timed("export"):
        pass
    with pytest.raises(ValueError):
        with stages.timed("export"):
            raise ValueError("a failing stage is still timed")
    stages.reused.append("export")
    table = stages.table("AMD EPYC 7B13")
    assert "AMD EPYC 7B13" in table and "| export |" in table and "reused" in table
    assert list(stages.seconds) == ["export"]


def test_epochs_fit_the_budget_between_the_floor_and_the_most():
    fast = {"resnet18": 100.0, "densenet121": 50.0}  # images per second
    # 250 training + 60 validation images: 2.7 s + 5.4 s = 8.1 s per epoch
    assert epochs_for_budget(fast, 250, 60, 40, most=6) == 4
    assert epochs_for_budget(fast, 250, 60, 1000, most=6) == 6
    slow = {a: ips / 10 for a, ips in fast.items()}
    assert epochs_for_budget(slow, 250, 60, 40, most=6) == 2  # never below the floor
