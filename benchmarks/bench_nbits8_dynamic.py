"""int8 weights as com.microsoft.MatMulNBits (bits=8, accuracy_level 4) against ORT's dynamic int8 kernels (issue 12).

Question: with MatMulNBits at level 4, MLAS quantizes activations per block of K per row, much finer than the
per-tensor DynamicQuantizeLinear, so SmoothQuant (and its runtime Muls) might become unnecessary. This times the
kernels alone: MiniLM's linears (six blocks of four 384x384, 384->1536, 1536->384; random weights, bias Add after
each), per-channel int8 weights written as blockwise scales repeated along K (block 16..256), against ORT's own
quantize_dynamic (per channel) on the same fp32 graph. One thread, spinning off, rows interleaved, median.
Needs only numpy, onnx and onnxruntime, so it runs unchanged on another CPU.

Run:  python benchmarks/bench_nbits8_dynamic.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN, FFN, LAYERS = 384, 1536, 6
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, FFN), (FFN, HIDDEN)]  # (K, N) of one block's linears
BLOCKS = (16, 32, 64, 128, 256)


def linear_model(weights: list[np.ndarray], biases: list[np.ndarray], block: int | None) -> onnx.ModelProto:
    """A chain of x @ W + b; `block` None: fp32 MatMul, else MatMulNBits bits=8 level 4 holding per-channel int8
    codes (symmetric, stored code + 128) with each output channel's scale repeated over its K blocks."""
    nodes, initializers, x = [], [], "x"
    for i, (w, b) in enumerate(zip(weights, biases)):
        k, n = w.shape
        if block is None:
            initializers.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        else:
            scale = np.abs(w).max(axis=0) / 127.0
            codes = np.clip(np.round(w / scale), -127, 127).astype(np.int32)
            k_blocks = -(-k // block)
            stored = np.full((n, k_blocks * block), 128, np.uint8)  # padding past K: the zero point, dequantizes to 0
            stored[:, :k] = (codes.T + 128).astype(np.uint8)
            initializers += [numpy_helper.from_array(stored.reshape(n, k_blocks, block), f"w{i}.packed"),
                             numpy_helper.from_array(np.repeat(scale, k_blocks).astype(np.float32), f"w{i}.scale")]
            nodes.append(helper.make_node("MatMulNBits", [x, f"w{i}.packed", f"w{i}.scale"], [f"y{i}"], domain="com.microsoft",
                                          K=k, N=n, bits=8, block_size=block, accuracy_level=4))
        initializers.append(numpy_helper.from_array(b, f"b{i}"))
        nodes.append(helper.make_node("Add", [f"y{i}", f"b{i}"], [f"x{i}"]))
        x = f"x{i}"
    graph = helper.make_graph(nodes, "linears", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], initializers)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)  # ORT 1.30 reads IR <= 13


def session(path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(shape).astype(np.float32) * 0.05 for _ in range(LAYERS) for shape in SHAPES]
    biases = [rng.standard_normal(w.shape[1]).astype(np.float32) * 0.01 for w in weights]
    folder = Path(tempfile.mkdtemp(prefix="edgeq-nbits8-"))
    paths = {"fp32": folder / "fp32.onnx", "ORT quantize_dynamic": folder / "dynamic.onnx"}
    onnx.save(linear_model(weights, biases, None), paths["fp32"])
    quantize_dynamic(str(paths["fp32"]), str(paths["ORT quantize_dynamic"]), per_channel=True, weight_type=QuantType.QInt8)
    for block in BLOCKS:
        paths[f"MatMulNBits 8-bit block {block} level 4"] = folder / f"nbits8_{block}.onnx"
        onnx.save(linear_model(weights, biases, block), paths[f"MatMulNBits 8-bit block {block} level 4"])
    sessions = {label: session(path) for label, path in paths.items()}
    print(f"onnxruntime {ort.__version__}, one thread, {rounds} interleaved rounds\n\n| row | seq | median ms | fp32 / it | rel. err vs fp32 |\n|---|---|---|---|---|")
    for seq in (128, 1):
        feed = {"x": rng.standard_normal((1, seq, HIDDEN)).astype(np.float32)}
        times = {label: [] for label in sessions}
        for s in sessions.values():
            for _ in range(3):
                s.run(None, feed)
        for _ in range(rounds):
            for label, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feed)
                times[label].append((time.perf_counter() - start) * 1e3)
        reference = sessions["fp32"].run(None, feed)[0]
        fp32 = statistics.median(times["fp32"])
        for label, s in sessions.items():
            error = np.linalg.norm(s.run(None, feed)[0] - reference) / np.linalg.norm(reference)
            median = statistics.median(times[label])
            print(f"| {label} | {seq} | {median:.2f} | {fp32 / median:.2f}x | {error:.4f} |")


if __name__ == "__main__":
    main()
