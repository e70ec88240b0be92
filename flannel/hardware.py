"""What the machine can do, read at run time, and the training precision that follows from it.

    python -m flannel.hardware          # prints the CPU, its features and the precision `auto` picks

These machines differ: Intel Xeons with AMX (bf16 and int8 fast), AMD EPYCs with AVX-512-BF16,
and AMD EPYCs with AVX2 only, where bf16 autocast falls back to slow reference kernels and trains
13-18x slower than fp32. Defaults are therefore chosen from the CPU's own feature flags, never
assumed, and every speed figure is printed beside ``cpu_model()``.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

# CPU flags (as /proc/cpuinfo spells them) that give PyTorch's oneDNN kernels native bf16 math.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """Model name and feature flags of the first CPU ('' and empty on non-Linux hosts)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return platform.processor(), frozenset()
    model, flags = "", frozenset()
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model, flags


def cpu_model() -> str:
    """The CPU's model name, e.g. 'Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz'."""
    return _cpuinfo()[0] or platform.machine()


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


# Compiler flags whose /proc/cpuinfo name is not the flag without "-m" and with "_" for "-".
_CPUINFO_NAMES = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
                  "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni"}


def compiled_isa() -> tuple[str, list[str]]:
    """The vector instruction set TorchInductor compiles CPU kernels for on this host, and the
    CPU flags (as /proc/cpuinfo spells them) its code needs: what a package compiled here
    requires of the host that loads it (an AVX-512 package dies of an illegal instruction on an
    AVX2-only CPU).

    Returns:
        (ISA name such as "avx512" or "avx2", sorted flags); ("", []) where Inductor vectorises
        nothing.
    """
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    if not isa:
        return "", []
    names = {_CPUINFO_NAMES.get(f, f).replace("-", "_")
             for f in (flag.removeprefix("-m") for flag in str(isa._arch_flags).split())
             if f and not f.startswith("-")}
    return str(isa), sorted(names)


def missing_cpu_flags(required, flags: frozenset[str] | None = None) -> list[str]:
    """The flags of ``required`` this CPU (or ``flags``) lacks."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in required if f not in flags]


def native_bf16_flags(flags: frozenset[str] | None = None) -> list[str]:
    """The flags among ``NATIVE_BF16_FLAGS`` this CPU has (empty: bf16 would be emulated)."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in NATIVE_BF16_FLAGS if f in flags]


def bf16_problem(flags: frozenset[str] | None = None) -> str | None:
    """Why bf16 inference should not run on this CPU, in one line (None: it has native bf16)."""
    if native_bf16_flags(flags):
        return None
    return (f"this CPU ({cpu_model()}) has no native bf16 (neither amx_bf16 nor avx512_bf16): "
            "bf16 kernels would be emulated, 13-18x slower than fp32; use ort-fp32 or ort-int8")


def cuda_problem() -> str | None:
    """Why GPU backends cannot run here, in one line (None: an NVIDIA GPU is usable)."""
    if not torch.cuda.is_available():
        return ("no NVIDIA GPU is visible (torch.cuda.is_available() is False): GPU backends "
                "need a CUDA host with the GPU set installed (`make setup GPU=1`)")
    return None


@dataclass(frozen=True)
class PrecisionChoice:
    """How training runs: device, autocast dtype, memory layout, and why.

    Attributes:
        precision: "fp32", "bf16" or "fp16".
        device: "cpu" or "cuda".
        channels_last: NHWC memory layout for model and inputs.
        reason: one sentence for the run log.
    """

    precision: str
    device: str
    channels_last: bool
    reason: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def uses_grad_scaler(self) -> bool:
        # fp16's narrow exponent underflows small gradients; bf16 keeps fp32's range.
        return self.precision == "fp16"

    def to_dict(self) -> dict:
        return {"precision": self.precision, "device": self.device,
                "channels_last": self.channels_last, "reason": self.reason,
                "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def choose_precision(requested: str = "auto", cuda_available: bool | None = None,
                     flags: frozenset[str] | None = None) -> PrecisionChoice:
    """Resolve ``--precision`` against what this machine has.

    Args:
        requested: "auto", "fp32", "bf16" or "fp16".
        cuda_available: override for tests (default: ``torch.cuda.is_available()``).
        flags: CPU flags override for tests (default: this CPU's).

    Returns:
        The choice; ``auto`` picks fp16 on CUDA, bf16 where the CPU has native bf16, else fp32,
        always with channels_last.

    Raises:
        ValueError: fp16 without a CUDA device (CPU fp16 autocast has no fast kernels).
    """
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    native = native_bf16_flags(flags)
    device = "cuda" if cuda else "cpu"
    if requested == "auto":
        if cuda:
            return PrecisionChoice("fp16", device, True, "auto: CUDA device present, fp16 autocast "
                                   "with a gradient scaler")
        if native:
            return PrecisionChoice("bf16", device, True, f"auto: CPU has native bf16 "
                                   f"({', '.join(native)}), bf16 autocast with channels_last")
        return PrecisionChoice("fp32", device, True, "auto: CPU has no native bf16 (no amx_bf16 or "
                               "avx512_bf16; bf16 would be emulated and many times slower), fp32 "
                               "with channels_last")
    if requested == "fp16" and not cuda:
        raise ValueError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    if requested == "bf16" and not cuda and not native:
        return PrecisionChoice("bf16", device, True, "bf16 forced on a CPU without native bf16: "
                               "expect it to be much slower than fp32")
    if requested not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {requested!r}; use auto, fp32, bf16 or fp16")
    return PrecisionChoice(requested, device, True, f"{requested} requested")


def describe() -> str:
    """One paragraph about this machine for logs and benchmark headers."""
    choice = choose_precision("auto")
    return (f"CPU {cpu_model()} ({torch.get_num_threads()} threads, torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}, native bf16: "
            f"{', '.join(native_bf16_flags()) or 'none'}); CUDA: "
            f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; "
            f"--precision auto -> {choice.precision} ({choice.reason})")


if __name__ == "__main__":
    print(describe())
