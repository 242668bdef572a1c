"""Wall-clock timing for every benchmark row: repeated calls of one function, or several taking turns.

On a shared CPU, load from other processes comes in bursts: a row that must be compared with another is timed
in turns with it (`take_turns`), so that a burst lands on both instead of deciding their ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def call_seconds(fn: Callable[[], object], repeats: int, warmup: int = 0) -> list[float]:
    """Seconds of each of `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return times


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `repeats` calls after `warmup` untimed ones (first calls allocate and pick kernels)."""
    return statistics.median(call_seconds(fn, repeats, warmup))


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls, none untimed: the caller warms up where first-call costs would matter."""
    return min(call_seconds(fn, repeats), default=float("inf"))


def take_turns(steps: dict[str, Callable[[int], object]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds of each step function per round, the functions taking turns round by round. With `warmup`, each
    is first called once untimed (with 0: first-call allocations are not the steady speed); the timed calls get
    the round number 1..rounds."""
    if warmup:
        for step in steps.values():
            step(0)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for k in range(1, rounds + 1):
        for name, step in steps.items():
            tick = time.perf_counter()
            step(k)
            seconds[name].append(time.perf_counter() - tick)
    return seconds
