"""Run a sweep's tasks: skip those whose bundle exists with the same content key, then run the rest on Ray
(a local instance with `workers` CPUs, or a cluster at `address`) or, without Ray, one by one in this process.

Ray retries a task whose worker died (max_retries); a task that still cannot finish is reported failed with
Ray's error. Exceptions inside a task never reach Ray: the task returns them as its result (edgeq.sweep.task).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import UsageError
from edgeq.sweep.key import Hasher, changed, task_key
from edgeq.sweep.spec import Sweep, SweepTask
from edgeq.sweep.task import FAILED, SIDECAR, TaskResult, clear_attempts, count_attempts, failed, read_sidecar, run_task, write_sidecar

LOST_EXIT_CODE = 1  # a worker lost beyond its retries: nothing edgeq could name went wrong in the model


@dataclass
class Planned:
    task: SweepTask
    key: str
    inputs: dict
    reused: TaskResult | None  # the previous run's result, when its bundle is still there with the same key
    reason: str  # why it runs (or that it is reused), for the terminal


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def plan(sweep: Sweep, force: bool = False) -> list[Planned]:
    """Each task with its key, and whether a previous run already made its bundle from the same inputs."""
    hasher = Hasher(sweep.import_paths)
    planned = []
    for task in sweep.tasks:
        inputs = hasher.inputs(task)
        key = task_key(inputs)
        previous = read_sidecar(task.folder)
        reused, reason = None, "new"
        if previous is not None:
            result = TaskResult.from_json(previous["result"])
            bundle_there = result.bundle is not None and (Path(result.bundle) / "manifest.json").is_file()
            if force:
                reason = "--force"
            elif previous.get("key") != key:
                what = changed(previous.get("inputs") or {}, inputs)
                reason = "inputs changed: " + (", ".join(what) if what else "key")
            elif result.status == FAILED or not bundle_there:
                reason = "previous run left no bundle"
            else:
                result.reused = True
                reused, reason = result, "same inputs, bundle in place"
        planned.append(Planned(task, key, inputs, reused, reason))
    return planned


def run_serial(planned: list[Planned], import_paths: list[str], on_result: Callable[[TaskResult], None],
               on_step: Callable[[str], None] = lambda _: None) -> None:
    """The same tasks, one by one in this process (no Ray, or --no-ray); `on_step` hears convert's progress."""
    for item in planned:
        _prepare(item.task)
        step = lambda text, name=item.task.id: on_step(f"{name}: {text}")  # noqa: E731
        on_result(TaskResult.from_json(run_task(item.task, item.key, item.inputs, import_paths, step)))


def run_ray(planned: list[Planned], import_paths: list[str], on_result: Callable[[TaskResult], None], *,
            address: str | None, workers: int, retries: int) -> str:
    """The tasks as Ray remote functions; returns how Ray ran them, for the report. A local instance this
    starts is shut down at the end (workers and all), also on error or Ctrl-C; a cluster is only left."""
    import ray

    options = {"include_dashboard": False, "log_to_driver": False}
    try:
        if address is None:
            # The instance is edgeq's doing, not the user's: it reports no usage statistics unless they said so.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # "local": a fresh instance even when `ray start` or RAY_ADDRESS points elsewhere (use --address for those)
            ray.init(address="local", num_cpus=workers, logging_level=logging.ERROR, **options)
            where = f"local Ray, {workers} worker{'s' if workers != 1 else ''}"
        else:
            ray.init(address=address, logging_level=logging.WARNING, **options)
            where = f"Ray at {address}"
    except (ConnectionError, ValueError, RuntimeError) as exc:
        ray.shutdown()
        if address is None:
            raise UsageError(f"cannot start a local Ray instance: {exc}") from exc
        raise UsageError(
            f"--address {address}: cannot connect to a Ray cluster there ({exc}). A cluster started with token "
            "authentication (Ray's default) wants RAY_AUTH_MODE=token here, and its token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
        ) from exc
    try:
        remote = ray.remote(num_cpus=1, max_retries=retries)(run_task)
        pending = {}
        for item in planned:
            _prepare(item.task)
            pending[remote.remote(item.task, item.key, item.inputs, import_paths)] = item
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                item = pending.pop(ref)
                task = item.task
                try:
                    result = TaskResult.from_json(ray.get(ref))
                except ray.exceptions.RayError as exc:  # the worker died more often than max_retries allows
                    result = failed(task, f"lost after {count_attempts(task.folder)} attempt(s): {_first_lines(exc)}", LOST_EXIT_CODE)
                    result.key, result.attempts = item.key, count_attempts(task.folder)
                    write_sidecar(task.folder, item.key, item.inputs, result)  # on disk too: what became of it
                on_result(result)
    finally:
        ray.shutdown()
    return where


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """A `host:port` or `ray://host:port` address must accept a TCP connection within `timeout_s`; other forms
    ("auto", a bare host) are left to Ray."""
    match = re.fullmatch(r"(?:ray://)?(?P<host>\[[^\]]+\]|[^:/]+):(?P<port>\d+)/?", address.strip())
    if match is None:
        return
    host = match["host"].strip("[]")
    try:
        socket.create_connection((host, int(match["port"])), timeout=timeout_s).close()
    except OSError as exc:
        raise UsageError(
            f"--address {address}: nothing answers there ({exc.strerror or exc}); start the cluster (ray start --head on "
            "its head node) or give its address, e.g. ray://head:10001 (Ray Client) or head:6379 from one of its nodes"
        ) from None


def _prepare(task: SweepTask) -> None:
    """Before a task is sent: its attempts count from now, and a stale record cannot outlive a failed run."""
    clear_attempts(task.folder)
    (task.folder / SIDECAR).unlink(missing_ok=True)


def _first_lines(exc: BaseException, lines: int = 3) -> str:
    text = [line for line in str(exc).splitlines() if line.strip()]
    return " ".join(text[:lines])[:400]


def elapsed(since: float) -> float:
    return round(time.monotonic() - since, 2)


__all__ = ["Planned", "check_address", "plan", "ray_available", "run_ray", "run_serial"]
