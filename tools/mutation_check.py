#!/usr/bin/env python3
"""Mutation check: break edgeq's core promises on purpose, one at a time, and expect the tests to fail.

A suite that only shows good artifacts passing proves little; this script keeps it honest. Each mutation
below is a small textual patch (search -> replacement, in one file; searches leave out the indentation, so a
re-indented block keeps them valid) that breaks one promise the README makes:
weight parity, publish-replaces-not-merges, exit codes, the calibration/validation split, tamper refusal,
per-layer ranking, budgets, and the MIL reference executor's semantics (fp16 rounding, GELU, padding, ...).
For each, the script

  1. copies the working tree (tracked and untracked, not ignored files) into a temporary folder, with the
     package-dir mapping of pyproject.toml rebuilt as symlinks (edgeq/converters -> ../converters, ...), so
     `import edgeq.converters` reads the copy, not the editable install (checked before anything runs);
  2. runs the tests the mutation names on the unmutated copy once (the baseline: they must pass);
  3. applies the mutation, runs its tests (or, with --full, the whole suite but the MiniLM tests, with -x),
     and restores the file;
  4. prints a table and exits 1 if any mutation was NOT caught, if its search text no longer occurs exactly
     once in its file (the code moved on: update the mutation), or if its tests could not run.

Run it with the project's interpreter, from anywhere:

    .venv/bin/python tools/mutation_check.py              # each mutation against the tests it names
    .venv/bin/python tools/mutation_check.py --full       # each mutation against the whole suite (slow)
    .venv/bin/python tools/mutation_check.py --only mil-gelu-exact-as-tanh --keep
    .venv/bin/python tools/mutation_check.py --list

It is not part of the pytest suite (minutes, not seconds); tests/test_mutation_check.py checks cheaply that
every search text still matches its file exactly once and every named test exists.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MINILM_TESTS = ("tests/test_minilm.py", "tests/test_minilm_int8.py")  # minutes each; --full leaves them out

P = "tests/test_promises.py::"
OPS = "tests/validate/test_mil_ops.py::"


@dataclass(frozen=True)
class Mutation:
    name: str
    promise: str  # what the breakage breaks, in the README's words
    file: str  # relative to the repository root
    search: str  # must occur exactly once in the file
    replace: str
    tests: tuple[str, ...]  # pytest node ids expected to fail on it


MUTATIONS = [
    # ---- the eleven of issue 9 --------------------------------------------------------------------------
    Mutation(
        "parity-ignores-scales", "weight parity compares codes and scales", "converters/parity.py",
        "elif not np.array_equal(np.asarray(scale, dtype=np.float32).ravel(), expected.ravel()):",
        "elif False:  # MUTATION: scales never compared",
        (P + "test_weight_parity_compares_codes_and_scales", P + "test_weight_parity_reads_the_artifact_and_reports_any_difference",
         P + "test_weights_that_differ_from_the_plan_fail_with_exit_4_and_publish_nothing"),
    ),
    Mutation(
        "pipeline-ignores-parity", "a parity mismatch fails the conversion (exit 4)", "edgeq/pipeline.py",
        "if parity.mismatches or parity.missing:",
        "if False:  # MUTATION: parity computed, never enforced",
        (P + "test_weights_that_differ_from_the_plan_fail_with_exit_4_and_publish_nothing",),
    ),
    Mutation(
        "publish-merges", "a republished bundle replaces the old one", "edgeq/bundle.py",
        'os.rename(dest, old / "bundle")',
        "shutil.copytree(dest, staged, dirs_exist_ok=True, copy_function=lambda s, d: os.path.exists(d) or shutil.copy2(s, d)); "
        'os.rename(dest, old / "bundle")  # MUTATION: the old files are merged into the new bundle',
        (P + "test_republishing_replaces_the_old_bundle_instead_of_merging", P + "test_a_rerun_replaces_a_bundle_with_stray_files"),
    ),
    Mutation(
        "verdict-passes-runtime-error", "an artifact the runtime could not run is never passed (exit 5)", "validate/verdict.py",
        "return Verdict.VALIDATION_FAILED",
        "return Verdict.PASSED  # MUTATION: a runtime error passes",
        (P + "test_verdict_of_each_run", P + "test_an_artifact_the_runtime_cannot_run_exits_5_and_is_kept_aside",
         P + "test_validate_exits_5_when_the_runtime_cannot_run_a_checksummed_artifact"),
    ),
    Mutation(
        "least-severe-exit-code-wins", "the most severe exit code wins (4, then 5, then 6)", "validate/verdict.py",
        "for code in (4, 5, 6) if code in codes",
        "for code in (6, 5, 4) if code in codes",
        (P + "test_the_most_severe_exit_code_wins_in_every_combination", P + "test_a_refused_target_outranks_one_over_budget"),
    ),
    Mutation(
        "calibration-overlaps-validation", "calibration samples never reach validation", "calibration/data.py",
        "calibration = [samples[i] for i in sorted(order[:calibration_count])]",
        "calibration = [samples[i] for i in sorted(order[len(order) - calibration_count:])]  # MUTATION: from validation's part",
        (P + "test_the_split_never_shares_a_sample", P + "test_calibration_samples_never_reach_validation"),
    ),
    Mutation(
        "mil-no-fp16-rounding", "fp16-typed MIL values are rounded to float16 per op", "validate/mil/executor.py",
        "return array.astype(np.float16).astype(np.float32)",
        "return array.astype(np.float32)  # MUTATION: fp16 not emulated",
        (OPS + "test_fp16_is_rounded_per_op",),
    ),
    Mutation(
        "mil-gelu-exact-as-tanh", "MIL gelu EXACT is erf GELU", "validate/mil/ops_elementwise.py",
        "return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))",
        "return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x**3)))",
        (OPS + "test_op_matches_pytorch[gelu_exact]", OPS + "test_op_matches_pytorch[gelu_default_is_exact]",
         "tests/validate/test_mil_executor.py::test_executor_reproduces_pytorch[edgeq.examples:tiny_mlp-fp32]"),
    ),
    Mutation(
        "mil-same-padding-reversed", "MIL `same` padding puts the odd pixel at the end", "validate/mil/ops_conv.py",
        'out.append((small, large) if pad_type == "same" else (large, small))',
        'out.append((large, small) if pad_type == "same" else (small, large))',
        (OPS + "test_op_matches_pytorch[conv_same_even_kernel]", OPS + "test_op_matches_pytorch[conv_same_lower]",
         OPS + "test_op_matches_pytorch[conv1d_same]", OPS + "test_op_matches_pytorch[max_pool_same]"),
    ),
    Mutation(
        "mil-quantize-half-up", "MIL quantize rounds half to even", "validate/mil/ops_quant.py",
        'q = np.around(x / _f(_along(a("scale"), x.ndim, axis)))',
        'q = np.floor(x / _f(_along(a("scale"), x.ndim, axis)) + np.float32(0.5))  # MUTATION: half up',
        (OPS + "test_op_matches_pytorch[quantize_ties_int8]", OPS + "test_op_matches_pytorch[quantize_ties_uint8_zero_point]"),
    ),
    Mutation(
        "mil-layer-norm-no-epsilon", "MIL layer_norm adds epsilon to the variance", "validate/mil/ops_linalg.py",
        "out = (x - mean) / np.sqrt(variance + epsilon)",
        "out = (x - mean) / np.sqrt(variance)  # MUTATION: epsilon ignored",
        (OPS + "test_op_matches_pytorch[layer_norm_eps]",
         "tests/validate/test_mil_executor.py::test_executor_reproduces_pytorch[edgeq.examples:tiny_mlp-fp32]"),
    ),
    # ---- more promises ------------------------------------------------------------------------------------
    Mutation(
        "layer-ranking-reversed", "per-layer drift names the noisiest layer first", "validate/layer_drift.py",
        "key=lambda r: r.local_sqnr_db)",
        "key=lambda r: -r.local_sqnr_db)",
        ("tests/validate/test_layer_drift.py::test_top_names_the_noisiest_layers_and_json_has_no_infinity",),
    ),
    Mutation(
        "golden-unchecked", "a changed golden.npz is refused (exit 3)", "validate/bundle_check.py",
        'return {self.artifact: self.manifest["artifact"]["sha256"], self.golden: self.manifest["golden"]["sha256"]}',
        'return {self.artifact: self.manifest["artifact"]["sha256"]}  # MUTATION: golden.npz unchecked',
        (P + "test_a_changed_file_is_refused_with_exit_3[golden.npz]", P + "test_changed_golden_outputs_are_refused_even_when_the_npz_is_valid"),
    ),
    Mutation(
        "tamper-ignores-checksums", "a changed artifact is refused (exit 3)", "validate/bundle_check.py",
        "if actual != digest:",
        "if False:  # MUTATION: checksums computed, never compared",
        (P + "test_a_changed_file_is_refused_with_exit_3[model.onnx]",),
    ),
    Mutation(
        "budget-keeps-one-term", "every budget term is held", "validate/budget.py",
        "return Budget(tuple(bounds))",
        "return Budget(tuple(bounds[-1:]))  # MUTATION: only the last term survives parsing",
        (P + "test_every_budget_term_is_held",),
    ),
    Mutation(
        "budget-checks-one-term", "every budget term is held", "validate/budget.py",
        "for bound in self.bounds:",
        "for bound in self.bounds[:1]:  # MUTATION: only the first term is held",
        (P + "test_every_budget_term_is_held",),
    ),
    Mutation(
        "rejected-published-as-canonical", "over budget or unrunnable bundles go to <precision>.rejected", "edgeq/pipeline.py",
        "final = dest if verdict in (Verdict.PASSED, Verdict.NOT_VALIDATED) else",
        "final = dest if True else  # MUTATION",
        (P + "test_an_artifact_the_runtime_cannot_run_exits_5_and_is_kept_aside", P + "test_a_refused_target_outranks_one_over_budget"),
    ),
    Mutation(
        "pipeline-validates-on-all-samples", "calibration samples never reach validation", "edgeq/pipeline.py",
        "calibration, validation = split(samples, calibration_count=calibration_count, seed=options.seed)",
        "calibration, validation = split(samples, calibration_count=calibration_count, seed=options.seed)[0], samples  # MUTATION",
        (P + "test_calibration_samples_never_reach_validation",),
    ),
    Mutation(
        "publish-loses-previous-on-failure", "a failed publish puts the previous bundle back", "edgeq/bundle.py",
        'os.rename(old / "bundle", dest)  # put the previous bundle back',
        "pass  # MUTATION: the previous bundle stays in the temporary folder",
        (P + "test_a_publish_that_fails_puts_the_previous_bundle_back",),
    ),
    Mutation(
        "device-least-severe-wins", "a device run reports the most severe code (3, then 5, then 6)", "edgeq/device/results.py",
        "for code in (3, 5, 6) if code in codes",
        "for code in (6, 5, 3) if code in codes",
        (P + "test_the_device_run_ranks_refused_first_then_runtime_then_budget",),
    ),
    Mutation(
        "mil-max-pool-zero-padding", "MIL max_pool pads with -inf", "validate/mil/ops_conv.py",
        "constant_values=-np.inf)",
        "constant_values=0.0)  # MUTATION",
        (OPS + "test_op_matches_pytorch[max_pool_same]", OPS + "test_op_matches_pytorch[max_pool_custom]"),
    ),
    Mutation(
        "mil-thresholded-relu-strict", "MIL thresholded_relu keeps x where x >= alpha", "validate/mil/ops_elementwise.py",
        'return np.where(x >= _f(a("alpha")), x, np.float32(0.0))',
        'return np.where(x > _f(a("alpha")), x, np.float32(0.0))  # MUTATION',
        (OPS + "test_op_matches_pytorch[thresholded_relu]",),
    ),
    Mutation(
        "mil-matmul-ignores-transpose-y", "MIL matmul honours transpose_y", "validate/mil/ops_linalg.py",
        'if a.scalar("transpose_y", False):',
        'if False:  # MUTATION',
        (OPS + "test_op_matches_pytorch[matmul_tx0_ty1]",),
    ),
    Mutation(
        "mil-pool-ceil-as-floor", "MIL pooling honours ceil_mode (PyTorch's output sizes)", "validate/mil/ops_conv.py",
        "out = (padded - k + (s - 1 if ceil else 0)) // s + 1",
        "out = (padded - k) // s + 1  # MUTATION: ceil_mode ignored",
        ("tests/validate/test_mil_ops_spatial.py::test_op_matches_pytorch[max_pool_ceil_valid]",
         "tests/validate/test_mil_ops_spatial.py::test_ceil_mode_output_sizes_follow_pytorch"),
    ),
    Mutation(
        "mil-avg-pool-counts-overhang", "MIL avg_pool never counts ceil_mode's overhang in the divisor", "validate/mil/ops_conv.py",
        "counted = np.pad(counted, [(0, 0), (0, 0)] + [(0, extra) for extra in overhang])",
        "counted = np.pad(counted, [(0, 0), (0, 0)] + [(0, extra) for extra in overhang], constant_values=1.0)  # MUTATION",
        ("tests/validate/test_mil_ops_spatial.py::test_op_matches_pytorch[avg_pool_ceil_counts_padding]",),
    ),
    Mutation(
        "mil-reflect-pad-repeats-edge", "MIL pad reflect mirrors without repeating the edge", "validate/mil/ops_resize.py",
        '"reflect": "reflect"',
        '"reflect": "symmetric"',
        ("tests/validate/test_mil_ops_spatial.py::test_op_matches_pytorch[pad_reflect]",),
    ),
]


class CopyError(RuntimeError):
    pass


def working_tree_files(repo: Path) -> list[str]:
    """Tracked and untracked files that git does not ignore, as they are in the working tree now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo, check=True, capture_output=True
    ).stdout.decode().split("\0")
    return sorted({name for name in listed if name and (repo / name).is_file()})


