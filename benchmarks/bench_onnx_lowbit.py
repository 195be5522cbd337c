"""ONNX Runtime low-bit artifacts (com.microsoft.MatMulNBits) against FP32: size, latency, and error by accuracy level.

A stack of 12 nn.Linear(768, 768) (K = 768, MiniLM's hidden width) with a ReLU between layers, converted by
edgeq's ONNX converter from round-to-nearest plans (MSE clipping; calibration/lowbit), one artifact per row:
  fp32             the converter's FP32 export (MatMul + Add)
  int4 g32 / g128  int4-weight, symmetric, groups of 32 / 128 along K (MatMulNBits bits=4, accuracy_level 1)
  int3 g32         int3-weight: 3-bit codes in the 4-bit container (bits=4)
  int2 g32         int2-weight as edgeq writes it (2-bit codes in the 4-bit container, bits=4), and the same codes
                   in MatMulNBits bits=2 at accuracy_level 1 and at 4 (the measurement behind that choice)
  int4-dynamic     int4 g32 at accuracy_level 4 (int8 activations quantized per block at run time)
For each:
  size       bytes of model.onnx, and the ratio to FP32
  latency    ORT CPU EP, ONE intra-op thread, ORT_ENABLE_ALL, batch 1 x sequence 128 and batch 1 x sequence 1;
             median of single runs, artifacts interleaved round by round (the machine is shared); ratio to FP32
  rel err    max |artifact - exact| / max |exact| at sequence 128, where `exact` is float64 numpy with the plan's
             dequantized weights: at accuracy_level 1 the kernel's fp32 rounding only (weight error excluded);
             the int4-dynamic row also shows the level-1 run of the same artifact (weight-exact vs kernel error)
  vs fp32 w  relative L2 error against the same float64 forward with the FP32 weights: weight rounding + kernel
             (round-to-nearest on random weights: only the ordering between rows means something)

Run:  .venv/bin/python benchmarks/bench_onnx_lowbit.py [--rounds 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTH = 768
LAYERS = 12  # as in the research microbenchmark (docs/research lowbit-prune-peers.md §2.5)


def stack(layers: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    blocks = []
    for index in range(layers):
        blocks.append(nn.Linear(WIDTH, WIDTH))
        if index < layers - 1:
            blocks.append(nn.ReLU())
    return nn.Sequential(*blocks).eval(), (torch.randn(1, 128, WIDTH),)


def plan_for(model, precision, bits: int, group: int | None):
    from torch import nn

    from edgeq.calibration.lowbit import to_plan
    from edgeq.calibration.lowbit.grid import Grid
    from edgeq.calibration.lowbit.rtn import rtn
    from edgeq.compress.apply import user_fqn
    from edgeq.plan import OpKind, QuantPlan

    plan = QuantPlan(precision.value, "onnx")
    for name, module in model.module.named_modules():
        if isinstance(module, nn.Linear):
            fqn = user_fqn(name)
            plan.layers[fqn] = to_plan.layer_plan(fqn, OpKind.LINEAR, rtn(module.weight.detach(), Grid(bits, group, True), "mse"))
    return plan


def convert(model, precision, plan, dest: Path) -> Path:
    from edgeq.converters import get_converter
    from edgeq.converters.base import ConversionRequest
    from edgeq.targets import load_profile

    profile = load_profile("onnx")
    profile = replace(profile, precisions=tuple(dict.fromkeys((*profile.precisions, precision))))
    converter = get_converter(profile.runtime)
    request = ConversionRequest(model, profile, precision, plan)
    if converter.check(request):
        raise SystemExit(f"refused: {converter.check(request)}")
    return converter.convert(request, dest).path


def two_bit_container(path: Path, dest: Path) -> Path:
    """The int2 artifact's codes re-stored in MatMulNBits bits=2 (exact: codes c + 2 with the default zero point)."""
    import onnx
    from onnx import helper, numpy_helper

    from edgeq.converters.onnx_lowbit import pack_rows, unpack_layer
    from edgeq.plan import QDtype

    proto = onnx.load(str(path))
    tensors = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        codes, _, _ = unpack_layer(numpy_helper.to_array(tensors[node.input[1]]), numpy_helper.to_array(tensors[node.input[2]]),
                                   None, attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"], QDtype.INT2)
        packed = pack_rows((codes.astype(np.int32) + 2).astype(np.uint8), 2).reshape(attrs["N"], -1, attrs["block_size"] // 4)
        tensors[node.input[1]].CopyFrom(numpy_helper.from_array(packed, node.input[1]))
        kept = [a for a in node.attribute if a.name != "bits"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("bits", 2)])
    onnx.save(proto, str(dest))
    return dest


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def exact_output(model_plan, model, x: np.ndarray) -> np.ndarray:
    """float64 forward with the plan's dequantized weights (or the float ones)."""
    from torch import nn

    from edgeq.compress.apply import user_fqn

    h = x.astype(np.float64)
    for name, module in model.module.named_modules():
        if isinstance(module, nn.Linear):
            layer = model_plan.layers.get(user_fqn(name)) if model_plan else None
            weight = layer.weight.dequantize(layer.weight_codes) if layer else module.weight.detach().numpy()
            h = h @ weight.astype(np.float64).T + module.bias.detach().numpy().astype(np.float64)
        elif isinstance(module, nn.ReLU):
            h = np.maximum(h, 0)
    return h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from edgeq.load import load_model
    from edgeq.signature import parse_input_spec
    from edgeq.targets import Precision

    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-onnx-lowbit-"))
    out.mkdir(parents=True, exist_ok=True)
    # the sequence axis is dynamic, so one artifact runs at 128 tokens and at 1
    model = load_model("benchmarks.bench_onnx_lowbit:stack_default", inputs=[parse_input_spec(f"input:1xseq=128x{WIDTH}")])
    rows = [("fp32", Precision.FP32, None, None)]
    rows += [
        ("int4 g32", Precision.INT4_WEIGHT, 4, 32),
        ("int4 g128", Precision.INT4_WEIGHT, 4, 128),
        ("int3 g32", Precision.INT3_WEIGHT, 3, 32),
        ("int2 g32", Precision.INT2_WEIGHT, 2, 32),
        ("int4-dynamic g32", Precision.INT4_DYNAMIC, 4, 32),
    ]
    artifacts, plans = {}, {}
    for label, precision, bits, group in rows:
        started = time.perf_counter()
        plan = plan_for(model, precision, bits, group) if bits else None
        path = convert(model, precision, plan, out / f"{label.replace(' ', '_')}.onnx")
        artifacts[label], plans[label] = path, plan
        print(f"  converted {label} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    import onnx

    from edgeq.converters.onnx_lowbit import with_accuracy_level

    two_bit = two_bit_container(artifacts["int2 g32"], out / "int2_g32_bits2.onnx")
    extra = {
        "int2 g32 bits=2 @ level 1": with_accuracy_level(onnx.load(str(two_bit)), 1),
        "int2 g32 bits=2 @ level 4": with_accuracy_level(onnx.load(str(two_bit)), 4),
        "int4-dynamic g32 @ level 1": with_accuracy_level(onnx.load(str(artifacts["int4-dynamic g32"])), 1),
    }
    for label, proto in extra.items():
        path = out / f"{label.replace(' ', '_').replace('@', 'at').replace('=', '')}.onnx"
        onnx.save(proto, str(path))
        artifacts[label], plans[label] = path, plans[label.split(" @")[0].removesuffix(" bits=2")]

    rng = np.random.default_rng(0)
    feeds = {seq: rng.standard_normal((1, seq, WIDTH)).astype(np.float32) for seq in (128, 1)}
    sessions = {label: session(path) for label, path in artifacts.items()}
    name = model.input_names[0]
    errors, weight_errors = {}, {}
    float_exact = exact_output(None, model, feeds[128])
    for label, run in sessions.items():
        exact = exact_output(plans[label], model, feeds[128])
        got = run.run(None, {name: feeds[128]})[0].astype(np.float64)
        errors[label] = float(np.max(np.abs(got - exact)) / np.max(np.abs(exact)))
        weight_errors[label] = float(np.linalg.norm(got - float_exact) / np.linalg.norm(float_exact))
    times = {(label, seq): [] for label in sessions for seq in feeds}
    for seq, x in feeds.items():  # warm-up
        for run in sessions.values():
            for _ in range(3):
                run.run(None, {name: x})
    for _ in range(args.rounds):
        for seq, x in feeds.items():
            for label, run in sessions.items():
                started = time.perf_counter()
                run.run(None, {name: x})
                times[(label, seq)].append((time.perf_counter() - started) * 1000)

    median = {key: statistics.median(values) for key, values in times.items()}
    fp32_size = artifacts["fp32"].stat().st_size
    print(f"onnxruntime {ort.__version__}, 1 thread, {LAYERS} x Linear({WIDTH}, {WIDTH}) + ReLU, "
          f"median of {args.rounds} interleaved runs; artifacts in {out}")
    print(f"{'artifact':28} {'bytes':>10} {'x fp32':>7} {'bits/w':>6} {'seq128 ms':>10} {'x fp32':>7} {'seq1 ms':>8} {'x fp32':>7} {'rel err':>9} {'vs fp32 w':>9}")
    weights = LAYERS * WIDTH * WIDTH
    for label, path in artifacts.items():
        size = path.stat().st_size
        print(
            f"{label:28} {size:>10} {size / fp32_size:>7.3f} {8 * size / weights:>6.2f} "
            f"{median[(label, 128)]:>10.2f} {median[(label, 128)] / median[('fp32', 128)]:>7.2f} "
            f"{median[(label, 1)]:>8.3f} {median[(label, 1)] / median[('fp32', 1)]:>7.2f} {errors[label]:>9.2e} {weight_errors[label]:>9.2e}"
        )


def stack_default():
    return stack(LAYERS)


if __name__ == "__main__":
    main()
