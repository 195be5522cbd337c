"""TFLite w8a8 MiniLM against FP32 under XNNPACK (issue 12; docs/research/tflite-w8a8-speed.md).

With --build, converts all-MiniLM-L6-v2 with edgeq for `tflite` (validated on STS-B dev sentences, calibrated on
others): fp32, int8-dynamic, w8a8 with --auto-fallback (int8 FULLY_CONNECTED islands, the layers the sweep finds
most sensitive moved to the hybrid kernel), and variants of the per-layer choice: w8a8 as planned by default (the
linears feeding a residual add hybrid, the rest islands), the sweep held to cosine>=0.99, every linear an island.
Otherwise takes existing edgeq bundles (a folder holding fp32/ w8a8/ [int8-dynamic/]). Unless --skip-aeq, builds
ai-edge-quantizer's (AEQ) static_wi8_ai8 / static_wi8_ai16 / dynamic_wi8_afp32 from the same FP32 .tflite. Then
for each artifact prints:
  census      ops by (type, input dtypes -> output dtypes); "float compute" = ops other than (DE)QUANTIZE,
              RESHAPE and the int32 mask ops that output float32
  delegation  ops XNNPACK (LiteRT's default CPU delegate) leaves to the builtin kernels
  cosine      mean cosine of the sentence embedding to FP32 PyTorch on --stsb STS-B dev sentences (and to the
              FP32 .tflite on the few built-in sentences)
  timing      median ms, batch 1, sequence 128, ONE thread, warm, artifacts interleaved round by round; FP32 / it
and a kernel table: one FULLY_CONNECTED [128x384] x [384->1536] and one attention block's float ops, float vs
int8 (static) vs hybrid, built the same way (litert-torch FP32, then AEQ), to show which kernels pay.

Run:  .venv/bin/python benchmarks/bench_tflite_w8a8.py --build DIR [--variants fp32,w8a8,...] [--skip-aeq] [--skip-kernels] [--rounds 40]
      .venv/bin/python benchmarks/bench_tflite_w8a8.py BUNDLES [--rounds 40] [--calibration 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeq.validate.latency import measure_interleaved  # noqa: E402  (numpy only: light)

SENTENCES = [
    "A man is playing a guitar.", "The cat sits on the mat near the window.", "Stocks fell sharply on Monday.",
    "Two dogs run across a snowy field.", "She is reading a book about the history of Rome.",
    "The recipe needs three eggs and a cup of flour.", "A child rides a bicycle down the street.",
    "Rain is expected tomorrow in the northern regions.", "He plays the piano every evening after dinner.",
    "The committee approved the new budget proposal.", "A woman is slicing an onion.", "Birds fly south in winter.",
]
MASK_OPS = {"CAST", "GATHER_ND", "LOGICAL_AND", "SELECT_V2", "EMBEDDING_LOOKUP"}


def interpreter(path: Path, threads: int = 1):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    return it


def census(path: Path) -> tuple[collections.Counter, collections.Counter, list]:
    """(ops by type+dtypes, float-compute ops by type, not-delegated placements)."""
    from edgeq.validate.runners.litert_delegation import op_placements

    it = interpreter(path)
    tensors = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    ops = [op for op in it._get_ops_details() if op["op_name"] != "DELEGATE"]
    by_type, float_compute = collections.Counter(), collections.Counter()
    for op in ops:
        ins = ",".join(tensors.get(i, "?") for i in op["inputs"] if i >= 0)
        outs = ",".join(tensors.get(i, "?") for i in op["outputs"] if i >= 0)
        by_type[f"{op['op_name']} ({ins} -> {outs})"] += 1
        if "float32" in outs and op["op_name"] not in {"QUANTIZE", "DEQUANTIZE", "RESHAPE", *MASK_OPS}:
            float_compute[op["op_name"]] += 1
    return by_type, float_compute, [p for p in op_placements(it) if not p.delegated]


def feeds(path: Path, samples: list[dict]) -> list[dict]:
    it = interpreter(path)
    runner = it.get_signature_runner()
    types = {name: d["dtype"] for name, d in runner.get_input_details().items()}
    return [{name: s[name].astype(types[name]) for name in types} for s in samples]


def recipe_by_name(name: str):
    """AEQ's named recipes, plus `static_fc_only_wi8_ai8` / `..._ai16`: static int8 for FULLY_CONNECTED only,
    every other op float (int8 FC islands between QUANTIZE and DEQUANTIZE: the graph edgeq's w8a8 should be)."""
    from ai_edge_quantizer import recipe, recipe_manager

    if not name.startswith("static_fc_only"):
        return getattr(recipe, name)()
    manager = recipe_manager.RecipeManager()
    manager.add_static_config(regex=".*", operation_name=recipe.TFLOperationName.FULLY_CONNECTED,
                              activation_num_bits=16 if name.endswith("ai16") else 8, weight_num_bits=8)
    return manager.get_quantization_recipe()


def aeq(fp32: Path, recipe_name: str, calibration: list[dict], out: Path) -> Path:
    from ai_edge_quantizer import quantizer, recipe

    engine = quantizer.Quantizer(str(fp32))
    engine.load_quantization_recipe(recipe_by_name(recipe_name))
    result = None
    if recipe_name.startswith("static"):
        result = engine.calibrate({"serving_default": calibration}, num_threads=2)
    dest = out / f"aeq_{recipe_name}.tflite"
    dest.write_bytes(bytes(engine.quantize(result, enable_progress_report=False).quantized_model))
    return dest


def time_interleaved(paths: dict[str, Path], sample: dict, rounds: int) -> dict[str, float]:
    """Median ms of each file over `rounds` interleaved rounds (validate/latency.py's method: warm, a fresh order
    each round)."""
    runners = {label: interpreter(p).get_signature_runner() for label, p in paths.items()}
    calls = [lambda runner=runner: runner(**sample) for runner in runners.values()]
    latencies = measure_interleaved(calls, warmup=5, min_runs=rounds, max_runs=rounds, target_s=0)
    return {label: latency.median_ms for label, latency in zip(runners, latencies)}


def embeddings(path: Path, samples: list[dict]) -> np.ndarray:
    runner = interpreter(path).get_signature_runner()
    return np.stack([next(iter(runner(**s).values())).reshape(-1) for s in samples])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def kernel_models(out: Path, calibration_count: int) -> dict[str, Path]:
    """One linear and one attention core (q.k^T, softmax, .v) as FP32 .tflite, then AEQ static int8 / hybrid."""
    import torch
    import litert_torch

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(384, 1536)

        def forward(self, x):
            return self.fc(x)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) @ v

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(384)

        def forward(self, x):
            return torch.nn.functional.gelu(self.norm(x))

    torch.manual_seed(0)
    shapes = {"linear": (Linear(), [(1, 128, 384)]), "attention": (Attention(), [(1, 12, 128, 32)] * 3),
              "layernorm+gelu": (Norm(), [(1, 128, 384)])}
    paths = {}
    for name, (module, input_shapes) in shapes.items():
        args = tuple(torch.randn(*s) for s in input_shapes)
        fp32 = out / f"kernel_{name}_fp32.tflite"
        fp32.write_bytes(litert_torch.convert(module.eval(), args).model_content())
        paths[f"{name} fp32"] = fp32
        calibration = [
            {f"args_{i}": np.random.default_rng(j).standard_normal(s).astype(np.float32) for i, s in enumerate(input_shapes)}
            for j in range(calibration_count)
        ]
        for recipe_name in ("static_wi8_ai8", "static_wi8_ai16", "dynamic_wi8_afp32") if name == "linear" else ("static_wi8_ai8",):
            from ai_edge_quantizer import quantizer

            engine = quantizer.Quantizer(str(fp32))
            engine.load_quantization_recipe(recipe_by_name(recipe_name))
            result = engine.calibrate({"serving_default": calibration}, num_threads=2) if recipe_name.startswith("static") else None
            dest = out / f"kernel_{name}_{recipe_name}.tflite"
            dest.write_bytes(bytes(engine.quantize(result, enable_progress_report=False).quantized_model))
            paths[f"{name} {recipe_name}"] = dest
    return paths


