"""LiteRT int4 (int4-dynamic) against FP32 on a stack of 768x768 linear layers: size and latency, one thread.

The model is `--layers` (12) nn.Linear(768, 768) with ReLUs between (MiniLM's hidden width), converted by edgeq's
TFLite converter at a static sequence length of 128 (encoder / prefill) and 1 (a single token, where reading
the weights dominates). Low-bit plans are round-to-nearest with MSE clipping on LiteRT's grid (symmetric int4,
block scales rounded up to bfloat16), groups of 32 and 128; the packer writes them exactly (parity checked).
For reference, ai-edge-quantizer's own `dynamic_wi4b32_afp32` recipe applied to edgeq's FP32 file, and at
sequence 1 the same int4 artifact on LiteRT's builtin kernels (no XNNPACK: what an undelegated layer costs).

Per artifact:
  size      bytes of the .tflite, and the ratio to FP32
  sqnr      dB of the artifact's output against PyTorch with the plan's dequantized weights (the runtime's own
            error: int8 activations per row), and against the FP32 model (weights + runtime)
  latency   median of single runs (validate/latency.py), best of --rounds interleaved rounds, one thread

Run:  .venv/bin/python benchmarks/bench_tflite_lowbit.py [--layers 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTH = 768
SEQUENCES = (128, 1)
GROUPS = (32, 128)
LAYERS = 12  # set by --layers


def stack_model(layers: int, seq: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    modules = []
    for _ in range(layers):
        modules += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    stack = nn.Sequential(*modules[:-1]).eval()
    for layer in stack[::2]:  # He init: the signal keeps its size through 12 ReLUs (PyTorch's default shrinks it)
        nn.init.normal_(layer.weight, std=(2 / WIDTH) ** 0.5)
        nn.init.normal_(layer.bias, std=0.01)
    return stack, (torch.randn(1, seq, WIDTH),)


def model_seq128():  # edgeq loads models by `module:callable`
    return stack_model(LAYERS, 128)


def model_seq1():
    return stack_model(LAYERS, 1)


def int4_plan(module, group: int):
    """RTN (MSE clipping) on LiteRT's grid: symmetric int4, block scales on the bfloat16 grid."""
    from edgeq.calibration.lowbit.grid import Grid
    from edgeq.calibration.lowbit.rtn import rtn
    from edgeq.calibration.lowbit.to_plan import layer_plan
    from edgeq.compress.apply import quantizable_layers
    from edgeq.plan import OpKind, QDtype, QuantPlan

    plan = QuantPlan("int4-dynamic", "tflite-xnnpack")
    grid = Grid(4, group, symmetric=True, scale_dtype="bfloat16")
    for fqn, layer in quantizable_layers(module):
        plan.layers[fqn] = layer_plan(fqn, OpKind.LINEAR, rtn(layer.weight.detach(), grid, "mse"))
        plan.layers[fqn].dynamic_activation = QDtype.INT8
    return plan


def dequantized(module, plan):
    import copy

    import torch

    from edgeq.compress.apply import quantizable_layers

    result = copy.deepcopy(module)
    layers = dict(quantizable_layers(result))
    with torch.no_grad():
        for fqn, entry in plan.layers.items():
            layers[fqn].weight.copy_(torch.from_numpy(entry.weight.dequantize(entry.weight_codes)))
    return result


def build(layers: int, seq: int, out: Path) -> tuple[list[tuple[str, Path, dict]], dict]:
    """(name, artifact, runner settings) per artifact at this sequence length, and torch reference outputs."""
    import torch

    from edgeq.converters import ConversionRequest
    from edgeq.converters.parity import artifact_weights, compare_weights
    from edgeq.converters.tflite import TFLiteConverter
    from edgeq.load import load_model
    from edgeq.targets import Precision, load_profile

    loaded = load_model(f"benchmarks.bench_tflite_lowbit:model_seq{seq}")
    profile = load_profile("tflite-xnnpack")
    converter = TFLiteConverter()
    x = loaded.example_inputs[0]
    with torch.no_grad():
        references = {"fp32": loaded.module(x)[0].numpy()}
    artifacts = []
    fp32 = out / f"fp32-s{seq}.tflite"
    converter.convert(ConversionRequest(loaded, profile, Precision.FP32), fp32)
    artifacts.append(("fp32", fp32, {}))
    for group in GROUPS:
        plan = int4_plan(loaded.module, group)
        path = out / f"int4-g{group}-s{seq}.tflite"
        converter.convert(ConversionRequest(loaded, profile, Precision.INT4_DYNAMIC, plan), path)
        parity = compare_weights(plan, artifact_weights(path, "tflite"))
        if parity.mismatches or parity.missing or parity.checked != layers:
            raise SystemExit(f"int4 g{group}: weight parity failed: {parity.to_json()}")
        with torch.no_grad():
            references[f"int4-g{group}"] = dequantized(loaded.module, plan)(x)[0].numpy()
        artifacts.append((f"int4-g{group}", path, {}))
        if group == GROUPS[0] and seq == 1:
            artifacts.append((f"int4-g{group} builtin", path, {"builtin": True}))
    artifacts.append(("AEQ wi4b32", aeq_blockwise(fp32, out / f"aeq-b32-s{seq}.tflite"), {}))
    return artifacts, {"input": x.numpy(), **references}