def make_copy(repo: Path, dest: Path) -> Path:
    """Copy the working tree to `dest`/<repo name> and rebuild pyproject's package-dir mapping as symlinks."""
    root = dest / repo.name
    for name in working_tree_files(repo):
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)
    mapping = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})
    for package, folder in mapping.items():
        link = root / package.replace(".", "/")
        if link.exists():
            raise CopyError(f"{link} exists in the copy; cannot map {package} to {folder}")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / folder, link.parent), target_is_directory=True)
    shared = repo.parent / "shared"  # data sets the tests read beside the checkout (../shared/data)
    if shared.is_dir():
        (dest / "shared").symlink_to(shared, target_is_directory=True)
    return root


def environment(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTHONPATH")}
    env["PYTHONPATH"] = str(copy)  # child processes (python -m edgeq.device, ...) import the copy too
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file of the same size and second must not reuse a mutant's .pyc
    return env


def check_imports_from_copy(python: str, copy: Path) -> None:
    """Every edgeq package (and each mapped folder) must import from the copy, not from the editable install."""
    packages = tomllib.loads((copy / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    code = (
        "import importlib.util, sys\n"
        f"for name in {packages!r}:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin)\n"
    )
    result = subprocess.run([python, "-c", code], cwd=copy, env=environment(copy), capture_output=True, text=True)
    if result.returncode:
        raise CopyError(f"cannot import edgeq from the copy:\n{result.stderr}")
    outside = [line for line in result.stdout.splitlines() if not line.split(" ", 1)[1].startswith(str(copy))]
    if outside:
        raise CopyError("these packages import from outside the copy (the editable install?): " + "; ".join(outside))


def run_pytest(python: str, copy: Path, args: list[str], timeout: float) -> tuple[int, float, str]:
    """(pytest exit code, seconds, the summary lines worth showing)."""
    command = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE", *args]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    lines = result.stdout.splitlines()
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|error|skipped)|no tests ran", line)), "")
    detail = failed[0] if failed else summary
    if result.returncode not in (0, 1) and not failed:
        detail = "\n".join(lines[-15:] + result.stderr.splitlines()[-10:])
    elif "skipped" in summary:
        detail += f" ({summary.strip('= ')})"
    return result.returncode, seconds, detail


def suite_args(mutation: Mutation | None, full: bool) -> list[str]:
    """The whole suite but the MiniLM tests, or the tests the mutation names."""
    if full or mutation is None:
        return ["tests", *(f"--ignore={path}" for path in MINILM_TESTS)]
    return list(mutation.tests)


def occurrences(root: Path, mutation: Mutation) -> int:
    path = root / mutation.file
    return path.read_text().count(mutation.search) if path.is_file() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="run the whole suite (MiniLM tests aside) with -x for each mutation")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the unmutated copy")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per pytest run (default 1800)")
    parser.add_argument("--python", default=sys.executable, help="interpreter with edgeq's dependencies (default: this one)")
    args = parser.parse_args(argv)

    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            parser.error(f"unknown mutation(s): {', '.join(unknown)}; see --list")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.name:36} {m.file:28} {m.promise}")
        return 0

    temp = Path(tempfile.mkdtemp(prefix="edgeq-mutation-"))
    rows: list[tuple[str, str, str, float, str]] = []
    try:
        copy = make_copy(REPO, temp)
        check_imports_from_copy(args.python, copy)
        print(f"copy of the working tree: {copy}", flush=True)
        if not args.no_baseline:
            nodes = suite_args(None, True) if args.full else sorted({node for m in chosen for node in m.tests})
            code, seconds, detail = run_pytest(args.python, copy, nodes, args.timeout)
            print(f"baseline (unmutated): exit {code} in {seconds:.0f} s {detail}", flush=True)
            if code != 0:
                print("the tests fail without any mutation: fix them first, the check would mean nothing", file=sys.stderr)
                return 2
        for mutation in chosen:
            path = copy / mutation.file
            found = occurrences(copy, mutation)
            if found != 1:
                rows.append((mutation.name, mutation.file, "STALE", 0.0, f"search text found {found} times (expected once)"))
                print(f"{mutation.name}: STALE", flush=True)
                continue
            original = path.read_text()
            path.write_text(original.replace(mutation.search, mutation.replace))
            try:
                code, seconds, detail = run_pytest(args.python, copy, suite_args(mutation, args.full), args.timeout)
            finally:
                path.write_text(original)
            result = {0: "NOT CAUGHT", 1: "caught"}.get(code, f"ERROR (pytest exit {code})")
            rows.append((mutation.name, mutation.file, result, seconds, detail))
            print(f"{mutation.name}: {result} in {seconds:.0f} s", flush=True)
    except CopyError as exc:
        print(f"mutation check: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"kept: {temp}")
        else:
            shutil.rmtree(temp, ignore_errors=True)

    print()
    print("| mutation | file | result | s | first failure |\n|---|---|---|---|---|")
    for name, file, result, seconds, detail in rows:
        print(f"| {name} | {file} | {result} | {seconds:.0f} | {detail.splitlines()[0] if detail else ''} |")
    bad = [row for row in rows if row[2] != "caught"]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} mutations caught" + (f"; not caught or broken: {', '.join(r[0] for r in bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
