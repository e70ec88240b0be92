"""Resident memory of processes, sampled on a thread while a block of work runs.

    with RssSampler() as rss:               # this process, every 2 ms
        work()
    print(rss.peak(), rss.first())          # MB

Used for the model benchmark's peak RSS per cell and for a served model's workers in the soak
and worst-case runs (``pids``: TorchServe's worker processes).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Sequence


def rss_mb(pids: Sequence[int]) -> dict[int, float]:
    """Resident set size of each process in MB (NaN for one that has gone)."""
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            out[pid] = float("nan")
    return out


class RssSampler:
    """Samples the RSS of ``pids`` (default: this process) every ``interval`` seconds, from
    entering the block (one sample at once) to leaving it (one more).

    Attributes:
        samples: (seconds since entering, {pid: MB}) in time order.
    """

    def __init__(self, pids: Sequence[int] | None = None, interval: float = 0.002) -> None:
        self.pids = list(pids) if pids else [os.getpid()]
        self.interval = interval
        self.samples: list[tuple[float, dict[int, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = 0.0

    def _sample(self) -> None:
        self.samples.append((time.perf_counter() - self._start, rss_mb(self.pids)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "RssSampler":
        self._start = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _pid(self, pid: int | None) -> int:
        return self.pids[0] if pid is None else pid

    def first(self, pid: int | None = None) -> float:
        """MB when the block was entered."""
        return self.samples[0][1][self._pid(pid)]

    def peak(self, pid: int | None = None) -> float:
        """The largest MB sampled."""
        return max(rss[self._pid(pid)] for _, rss in self.samples)