def aeq_blockwise(fp32: Path, dest: Path) -> Path:
    from ai_edge_quantizer import quantizer, recipe

    from edgeq.converters.tracing import quiet

    with quiet():
        result = quantizer.Quantizer(bytearray(fp32.read_bytes()), recipe.dynamic_wi4b32_afp32()).quantize()
    dest.write_bytes(bytes(result.quantized_model))
    return dest


def open_interpreter(path: Path, builtin: bool):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    options = {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES} if builtin else {}
    interpreter = Interpreter(model_path=str(path), num_threads=1, **options)
    interpreter.allocate_tensors()
    return interpreter


def run_once(interpreter, x: np.ndarray) -> np.ndarray:
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def sqnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    from edgeq.validate.metrics import sqnr_db

    return sqnr_db(reference, candidate)


def measure_all(artifacts, data, rounds: int) -> list[dict]:
    from edgeq.validate.latency import measure
    from edgeq.validate.runners.litert_delegation import op_placements

    interpreters = {name: open_interpreter(path, settings.get("builtin", False)) for name, path, settings in artifacts}
    rows = {}
    for name, path, settings in artifacts:
        interpreter = interpreters[name]
        output = run_once(interpreter, data["input"])
        fcs = [p for p in op_placements(interpreter) if p.op_name == "FULLY_CONNECTED"]
        own = data.get(name.split(" ")[0], data["fp32"])
        rows[name] = {
            "artifact": name, "size_bytes": path.stat().st_size, "fc_delegated": f"{sum(p.delegated for p in fcs)}/{len(fcs)}",
            "sqnr_vs_own_weights_db": sqnr(own, output), "sqnr_vs_fp32_db": sqnr(data["fp32"], output), "median_ms": [],
        }
    for _ in range(rounds):  # interleaved, so machine load hits every artifact alike
        for name, interpreter in interpreters.items():
            slow = "builtin" in name
            latency = measure(lambda: run_once(interpreter, data["input"]), target_s=0.3 if slow else 1.0, min_runs=5 if slow else 10)
            rows[name]["median_ms"].append(latency.median_ms)
    return list(rows.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    global LAYERS
    LAYERS = args.layers
    sys.modules.setdefault("benchmarks.bench_tflite_lowbit", sys.modules[__name__])  # run as a script: one module
    import ai_edge_litert

    print(f"host {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}, ai-edge-litert {ai_edge_litert.__version__}, "
          f"{args.layers} x Linear({WIDTH},{WIDTH}), one thread, best median of {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as folder:
        for seq in SEQUENCES:
            artifacts, data = build(args.layers, seq, Path(folder))
            rows = measure_all(artifacts, data, args.rounds)
            fp32 = next(r for r in rows if r["artifact"] == "fp32")
            print(f"\nsequence {seq}")
            print(f"{'artifact':<20} {'size':>10} {'x fp32':>7} {'FC on XNNPACK':>14} {'SQNR own dB':>12} {'SQNR fp32 dB':>13} {'median ms':>10} {'x fp32':>7}")
            for row in rows:
                best = min(row["median_ms"])
                print(f"{row['artifact']:<20} {row['size_bytes']:>10,} {row['size_bytes'] / fp32['size_bytes']:>7.3f} {row['fc_delegated']:>14} "
                      f"{row['sqnr_vs_own_weights_db']:>12.1f} {row['sqnr_vs_fp32_db']:>13.1f} {best:>10.3f} {best / min(fp32['median_ms']):>7.2f}")


if __name__ == "__main__":
    main()