# (label, precision, QuantizeOptions fields, budget, every linear an int8 island: the plan's default of starting the
# linears that feed a residual add as the hybrid kernel turned off)
VARIANTS = [
    ("fp32", "fp32", {}, None, False),
    ("int8-dynamic", "int8-dynamic", {}, None, False),
    # the default: the 12 linears feeding a residual add (attention.output.dense, output.dense) hybrid, the rest islands
    ("w8a8", "w8a8", {}, None, False),
    ("w8a8 --auto-fallback", "w8a8", {"auto_fallback": True}, None, False),
    ("w8a8 --auto-fallback to cosine>=0.99", "w8a8", {"auto_fallback": True, "fallback_max": 1.0}, "cosine>=0.99", False),
    ("w8a8 every linear an island", "w8a8", {}, "cosine>=0.9", True),  # its own budget would fail it
]


def build(model, out: Path, stsb: Path, samples: int, only: set[str] | None = None) -> dict[str, Path]:
    """edgeq's `tflite` artifacts of VARIANTS (those labelled in `only`, if given), validated on `samples` STS-B dev
    sentences (label -> model.tflite)."""
    import contextlib
    import re
    from unittest import mock

    from edgeq import quantize
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.targets import resolve

    paths = {}
    for label, precision, fields, budget, islands in VARIANTS:
        if only and label not in only:
            continue
        start = time.perf_counter()
        options = ConvertOptions(targets=["tflite"], out=out / re.sub(r"\W+", "_", label), precisions=[precision],
                                 budget=budget, data=stsb, text_column="5", samples=samples,
                                 quantize=quantize.QuantizeOptions(**fields))
        with mock.patch.object(resolve, "_residual_layers_hybrid", lambda *_: None) if islands else contextlib.nullcontext():
            (outcome,) = convert(model, options)
        notes = [n for n in outcome.plan_notes if "auto-fallback" in n or "kernels" in n or "residual" in n]
        print(f"  built {label}: {outcome.verdict} in {time.perf_counter() - start:.0f} s; " + " | ".join(notes), file=sys.stderr)
        if outcome.path is not None:
            paths[f"edgeq {label}"] = outcome.path / "model.tflite"
    return paths


