"""Issue 15's acceptance for sweeps: 2 models x 3 targets x 3 schemes on a local Ray instance with 2 workers;
one worker is killed (SIGKILL) mid-task. The sweep finishes with that task retried (or reported failed, never
lost) and every other result present; Ray is shut down after it (no worker left running).

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
    """Kills the worker of the first task seen running for `after_s` seconds: its pid is in attempts.jsonl
    (written when a task starts) and its task.json (written when it ends) is not there yet."""

    def __init__(self, out: Path, after_s: float = 1.0):
        super().__init__(daemon=True)
        self.out, self.after_s, self.killed = out, after_s, None
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            for attempts in self.out.glob(f"*/*/*/*/{ATTEMPTS}"):
                folder = attempts.parent
                try:
                    lines = [json.loads(line) for line in attempts.read_text().splitlines()]
                except ValueError:  # a line being written: read it on the next round
                    continue
                if len(lines) != 1 or (folder / SIDECAR).exists() or time.time() - lines[0]["started"] < self.after_s:
                    continue
                pid = lines[0]["pid"]
                os.kill(pid, signal.SIGKILL)
                self.killed = (folder.relative_to(self.out).as_posix(), pid)
                return


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
def test_sweep_on_local_ray_survives_a_killed_worker(tmp_path):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    out = tmp_path / "out"
    killer = WorkerKiller(out)
    killer.start()
    try:
        result = CliRunner().invoke(main, ["sweep", "-c", str(tmp_path / "sweep.toml"), "--workers", "2", "--retries", "1"])
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no task was seen running: the sweep ended before a worker could be killed"
    killed_task, killed_pid = killer.killed
    report = json.loads((out / "sweep.json").read_text())
    assert report["runner"] == "local Ray, 2 workers"
    tasks = {f"{t['model']}/{t['recipe']}/{t['target']}/{t['scheme']}": t for t in report["tasks"]}
    expected = {f"{m}/default/{t}/{s}" for m in MODELS for t in TARGETS for s in SCHEMES}
    assert set(tasks) == expected  # every task reported, the killed one included
    killed = tasks[killed_task]
    retried = killed["status"] == "passed" and killed["attempts"] == 2
    reported = killed["status"] == "failed" and "lost" in killed["error"]
    assert retried or reported, killed
    for name, task in tasks.items():
        if name == killed_task and reported:
            continue
        assert task["status"] == "passed", (name, task)
        assert (Path(task["bundle"]) / "manifest.json").is_file()
    assert result.exit_code == (0 if retried else 1), result.output
    # A new worker ran the retry; after the sweep Ray is gone: every worker that ran a task has ended.
    pids = {json.loads(line)["pid"] for path in out.glob(f"*/*/*/*/{ATTEMPTS}") for line in path.read_text().splitlines()}
    assert killed_pid in pids and len(pids) >= 3 if retried else len(pids) >= 2
    deadline = time.monotonic() + 15
    while (any(_alive(pid) for pid in pids) or _ray_children()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if _alive(pid)] and not _ray_children()

    # The same sweep again: every bundle is in place with the same inputs, so nothing runs (not even Ray).
    again = CliRunner().invoke(main, ["sweep", "-c", str(tmp_path / "sweep.toml"), "--workers", "2"])
    assert again.exit_code == (0 if retried else 1), again.output
    rerun = json.loads((out / "sweep.json").read_text())
    assert rerun["reused"] == (18 if retried else 17) and rerun["runner"] in ("nothing: every task reused", "local Ray, 2 workers")
