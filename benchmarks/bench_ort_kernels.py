"""ONNX Runtime CPU kernels that edgeq's ONNX artifacts lean on, timed alone on the CPU this runs on.

Needs only numpy, onnx and onnxruntime (no torch, no edgeq), so it runs unchanged on a device-lab machine or a
lent server with another CPU (e.g. one with AVX-512 VNNI) and answers "is this figure the CPU or the graph?".

The model is MiniLM's linear work without attention: LAYERS blocks of four 384x384 projections, 384->1536 and
1536->384 (hidden 384, feed-forward 1536), random weights, each MatMul followed by its bias Add. Rows:
  fp32            MatMul + Add
  int8 dynamic    ORT's own quantize_dynamic on the fp32 file (per channel; DynamicQuantizeLinear + MatMulInteger)
  int8 static     ORT's quantize_static on the fp32 file (QDQ, per channel, int8 activations, calibrated on the
                  random inputs)
  int4 gG level L com.microsoft.MatMulNBits bits 4, symmetric blocks of G along K, accuracy_level L
                  (1: fp32 math on dequantized weights; 4: int8 activations per block, integer dot products)
Latency: median of single runs, batch 1 at sequence 128 and at 1 token (decode-shaped: weight bandwidth
dominates), rows interleaved round by round, ORT_ENABLE_ALL, spinning off; ratio = fp32 median / row median
(above 1: faster than fp32). Error: relative L2 of the row's output against fp32 at sequence 128.

Run:  python benchmarks/bench_ort_kernels.py [--threads 1] [--rounds 50] [--layers 6]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HIDDEN, FFN = 384, 1536


def cpu_description() -> str:
    """The CPU model and the integer-dot-product extensions the int8/int4 kernels can use."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    return f"{model}; {os.cpu_count()} cores; " + ", ".join(f for f in wanted if f in flags)


def fp32_model(layers: int, rng: np.random.Generator) -> onnx.ModelProto:
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, FFN), (FFN, HIDDEN)]
    nodes, inits, x = [], [], "x"
    for block in range(layers):
        for j, (k, n) in enumerate(shapes):
            # The four projections all read the block input (q, k, v, out are not chained in attention, but the
            # chain keeps the graph simple; the MatMul shapes and weight bytes are MiniLM's).
            name = f"b{block}_{j}"
            w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(np.zeros(n, np.float32) + 0.01, f"{name}_b")]
            nodes += [helper.make_node("MatMul", [x, f"{name}_w"], [f"{name}_mm"]), helper.make_node("Add", [f"{name}_mm", f"{name}_b"], [f"{name}_y"])]
            x = f"{name}_y"
            if j == 4:  # the feed-forward's activation, so int8 static has something between Q/DQ pairs
                nodes.append(helper.make_node("Relu", [x], [f"{name}_r"]))
                x = f"{name}_r"
    graph = helper.make_graph(
        nodes, "linears",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", HIDDEN])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "seq", HIDDEN])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def nbits_model(path: Path, block: int, level: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(path), bits=4, block_size=block, is_symmetric=True, accuracy_level=level)
    quantizer.process()
    return quantizer.model.model


def int8_models(path: Path, folder: Path, rng: np.random.Generator) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    dynamic, static = folder / "dynamic.onnx", folder / "static.onnx"
    quantize_dynamic(str(path), str(dynamic), per_channel=True, weight_type=QuantType.QInt8)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter([{"x": rng.standard_normal((1, 128, HIDDEN)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.samples, None)

    quantize_static(str(path), str(static), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return {"int8 dynamic (ORT quantize_dynamic)": dynamic, "int8 static QDQ (ORT quantize_static)": static}


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fp32 = folder / "fp32.onnx"
        onnx.save(fp32_model(args.layers, rng), fp32)
        paths = {"fp32": fp32, **int8_models(fp32, folder, rng)}
        for block in (32, 128):
            for level in (1, 4):
                path = folder / f"int4_g{block}_l{level}.onnx"
                onnx.save(nbits_model(fp32, block, level), path)
                paths[f"int4 g{block} MatMulNBits level {level}"] = path
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        inputs = {seq: {"x": rng.standard_normal((1, seq, HIDDEN)).astype(np.float32)} for seq in (128, 1)}
        reference = sessions["fp32"].run(None, inputs[128])[0]
        errors = {}
        for name, sess in sessions.items():
            out = sess.run(None, inputs[128])[0]
            errors[name] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        times = {(name, seq): [] for name in sessions for seq in inputs}
        for _ in range(args.rounds):
            for seq, feed in inputs.items():
                for name, sess in sessions.items():
                    start = time.perf_counter()
                    sess.run(None, feed)
                    times[(name, seq)].append(time.perf_counter() - start)
        print(f"CPU: {cpu_description()}")
        print(f"onnxruntime {ort.__version__}; {args.threads} intra-op thread(s), spinning off; {args.layers} MiniLM-shaped blocks; "
              f"{args.rounds} interleaved rounds; load {os.getloadavg()[0]:.1f}\n")
        print(f"{'row':44} {'MB':>6} {'rel err':>8} {'ms@128':>8} {'vs fp32':>15} {'ms@1':>7} {'vs fp32':>15}")
        base = {seq: statistics.median(times[("fp32", seq)]) for seq in inputs}
        for name, path in paths.items():
            cells = []
            for seq in (128, 1):
                median = statistics.median(times[(name, seq)])
                ratio = base[seq] / median
                wording = "baseline" if name == "fp32" else "same" if round(ratio, 2) == 1 else f"{ratio:.2f}x faster" if ratio > 1 else f"{ratio:.2f}x: slower"
                cells.append(f"{median * 1e3:8.3f} {wording:>15}")
            print(f"{name:44} {path.stat().st_size / 1e6:6.2f} {errors[name]:8.4f} {cells[0]} {cells[1]}")


if __name__ == "__main__":
    main()
