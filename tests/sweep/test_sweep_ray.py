"""Issue 15's acceptance for sweeps: 2 models x 3 targets x 3 schemes on a local Ray instance with 2 workers;
workers are killed (SIGKILL) mid-task: one task's once (it is retried and passes), another's on both of its
attempts (it is reported failed, never lost). Every other result is present; Ray is shut down after it (no
worker left running).

The three targets are ONNX Runtime profiles (any CPU, ARM64, x86 AVX2) and the models edgeq's tiny examples:
the test is about the orchestration, and each worker then imports one toolchain, not three (2 cores here).
The runtimes themselves are tested in tests/converters; a sweep over onnx, tflite and coreml is the same code."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from edgeq.cli import main
from edgeq.sweep import load_sweep
from edgeq.sweep.run import plan
from edgeq.sweep.task import ATTEMPTS, SIDECAR
from tests.conftest import ONNX, requires

RAY = requires("ray")
TARGETS = ("onnx", "onnx-arm64", "onnx-x86-avx2")
SCHEMES = ("fp32", "int8-weight", "int8-dynamic")
MODELS = ("tiny_mlp", "tiny_convnet")
SWEEP = f"""
[sweep]
targets = {list(TARGETS)!r}
schemes = {list(SCHEMES)!r}
out = "out"

[defaults]
samples = 2
calibration_samples = 2

[[models]]
source = "edgeq.examples:tiny_mlp"

[[models]]
source = "edgeq.examples:tiny_convnet"
"""


class WorkerKiller(threading.Thread):
    """SIGKILLs the Ray worker of a running task, found by the pid its task wrote to attempts.jsonl when it
    started (a task is running while its task.json, written when it ends, is not there): the first task seen
    running for `after_s` seconds once (Ray retries it), and another one on both of its attempts (it runs out
    of retries and must be reported failed)."""

    def __init__(self, out: Path, after_s: float = 1.0):
        super().__init__(daemon=True)
        self.out, self.after_s = out, after_s
        self.once: str | None = None  # the task killed once
        self.twice: str | None = None  # the task killed on each of its two attempts
        self.pids: list[int] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.05) and len(self.pids) < 3:
            for folder, pid, attempt in self._running():
                if self.once is None:
                    self.once = folder
                elif self.twice is None and folder != self.once or folder == self.twice and attempt == 2:
                    self.twice = folder
                else:
                    continue
                os.kill(pid, signal.SIGKILL)
                self.pids.append(pid)
                break

    def _running(self):
        for attempts in sorted(self.out.glob(f"*/*/*/*/{ATTEMPTS}")):
            try:
                lines = [json.loads(line) for line in attempts.read_text().splitlines()]
            except ValueError:  # a line being written: read it on the next round
                continue
            if lines and not (attempts.parent / SIDECAR).exists() and time.time() - lines[-1]["started"] >= self.after_s:
                if lines[-1]["pid"] not in self.pids:
                    yield attempts.parent.relative_to(self.out).as_posix(), lines[-1]["pid"], len(lines)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (ended, not yet reaped) is not running
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "State:\tZ" in status.read_text())


def _ray_children() -> list[str]:
    """Ray processes (raylet, gcs_server, workers) still running below this test process."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and any(n in name for n in ("raylet", "gcs_server", "ray::")):
            found.append(f"{stat.parent.name} {name}")
    return found


@RAY
@ONNX
def test_sweep_on_local_ray_survives_killed_workers(tmp_path):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    out = tmp_path / "out"
    killer = WorkerKiller(out)
    killer.start()
    try:
        result = CliRunner().invoke(main, ["sweep", "-c", str(tmp_path / "sweep.toml"), "--workers", "2", "--retries", "1"])
    finally:
        killer.stop.set()
        killer.join()
    assert len(killer.pids) == 3, f"killed {killer.pids}: the sweep ended before three kills ({result.output})"
    report = json.loads((out / "sweep.json").read_text())
    assert report["runner"] == "local Ray, 2 workers"
    tasks = {f"{t['model']}/{t['recipe']}/{t['target']}/{t['scheme']}": t for t in report["tasks"]}
    expected = {f"{m}/default/{t}/{s}" for m in MODELS for t in TARGETS for s in SCHEMES}
    assert set(tasks) == expected  # every task reported, the killed ones included

    retried, lost = tasks[killer.once], tasks[killer.twice]
    assert retried["status"] == "passed" and retried["attempts"] == 2, retried
    assert lost["status"] == "failed" and lost["attempts"] == 2 and lost["error"].startswith("lost after 2 attempt(s)"), lost
    assert lost["exit_code"] == 1 and result.exit_code == 1, result.output
    for name, task in tasks.items():
        if name != killer.twice:
            assert task["status"] == "passed", (name, task)
            assert (Path(task["bundle"]) / "manifest.json").is_file()
    assert killer.twice in (out / "sweep.md").read_text().split("## Errors")[1]

    # Ray is gone after the sweep: every worker that ran a task has ended, and no raylet or GCS is left.
    pids = {json.loads(line)["pid"] for path in out.glob(f"*/*/*/*/{ATTEMPTS}") for line in path.read_text().splitlines()}
    assert set(killer.pids) <= pids and len(pids) >= 4  # two first workers, and new ones for the retries
    deadline = time.monotonic() + 15
    while (any(_alive(pid) for pid in pids) or _ray_children()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if _alive(pid)] and not _ray_children()

    # The same sweep again would run only the lost task: the others' bundles are there with the same inputs.
    reasons = {item.task.id: (item.reused is not None, item.reason) for item in plan(load_sweep(tmp_path / "sweep.toml"))}
    assert reasons.pop(killer.twice) == (False, "previous run left no bundle")
    assert set(reasons.values()) == {(True, "same inputs, bundle in place")}
