"""Precision is chosen from what the CPU has; a CPU without native bf16 never gets bf16 by default."""
import pytest
import torch

from flannel.hardware import choose_precision, cpu_model, describe, native_bf16_flags


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "fp32"),                      # AMD EPYC (Zen 3): bf16 would be emulated
    ({"avx512f", "avx512_bf16"}, "bf16"),           # AMD EPYC (Zen 4/5), Intel Cooper Lake
    ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # Intel Sapphire Rapids and later
])
def test_auto_precision_follows_the_cpu_flags(flags, expected):
    choice = choose_precision("auto", cuda_available=False, flags=frozenset(flags))
    assert choice.precision == expected and choice.device == "cpu" and choice.channels_last
    assert choice.reason.startswith("auto:")
    assert choice.autocast_dtype == (torch.bfloat16 if expected == "bf16" else None)


def test_auto_precision_on_cuda_is_fp16_with_a_grad_scaler():
    choice = choose_precision("auto", cuda_available=True, flags=frozenset())
    assert (choice.precision, choice.device, choice.uses_grad_scaler) == ("fp16", "cuda", True)


def test_forced_precisions():
    assert choose_precision("fp32", cuda_available=False).precision == "fp32"
    slow = choose_precision("bf16", cuda_available=False, flags=frozenset({"avx2"}))
    assert slow.precision == "bf16" and "slower" in slow.reason
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        choose_precision("fp16", cuda_available=False)
    with pytest.raises(ValueError, match="unknown precision"):
        choose_precision("int4", cuda_available=False)


def test_this_machine_is_described():
    assert cpu_model()
    assert set(native_bf16_flags()) <= {"amx_bf16", "avx512_bf16"}
    assert "--precision auto ->" in describe()