def pytorch_cosines(model, paths: dict[str, Path], count: int) -> dict[str, float]:
    """Mean cosine of each artifact's sentence embedding to FP32 PyTorch's on `count` STS-B dev sentences."""
    from benchmarks.stsb import STSB_DIR, read_pairs
    from edgeq.calibration.collect import run_module
    from edgeq.calibration.data import tokenize

    first, second, _ = read_pairs(STSB_DIR / "sts-dev.csv", (count + 1) // 2)
    samples = tokenize((first + second)[:count], model.inputs, model.tokenizer)
    reference = np.stack([next(iter(o.values())).reshape(-1) for o in run_module(model.module, samples, model.input_names, model.outputs)])
    return {label: cosine(embeddings(path, feeds(path, samples)), reference) for label, path in paths.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", type=Path, nargs="?", help="a folder holding edgeq's fp32/ w8a8/ ... bundles")
    parser.add_argument("--build", type=Path, default=None, help="convert VARIANTS into this folder first")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calibration", type=int, default=8, help="sentences AEQ calibrates on")
    parser.add_argument("--stsb", type=int, default=128, help="STS-B dev sentences for the cosine to FP32 PyTorch")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-aeq", action="store_true")
    parser.add_argument("--variants", default="", help="with --build: comma-separated VARIANTS labels to build (default all)")
    args = parser.parse_args()
    if (args.bundles is None) == (args.build is None):
        parser.error("give BUNDLES or --build DIR")
    out = args.out or args.build or Path(tempfile.mkdtemp(prefix="edgeq-w8a8-"))
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.bench_speed import load_minilm
    from benchmarks.stsb import STSB_DIR
    from edgeq.calibration.data import tokenize

    model = load_minilm()
    samples = tokenize(SENTENCES, model.inputs, model.tokenizer)
    if args.build:
        only = {v.strip() for v in args.variants.split(",") if v.strip()} or None
        unknown = (only or set()) - {v[0] for v in VARIANTS}
        if unknown or (only and "fp32" not in only):
            parser.error(f"--variants: unknown {sorted(unknown)} or no fp32; labels: {[v[0] for v in VARIANTS]}")
        paths = build(model, args.build, STSB_DIR / "sts-dev.csv", 64, only)
    else:
        paths = {f"edgeq {p.name}": p / "model.tflite" for p in sorted(args.bundles.iterdir()) if (p / "model.tflite").is_file()}
    fp32 = paths["edgeq fp32"]
    converted = feeds(fp32, samples)
    calibration, evaluation = converted[: args.calibration], converted[args.calibration:] or converted
    for recipe_name in () if args.skip_aeq else ("static_wi8_ai8", "static_wi8_ai16", "dynamic_wi8_afp32", "static_fc_only_wi8_ai8", "static_fc_only_wi8_ai16"):
        try:
            paths[f"AEQ {recipe_name}"] = aeq(fp32, recipe_name, calibration, out)
        except Exception as exc:  # report and go on: the comparison is the point
            print(f"AEQ {recipe_name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    reference = embeddings(fp32, evaluation)
    to_pytorch = pytorch_cosines(model, paths, args.stsb)
    for label, path in paths.items():
        by_type, float_compute, undelegated = census(path)
        print(f"\n## {label}  ({path.stat().st_size / 1e6:.1f} MB, cosine to FP32 PyTorch on {args.stsb} STS-B dev sentences "
              f"{to_pytorch[label]:.5f}, to FP32 tflite {cosine(embeddings(path, evaluation), reference):.5f})")
        for key, count in sorted(by_type.items(), key=lambda kv: -kv[1]):
            print(f"  {count:4d}  {key}")
        print(f"  float compute: {dict(float_compute)}")
        print(f"  not delegated to XNNPACK: {dict(collections.Counter(p.op_name for p in undelegated))}")
    slow = {label for label in paths if "ai16" in label}  # ~0.5 s a run (builtin int16 kernels): timed apart, fewer rounds
    medians = time_interleaved({k: v for k, v in paths.items() if k not in slow}, converted[0], args.rounds)
    medians.update(time_interleaved({k: v for k, v in paths.items() if k in slow}, converted[0], 5))
    print(f"\n| artifact (1 thread, {args.rounds} interleaved rounds) | median ms | FP32 / it | cosine to FP32 PyTorch | MB |\n|---|---|---|---|---|")
    for label, ms in medians.items():
        print(f"| {label} | {ms:.2f} | {medians['edgeq fp32'] / ms:.2f}x | {to_pytorch[label]:.5f} | {paths[label].stat().st_size / 1e6:.1f} |")
    if args.skip_kernels:
        return
    kernels = kernel_models(out, 4)
    for label, path in kernels.items():
        _, float_compute, undelegated = census(path)
        print(f"  {label}: float compute {dict(float_compute)}, not delegated {[p.op_name for p in undelegated]}")
    it_samples = {}
    for label, path in kernels.items():
        runner = interpreter(path).get_signature_runner()
        details = runner.get_input_details()
        rng = np.random.default_rng(1)  # static AEQ models take int8/int16 inputs: any codes time the same
        it_samples[label] = {n: (rng.standard_normal(d["shape"]) * (1 if d["dtype"] == np.float32 else 40)).astype(d["dtype"])
                             for n, d in details.items()}
    runners = {label: interpreter(p).get_signature_runner() for label, p in kernels.items()}
    calls = [lambda runner=runner, sample=it_samples[label]: runner(**sample) for label, runner in runners.items()]
    latencies = measure_interleaved(calls, warmup=5, min_runs=args.rounds * 5, max_runs=args.rounds * 5, target_s=0)
    print(f"\n| kernel model (1 thread) | median ms |\n|---|---|")
    for label, latency in zip(runners, latencies):
        print(f"| {label} | {latency.median_ms:.3f} |")


if __name__ == "__main__":
    main()
