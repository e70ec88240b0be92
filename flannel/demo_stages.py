"""The demo's bookkeeping: time per stage, reuse of a stage whose inputs are unchanged, and
training sized by this CPU's measured speed.

    python -c "from flannel.demo_stages import Stages; help(Stages)"

A stage is reused when its stamp (``WORKDIR/.stages/NAME.json``) holds the same fingerprint of
its inputs (configs, and the sha256 of the files it reads) and every output it names exists.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator


def fingerprint(config, files: Iterable[str | Path] = ()) -> str:
    """sha256 over a JSON-able ``config`` and the bytes of ``files`` (in order)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(str(path).encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class Stages:
    """Seconds per stage, and stamps that let an unchanged stage be reused."""

    workdir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)

    def _stamp(self, name: str) -> Path:
        return self.workdir / ".stages" / f"{name}.json"

    def unchanged(self, name: str, key: str, outputs: Iterable[str | Path] = (),
                  print_=print) -> bool:
        """Whether stage ``name`` last ran with the fingerprint ``key`` and left ``outputs``;
        prints one line when it is reused."""
        stamp = self._stamp(name)
        if not stamp.is_file():
            return False
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return False
        if recorded.get("key") != key or not all(Path(p).exists() for p in outputs):
            return False
        self.reused.append(name)
        print_(f"{name}: reused what the previous run built (its inputs are unchanged)")
        return True

    def done(self, name: str, key: str, **extra) -> None:
        stamp = self._stamp(name)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"key": key, **extra}, indent=2) + "\n")

    def recorded(self, name: str) -> dict:
        stamp = self._stamp(name)
        return json.loads(stamp.read_text()) if stamp.is_file() else {}

    def forget(self, name: str) -> None:
        self._stamp(name).unlink(missing_ok=True)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def table(self, cpu: str) -> str:
        total = sum(self.seconds.values())
        lines = [f"time per stage on {cpu}:", "| stage | s | |", "| --- | ---: | --- |"]
        lines += [f"| {n} | {s:.1f} | {'reused' if n in self.reused else ''} |"
                  for n, s in self.seconds.items()]
        return "\n".join(lines + [f"| total | {total:.1f} | |"])


def training_speed(archs: list[str], input_size: int, batch_size: int, steps: int = 2) -> dict:
    """Training images per second of each architecture on this CPU, timed on full training
    steps at the demo's input size and precision (one warm-up step first)."""
    from flannel.benchmarks.train_throughput import _time_steps
    from flannel.hardware import choose_precision

    precision = choose_precision("auto").precision
    speed = {}
    for arch in archs:
        seconds = _time_steps(arch, input_size, batch_size, precision, True, steps, warmup=1)
        speed[arch] = batch_size / seconds
    return speed


def epochs_for_budget(speed: dict[str, float], train_images: int, forward_images: int,
                      budget_s: float, most: int, least: int = 2) -> int:
    """Epochs (the same for every learner) that fit ``budget_s`` of training at ``speed``; an
    image passed forward only (validation, BatchNorm statistics) counts as a third of a
    training step's."""
    per_epoch = sum((train_images + forward_images / 3) / ips for ips in speed.values())
    return max(least, min(most, int(budget_s // max(per_epoch, 1e-9))))
