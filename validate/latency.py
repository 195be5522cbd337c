"""Latency of one artifact in its runtime: warm-up runs, then timed runs of `runner.run` on one sample.

numpy and the standard library only: a device bundle times its artifact with this same code.
The figures belong to the machine that measured them (`host`), and reruns never repeat them exactly.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

WARMUP_RUNS = 3  # first runs pay for allocation, kernel selection and cold caches; they are not timed
MIN_RUNS = 10  # at least this many timed runs, however slow the artifact
MAX_RUNS = 200  # enough for a stable p99 on fast artifacts without spending seconds on them
TARGET_S = 1.0  # keep timing until this much time was spent (and MIN_RUNS reached)


@dataclass(frozen=True)
class Latency:
    """Wall time of one `runner.run` call (input checks and casts included), in milliseconds."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    runs: int  # timed runs
    warmup: int  # untimed runs before them
    host: str = ""  # the machine that measured: latency means nothing without it

    def to_json(self) -> dict:
        return asdict(self)


def summarize(seconds: list[float], warmup: int, host: str = "") -> Latency:
    """Median, p90 and p99 (linear interpolation) of timed runs given in seconds."""
    if not seconds:
        raise ValueError("no timed runs to summarize")
    median, p90, p99 = (round(float(x), 4) for x in np.percentile(np.asarray(seconds, dtype=np.float64) * 1e3, [50, 90, 99]))
    return Latency(median, p90, p99, len(seconds), warmup, host)  # 0.1 us steps: finer is clock noise


def measure(
    call: Callable[[], object],
    *,
    warmup: int = WARMUP_RUNS,
    min_runs: int = MIN_RUNS,
    max_runs: int = MAX_RUNS,
    target_s: float = TARGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> Latency:
    """Time `call`: `warmup` untimed calls, then timed ones until `target_s` is spent and `min_runs` are
    done, stopping at `max_runs`. Exceptions from `call` propagate (the caller knows the runtime's)."""
    for _ in range(warmup):
        call()
    seconds: list[float] = []
    spent = 0.0
    while len(seconds) < max_runs and (len(seconds) < min_runs or spent < target_s):
        start = clock()
        call()
        seconds.append(clock() - start)
        spent += seconds[-1]
    return summarize(seconds, warmup, host_description())


def measure_runner(runner, sample: dict[str, np.ndarray], **limits) -> Latency:
    """Latency of `runner.run(sample)`; `limits` as for `measure`."""
    return measure(lambda: runner.run(sample), **limits)


def host_description() -> str:
    """CPU model, architecture and core count, e.g. 'AMD EPYC 7B13, x86_64, 2 CPUs'."""
    name = ""
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    name = name or platform.processor()
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return ", ".join(part for part in (name, platform.machine(), f"{count} CPUs") if part)


def speed_summary(ratio: float | None) -> str:
    """How a quantized artifact's median compares with its FP32 artifact's; `ratio` is quantized / FP32.

    Within 10% reads as the same speed: timings of one process on a shared machine jitter that much.
    """
    if ratio is None or ratio <= 0:
        return "-"
    speedup = 1.0 / ratio
    if speedup >= 1.1:
        return f"{speedup:.1f}x faster than FP32"
    if speedup <= 1 / 1.1:
        return f"{speedup:.1f}x: slower than FP32 on this machine"
    return f"{speedup:.1f}x: no faster than FP32 on this machine"
