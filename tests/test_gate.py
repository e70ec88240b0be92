"""The validation-split gate's verdict under each tolerance profile (fp32, bf16, fp16, int8)."""
from __future__ import annotations

import numpy as np

from flannel.artifacts import BF16, FP16, FP32, INT8, TOLERANCES
from flannel.export.gate import judge

CLASSES = ["COVID-19", "Normal", "Pneumonia"]


def _outputs(n=100, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 3)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {"probabilities": probs.astype(np.float32)}, probs.argmax(1)


def test_profiles_are_named_and_ordered_by_looseness():
    assert set(TOLERANCES) == {"fp32", "bf16", "fp16", "int8"}
    assert FP32.atol < FP16.atol < BF16.atol and INT8.atol is None
    assert FP32.min_argmax_agreement == 1.0
    assert all(t.min_argmax_agreement == 0.99 for t in (BF16, FP16, INT8))
    assert INT8.max_macro_f1_drop == 0.01 and BF16.max_macro_f1_drop is None


def test_identical_outputs_pass_every_profile():
    ref, labels = _outputs()
    for tol in TOLERANCES.values():
        result = judge(tol, ref, ref, "probabilities", labels, CLASSES)
        assert result["passed"] and result["argmax_agreement"] == 1.0, tol.name


def test_value_drift_fails_fp32_and_bf16_but_int8_only_records_it():
    ref, labels = _outputs()
    got = {"probabilities": ref["probabilities"] * 0.85 + 0.05}  # same argmax, values moved
    assert (got["probabilities"].argmax(1) == ref["probabilities"].argmax(1)).all()
    fp32 = judge(FP32, ref, got, "probabilities", labels, CLASSES)
    assert not fp32["passed"] and "probabilities: max abs diff" in fp32["failures"][0]
    small = {"probabilities": ref["probabilities"] + 0.05}
    assert judge(BF16, ref, small, "probabilities", labels, CLASSES)["passed"]
    assert not judge(FP16, ref, small, "probabilities", labels, CLASSES)["passed"]
    int8 = judge(INT8, ref, got, "probabilities", labels, CLASSES)
    assert int8["passed"] and int8["values"]["probabilities"]["within_tolerance"] is None
    assert int8["max_abs_diff"] > 0.05


def test_decisions_and_macro_f1_drop_fail_the_gate():
    ref, labels = _outputs(n=100)
    flipped = {"probabilities": ref["probabilities"].copy()}
    flipped["probabilities"][:2] = flipped["probabilities"][:2, ::-1]  # 2 of 100 may change
    changed = (flipped["probabilities"].argmax(1) != ref["probabilities"].argmax(1)).sum()
    result = judge(INT8, ref, flipped, "probabilities", labels, CLASSES)
    assert result["argmax_agreement"] == 1 - changed / 100
    assert not result["passed"] and any("argmax agreement" in f for f in result["failures"])
    assert any("macro-F1 drop" in f for f in result["failures"])
    one = {"probabilities": ref["probabilities"].copy()}
    i = int(np.flatnonzero(ref["probabilities"].argmax(1) != ref["probabilities"].argmin(1))[0])
    one["probabilities"][i] = one["probabilities"][i, ::-1]
    assert judge(BF16, ref, one, "probabilities", labels, CLASSES)["argmax_agreement"] == 0.99
