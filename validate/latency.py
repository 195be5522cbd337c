"""Latency of an artifact in its runtime: warm-up runs, then timed runs of `runner.run` on one sample.

One method everywhere (`edgeq convert`, device bundles, benchmarks/bench_speed.py): the runtime on the profile's
stated threads, else ONE intra-op thread (figures comparable across machines and undisturbed by a second busy
core); warm (untimed runs first); and, where a quantized artifact has an FP32 artifact beside it, the two timed
in interleaved rounds, so that load from other work on the machine hits both alike and the ratio means
something even when the milliseconds do not.

numpy and the standard library only (runners are opened lazily): a device bundle times its artifact with this
same code. The figures belong to the machine that measured them (`host`); reruns never repeat them exactly.
"""

from __future__ import annotations

import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

WARMUP_RUNS = 3  # first runs pay for allocation, kernel selection and cold caches; they are not timed
MIN_RUNS = 10  # at least this many timed runs, however slow the artifact
MAX_RUNS = 200  # enough for a stable p99 on fast artifacts without spending seconds on them
TARGET_S = 1.0  # keep timing until this much time was spent per artifact (and MIN_RUNS reached)
TIMING_THREADS = 1  # intra-op threads when the profile states none (see the module docstring)
TIMED_RUNTIMES = ("onnx", "tflite")  # runtimes whose runners take a thread count


@dataclass(frozen=True)
class Latency:
    """Wall time of one `runner.run` call (input checks and casts included), in milliseconds."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    runs: int  # timed runs
    warmup: int  # untimed runs before them
    host: str = ""  # the machine that measured: latency means nothing without it
    threads: int | None = None  # intra-op threads the runtime was given (None: its own default, e.g. Core ML)
    interleaved_with: str | None = None  # the artifact timed round by round with this one (the FP32 artifact)
    # What was timed where it changes the figure: "11 of 128 positions real tokens" when the sample is padded
    # (an ONNX int8-dynamic graph that skips padded keys runs a short sentence faster than a full one).
    sample: str | None = None

    def to_json(self) -> dict:
        found = asdict(self)
        if found["sample"] is None:
            del found["sample"]
        return found

    @property
    def method(self) -> str:
        """How it was measured, for reports: "1 thread, warm, interleaved with the FP32 artifact"."""
        threads = "runtime's default threads" if self.threads is None else f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return ", ".join([threads, "warm", *([f"interleaved with {self.interleaved_with}"] if self.interleaved_with else []),
                          *([self.sample] if self.sample else [])])


def describe_sample(sample: dict[str, np.ndarray]) -> str | None:
    """'11 of 128 positions real tokens' for a padded sample (its attention_mask), else None."""
    mask = sample.get("attention_mask")
    if mask is None or not np.issubdtype(np.asarray(mask).dtype, np.number):
        return None
    mask = np.asarray(mask)
    real = int(np.count_nonzero(mask))
    return f"{real} of {mask.size} positions real tokens" if real < mask.size else None


def summarize(seconds: list[float], warmup: int, host: str = "", threads: int | None = None, interleaved_with: str | None = None) -> Latency:
    """Median, p90 and p99 (linear interpolation) of timed runs given in seconds."""
    if not seconds:
        raise ValueError("no timed runs to summarize")
    median, p90, p99 = (round(float(x), 4) for x in np.percentile(np.asarray(seconds, dtype=np.float64) * 1e3, [50, 90, 99]))
    return Latency(median, p90, p99, len(seconds), warmup, host, threads, interleaved_with)  # 0.1 us steps: finer is clock noise


def measure(
    call: Callable[[], object],
    *,
    warmup: int = WARMUP_RUNS,
    min_runs: int = MIN_RUNS,
    max_runs: int = MAX_RUNS,
    target_s: float = TARGET_S,
    clock: Callable[[], float] = time.perf_counter,
    threads: int | None = None,
) -> Latency:
    """Time `call`: `warmup` untimed calls, then timed ones until `target_s` is spent and `min_runs` are
    done, stopping at `max_runs`. Exceptions from `call` propagate (the caller knows the runtime's).
    `threads` is recorded, not applied: the runner was opened with it."""
    (latency,) = measure_interleaved([call], warmup=warmup, min_runs=min_runs, max_runs=max_runs, target_s=target_s,
                                     clock=clock, threads=threads)
    return latency


def measure_interleaved(
    calls: list[Callable[[], object]],
    *,
    labels: list[str | None] | None = None,
    warmup: int = WARMUP_RUNS,
    min_runs: int = MIN_RUNS,
    max_runs: int = MAX_RUNS,
    target_s: float = TARGET_S,
    clock: Callable[[], float] = time.perf_counter,
    threads: int | None = None,
) -> list[Latency]:
    """Time several calls round by round (each call once per round, in a new order each round so none always
    runs first or after the same call): load from other work lands on all of them alike. Rounds go on until every
    call had `min_runs` and the rounds took `target_s` per call, at most `max_runs`. `labels[i]` names what
    call i was interleaved with (recorded in its Latency); by default the other calls are unnamed."""
    if not calls:
        return []
    for call in calls:
        for _ in range(warmup):
            call()
    seconds: list[list[float]] = [[] for _ in calls]
    spent = 0.0
    order = list(range(len(calls)))
    # Two calls: the order flips every round. More: a fresh (seeded) order every round, since a fixed or merely
    # reversed order gives each call the same neighbours, and one that follows a large model starts with cold caches.
    shuffle = random.Random(0).shuffle
    while len(seconds[0]) < max_runs and (len(seconds[0]) < min_runs or spent < target_s * len(calls)):
        for index in order:
            start = clock()
            calls[index]()
            seconds[index].append(clock() - start)
            spent += seconds[index][-1]
        if len(order) <= 2:
            order.reverse()
        else:
            shuffle(order)
    host = host_description()
    labels = labels or [None] * len(calls)
    return [summarize(times, warmup, host, threads, label) for times, label in zip(seconds, labels)]


def measure_runner(runner, sample: dict[str, np.ndarray], **limits) -> Latency:
    """Latency of `runner.run(sample)`; `limits` as for `measure`."""
    return measure(lambda: runner.run(sample), **limits)


def timing_settings(runtime: str, settings: dict) -> dict:
    """The runner settings latency is measured with: the validation settings on the profile's stated threads
    (`threads` in its runtime options), else TIMING_THREADS. Runtimes without a thread setting keep theirs."""
    if runtime not in TIMED_RUNTIMES:
        return dict(settings)
    return {**settings, "threads": settings.get("threads") or TIMING_THREADS}


def time_artifacts(paths: list, runtime: str, settings: dict, sample: dict[str, np.ndarray], labels: list[str | None] | None = None,
                   **limits) -> tuple[list[Latency] | None, str | None]:
    """(latencies, None) of the artifacts at `paths`, each opened with `timing_settings` and timed interleaved
    on `sample`; (None, why) when a runner cannot be opened, runs untimed (the MIL reference executor) or fails."""
    from edgeq.validate.runners import NotExecutable, RunnerError, open_runner

    timing = timing_settings(runtime, settings)
    try:
        runners = [open_runner(path, runtime, **timing) for path in paths]
        untimed = next((runner.untimed for runner in runners if runner.untimed), None)
        if untimed:
            return None, untimed
        calls = [lambda runner=runner: runner.run(sample) for runner in runners]
        latencies = measure_interleaved(calls, labels=labels, threads=timing.get("threads"), **limits)
        return [replace(latency, sample=describe_sample(sample)) for latency in latencies], None
    except (NotExecutable, RunnerError) as exc:
        return None, f"timing failed: {exc}"


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
