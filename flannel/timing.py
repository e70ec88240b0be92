"""Timing a callable the same way everywhere: warm-up runs, then the median of timed runs.

    python -c "from flannel.timing import median_seconds; print(median_seconds(lambda: sum(range(10**6))))"
"""
from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], warmup: int = 1, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
