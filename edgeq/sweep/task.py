"""One sweep task, run where it lands (a Ray worker or this process): `pipeline.convert` for one cell into the
task's own folder, and the result as plain JSON. A task never raises: what went wrong is its result.

The task's folder holds, beside the bundle tree `edgeq convert` writes (<model>/<target>/<scheme>/):
  attempts.jsonl  one line per start (pid, host): a worker lost mid-task and retried shows as two lines
  task.json       the content key, the inputs it hashes and the result, written last (atomically)
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeq.sweep.spec import SweepTask

ATTEMPTS = "attempts.jsonl"
SIDECAR = "task.json"
FAILED = "failed"  # status of a task that raised or whose worker was lost; the others are pipeline verdicts


@dataclass
class TaskResult:
    model: str
    recipe: str
    target: str
    scheme: str
    status: str  # a Verdict value (passed, over_budget, ...) or "failed"
    exit_code: int
    key: str = ""
    bundle: str | None = None  # the published bundle folder (absolute)
    report: str | None = None  # that run's report.html beside the bundle (absolute)
    size_bytes: int | None = None
    cosine: float | None = None  # worst output's mean cosine against FP32 PyTorch
    sqnr_db: float | None = None  # worst output's SQNR
    latency_ms: float | None = None  # median, measured where the task ran
    host: str | None = None
    attempts: int = 0
    seconds: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    reused: bool = False  # skipped: same key and bundle as a previous run

    @property
    def id(self) -> str:
        return f"{self.model}/{self.recipe}/{self.target}/{self.scheme}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TaskResult":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def run_task(task: SweepTask, key: str, inputs: dict, import_paths: list[str], on_step: Callable[[str], None] | None = None) -> dict:
    """Convert the task's cell and return its TaskResult as JSON. Ray calls this in a worker; without Ray the
    sweep calls it in-process (`on_step`: convert's progress lines). Runs anywhere the task's folder is
    reachable (a cluster needs shared storage)."""
    for path in reversed(import_paths):  # `module:callable` sources next to sweep.toml or in the driver's cwd
        if path not in sys.path:
            sys.path.insert(0, path)
    attempt = record_attempt(task.folder)
    started = time.monotonic()
    try:
        result = _convert(task, on_step or (lambda _: None))
    except Exception as exc:  # the task's failure is its result; only the worker's death is Ray's to handle
        from edgeq.errors import EdgeqError

        expected = isinstance(exc, EdgeqError)
        error = str(exc) if expected else f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exc(limit=-4))
        result = failed(task, error, exc.exit_code if expected else 1)
    result.key, result.attempts, result.host = key, attempt, socket.gethostname()
    result.seconds = round(time.monotonic() - started, 2)
    write_sidecar(task.folder, key, inputs, result)
    return result.to_json()


def _convert(task: SweepTask, on_step: Callable[[str], None]) -> TaskResult:
    from edgeq.pipeline import write_run_reports
    from edgeq.project import run_job

    outcomes = run_job(task.job, on_step)
    reports = write_run_reports(outcomes)
    outcome = outcomes[-1]  # one target and one scheme: one outcome
    report = outcome.report
    validated = report is not None and report.outputs
    result = TaskResult(
        task.model, task.recipe, task.target, task.scheme, outcome.verdict.value, outcome.verdict.exit_code,
        bundle=str(outcome.path) if outcome.path is not None else None,
        report=str(next((p for p in reports if p.suffix == ".html"), None) or "") or None,
        size_bytes=outcome.size_bytes,
        cosine=_finite(min(o.cosine for o in report.outputs)) if validated else None,
        sqnr_db=_finite(min(o.sqnr_db for o in report.outputs)) if validated else None,
        latency_ms=outcome.latency.median_ms if outcome.latency is not None else None,
        error=outcome.error,
        notes=list(outcome.violations),
    )
    if report is not None and report.status == "not_executed" and report.reason:
        result.notes.append(f"not executed: {report.reason}")
    return result


def _finite(value: float) -> float | str:
    """JSON has no infinity (an exact artifact's SQNR): "inf" as report.json writes it."""
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def failed(task: SweepTask, error: str, exit_code: int) -> TaskResult:
    return TaskResult(task.model, task.recipe, task.target, task.scheme, FAILED, exit_code, error=error)


def record_attempt(folder: Path) -> int:
    """Append this start (pid, host) to attempts.jsonl; return how many starts it holds (this one included)."""
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    with open(folder / ATTEMPTS, "a", encoding="utf-8") as stream:
        stream.write(line + "\n")
    return count_attempts(folder)


def count_attempts(folder: Path) -> int:
    path = folder / ATTEMPTS
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def clear_attempts(folder: Path) -> None:
    """Before a task is sent: attempts count from this run on."""
    (folder / ATTEMPTS).unlink(missing_ok=True)


def write_sidecar(folder: Path, key: str, inputs: dict, result: TaskResult) -> None:
    from edgeq.bundle import write_atomic

    data = result.to_json()
    for name in ("bundle", "report"):  # relative to the task's folder: the sweep's folder can move
        if data[name]:
            data[name] = os.path.relpath(data[name], folder)
    record = {"key": key, "inputs": inputs, "result": data}
    write_atomic(folder / SIDECAR, json.dumps(record, indent=2, default=str) + "\n")


def read_sidecar(folder: Path) -> dict | None:
    """The previous run's record, or None when there is none or it cannot be read (then the task runs)."""
    try:
        record = json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("result"), dict):
        return None
    for name in ("bundle", "report"):
        if isinstance(record["result"].get(name), str):
            record["result"][name] = str((folder / record["result"][name]).resolve())
    return record


__all__ = ["FAILED", "TaskResult", "clear_attempts", "count_attempts", "failed", "read_sidecar", "run_task", "write_sidecar"]
