"""`edgeq sweep -c sweep.toml`: models x targets x schemes x recipes as independent tasks, each one
`pipeline.convert` for one cell into its own bundle folder, run on Ray when it is installed (`edgeq[ray]`) and
one by one in this process otherwise; the results collect into one table and one report.

    spec.py    sweep.toml -> SweepTask per cell (the edgeq.toml key checks, up front)
    key.py     a task's content key (source, data, profile bytes, job keys, edgeq version)
    task.py    one task where it runs (a Ray worker or here): convert, record, never raise
    run.py     skip unchanged cells, then Ray (local instance or --address) or in-process
    report.py  the table: terminal, sweep.json, sweep.md, sweep.html

Sweeps orchestrate the pipeline and never reach into converters (DESIGN.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgeq import __version__
from edgeq.errors import UsageError
from edgeq.sweep.report import exit_code, print_table, write_reports
from edgeq.sweep.run import Planned, check_address, elapsed, plan, ray_available, run_ray, run_serial
from edgeq.sweep.spec import Sweep, SweepTask, load_sweep
from edgeq.sweep.task import TaskResult


@dataclass
class SweepOptions:
    address: str | None = None  # a Ray cluster; None: a local instance
    workers: int = 2  # the local instance's CPUs: tasks at once
    use_ray: bool = True  # False: --no-ray
    retries: int = 1  # times Ray reruns a task whose worker died
    force: bool = False  # run every task, whatever the previous run left
    verbose: bool = False


@dataclass
class SweepRun:
    results: list[TaskResult]
    reports: list[Path]
    runner: str
    exit_code: int


def run_sweep(sweep: Sweep, options: SweepOptions, echo: Callable[[str], None] = print) -> SweepRun:
    """Run every task of `sweep` (skipping unchanged ones), write sweep.json/.md/.html into its folder."""
    use_ray = options.use_ray and ray_available()
    if options.address is not None and not use_ray:
        raise UsageError(
            f"--address {options.address}: needs Ray, which is not installed (pip install 'edgeq[ray]')"
            if options.use_ray else "--address and --no-ray contradict each other; drop one"
        )
    if options.address is not None:
        check_address(options.address)  # ray.init waits on an address nobody answers at for minutes, retrying
    started, stamp = time.monotonic(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    planned = plan(sweep, force=options.force)
    order = {item.task.id: index for index, item in enumerate(planned)}
    results = [item.reused for item in planned if item.reused is not None]
    todo = [item for item in planned if item.reused is None]
    for item in planned:
        echo(f"  {item.task.id}: {'skipped' if item.reused else 'runs'} ({item.reason})")
    done = [0]

    def on_result(result: TaskResult) -> None:
        done[0] += 1
        retried = f", {result.attempts} attempts" if result.attempts > 1 else ""
        echo(f"  [{done[0]}/{len(todo)}] {result.id}: {result.status} ({result.seconds} s{retried})")
        results.append(result)

    runner = "nothing: every task reused"
    if todo and use_ray:
        runner = run_ray(todo, sweep.import_paths, on_result, address=options.address, workers=options.workers, retries=options.retries)
    elif todo:
        if options.use_ray:
            echo(f"  Ray is not installed (pip install 'edgeq[ray]'): running the {len(todo)} task(s) one by one here")
        from edgeq.noise import toolchain_output

        with toolchain_output(options.verbose):
            run_serial(todo, sweep.import_paths, on_result, on_step=lambda text: echo(f"    {text}"))
        runner = "this process, one task at a time"
    results.sort(key=lambda r: order[r.id])
    meta = {"edgeq": __version__, "config": str(sweep.path), "out": str(sweep.out), "started": stamp,
            "seconds": elapsed(started), "runner": runner}
    print_table(results, f"edgeq sweep: {len(results)} tasks, {len(results) - len(todo)} reused; ran on {runner}")
    reports = write_reports(sweep.out, results, meta)
    return SweepRun(results, reports, runner, exit_code(results))


__all__ = ["Planned", "Sweep", "SweepOptions", "SweepRun", "SweepTask", "TaskResult", "load_sweep", "run_sweep"]
