"""`python -m edgeq.device BUNDLE` / `edgeq-device BUNDLE`: validate bundles on the device itself.

BUNDLE is a bundle folder, a lab archive made by `edgeq bundle`, or such an archive already extracted.
For each bundle: verify the manifest's checksums, run the golden inputs in the runtime, print drift per
output, time the artifact and measure peak memory, hold the budget. Exit codes as `edgeq validate`:
0 every bundle passed (or its runtime cannot execute here, e.g. Core ML off macOS), 2 usage, 3 refused
(not a bundle, or a file does not match its checksum), 5 the runtime is missing or failed, 6 over budget.

A text-generation bundle (`edgeq convert --task text-generation`) runs a greedy generate loop from the prompts in
its generation.json and holds the golden continuations instead (edgeq/device/generate.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from edgeq.device.archive import INDEX, bundle_name, open_lab_folder, unpack
from edgeq.device.generate import (bundle_label, check_generation, is_generation_budget, is_generation_bundle,
                                   parse_generation_budget, read_generation_bundle)
from edgeq.device.memory import MemoryWatch
from edgeq.bundle import write_atomic
from edgeq.device.results import BundleRun, exit_code, junit_text, result_json
from edgeq.device.runtime import INSTALL_HINTS, runtime_package
from edgeq.device.text import bundle_lines, summary_line
from edgeq.errors import EdgeqError, SourceError, UsageError, ValidationError
from edgeq.noise import toolchain_output
from edgeq.validate.budget import BudgetSyntaxError, parse_budget
from edgeq.validate.bundle_check import BundleCheck, Timing, bundle_budget, read_bundle, run_bundle, verify_checksums
from edgeq.validate.drift import DriftReport, Status
from edgeq.validate.latency import WARMUP_RUNS, host_description
from edgeq.validate.verdict import Verdict


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeq-device",
        description="Validate edgeq bundles on this device with numpy and the runtime only.",
        epilog="Exit codes: 0 passed (or not executable on this OS), 2 usage, 3 refused (tampered or not a "
        "bundle), 5 the runtime is missing or could not run the artifact, 6 over budget.",
    )
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="a bundle folder, or a lab archive made by `edgeq bundle`")
    parser.add_argument("--budget", metavar="TERMS", help="hold this budget instead of the recorded one, e.g. 'cosine>=0.999,sqnr_db>=30'; "
                        "a text-generation bundle: 'greedy_match>=0.9,fp32_match>=0.5' (default greedy_match>=1)")
    parser.add_argument("--warmup", type=_count(0), default=WARMUP_RUNS, metavar="N", help=f"untimed runs before timing (default {WARMUP_RUNS})")
    parser.add_argument("--runs", type=_count(1), metavar="N", help="timed runs (default: about one second's worth, 10 to 200)")
    parser.add_argument("--no-latency", action="store_true", help="skip timing")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--junit", type=Path, metavar="PATH", help="write JUnit XML: a testsuite per bundle, a test case per output")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show the runtime's own log lines and warnings")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.budget is not None:
        try:
            if args.budget.strip().lower() == "none":  # hold no budget, said explicitly
                args.budget = ""
            elif is_generation_budget(args.budget):
                parse_generation_budget(args.budget)
            else:
                parse_budget(args.budget, require_terms=True)
        except BudgetSyntaxError as exc:
            print(f"error: --budget: {exc}", file=sys.stderr)
            return 2
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    timing = None if args.no_latency else Timing(warmup=args.warmup, runs=args.runs)
    with tempfile.TemporaryDirectory(prefix="edgeq-device-") as work:
        try:
            folders = locate(args.bundle, Path(work))
        except EdgeqError as error:
            print(f"error: {error}", file=sys.stderr)
            _write_results(args, [], error=error)
            return error.exit_code
        runs = []
        with toolchain_output(args.verbose):
            for folder, shown in folders:
                try:
                    run = run_one(folder, args.budget, timing)
                except UsageError as error:  # a --budget of one kind given to a bundle of the other
                    print(f"error: {folder}: {error}", file=sys.stderr)
                    _write_results(args, runs, error=error)
                    return error.exit_code
                run.path = shown
                print("\n".join(bundle_lines(run)), flush=True)
                runs.append(run)
    code = exit_code(runs)
    _write_results(args, runs)
    print(summary_line(runs, code, host_description()))
    return code


def _write_results(args, runs: list[BundleRun], error: EdgeqError | None = None) -> None:
    """--json and --junit; when BUNDLE itself was refused, they say so (a lab's CI sees an error, not nothing)."""
    if args.json is not None:
        import json

        write_atomic(args.json, json.dumps(result_json(args.bundle, runs, error), indent=2) + "\n")
    if args.junit is not None:
        write_atomic(args.junit, junit_text(runs, None if error is None else (args.bundle.name, str(error))))


def locate(path: Path, work: Path) -> list[tuple[Path, str]]:
    """The bundle folders BUNDLE names, each with how to show it: an archive is extracted into `work`
    (every file checked against its index) and its bundles are shown as ARCHIVE:model/target/precision."""
    if path.is_file():
        return [(folder, f"{path}:{folder.relative_to(work.resolve()).as_posix()}") for folder in unpack(path, work)]
    if path.is_dir():
        folders = open_lab_folder(path) if (path / INDEX).is_file() else [path]
        return [(folder, str(folder)) for folder in folders]
    raise SourceError(f"{path}: no such bundle folder or lab archive")


def run_one(folder: Path, budget_text: str | None, timing: Timing | None) -> BundleRun:
    """Verify, run and time one bundle; a bundle that cannot be trusted is refused, not run."""
    if is_generation_bundle(folder):
        return run_generation_one(folder, budget_text)
    try:
        files = read_bundle(folder)
    except SourceError as error:
        return BundleRun(folder.name, str(folder), {}, {"name": None, "package": None, "version": None}, "manifest", refused=str(error))
    run = BundleRun(
        bundle_name(files), str(folder), files.manifest, runtime_package(files.runtime),
        "manifest" if budget_text is None else "--budget",
    )
    try:
        verify_checksums(files)
        budget = bundle_budget(files, budget_text)
    except SourceError as error:
        run.refused = str(error)
        return run
    with MemoryWatch() as watch:
        try:
            run.check = run_bundle(files, budget, timing)
        except ValidationError as error:  # the runtime is not installed here
            reason = f"{error}; install it with: {INSTALL_HINTS.get(files.runtime, 'its runtime')}"
            report = DriftReport(Status.ERROR, executor="none", reason=reason)
            run.check = BundleCheck(folder, files.manifest, report, str(budget), Verdict.VALIDATION_FAILED, latency_reason="not measured")
    run.memory = watch.use
    return run


def run_generation_one(folder: Path, budget_text: str | None) -> BundleRun:
    """Verify a text-generation bundle, run its greedy loop and hold the golden continuations."""
    try:
        bundle = read_generation_bundle(folder)
    except SourceError as error:
        return BundleRun(bundle_label(folder), str(folder), {}, {"name": None, "package": None, "version": None}, "default",
                         refused=str(error), text_generation=True)
    if budget_text is not None and budget_text and not is_generation_budget(budget_text):
        raise UsageError(f"--budget {budget_text!r}: a text-generation bundle takes greedy_match>=R and fp32_match>=R")
    run = BundleRun(bundle.name, str(folder), bundle.manifest, runtime_package(bundle.runtime),
                    "default" if budget_text is None else "--budget", text_generation=True)
    with MemoryWatch() as watch:
        run.check, run.generation = check_generation(bundle, budget_text)
    run.memory = watch.use
    return run
