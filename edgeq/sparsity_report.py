"""How many of an artifact's weights are exact zeros, per layer and for the model, read from the artifact itself.

ONNX Runtime and LiteRT have no kernels that skip the zeros of unstructured or N:M sparsity (research:
shared/research/lowbit-prune-peers.md §7): a pruned model runs at dense speed and its file holds every zero.
The report shows the share instead, so a user sees that the zeros made it through quantization and export (and
how much a sparse format would save); Core ML stores such weights sparse (converters/coreml_sparse.py).

A weight counts as zero where the runtime computes with 0: a float 0, or a quantized code at its zero point.
Torch-free: numpy and the runtime's own reader (onnx, ai_edge_litert's flatbuffer schema, edgeq's MIL reader).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ONNX_WEIGHT_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,), "Gather": (0,)}


def artifact_zeros(path: Path | str, runtime: str) -> dict:
    """{"layers": {name: {"weights", "zeros", "share"}}, "weights", "zeros", "share"} over the artifact's weight
    tensors (what its matmuls, convolutions and lookups read), named by torch FQN where the artifact keeps one.
    runtime: "onnx", "tflite" or "coreml"."""
    readers = {"onnx": _onnx_zeros, "tflite": _tflite_zeros, "coreml": _coreml_zeros}
    if runtime not in readers:
        raise ValueError(f"no weight reader for runtime {runtime!r}; expected one of {', '.join(readers)}")
    layers = {name: _entry(zeros, count) for name, (zeros, count) in sorted(readers[runtime](Path(path)).items())}
    weights = sum(entry["weights"] for entry in layers.values())
    zeros = sum(entry["zeros"] for entry in layers.values())
    return {"layers": layers, "weights": weights, "zeros": zeros, "share": round(zeros / weights, 4) if weights else 0.0}


def _entry(zeros: int, count: int) -> dict:
    return {"weights": int(count), "zeros": int(zeros), "share": round(zeros / count, 4) if count else 0.0}


def _layer_name(name: str) -> str:
    for suffix in (".weight.codes.T", ".weight.codes", ".weight.packed", ".weight"):
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            break
    return name.removeprefix("inner.")


def _onnx_zeros(path: Path) -> dict[str, tuple[int, int]]:
    """Float weights read by MatMul/Gemm/Conv/Gather, and quantized codes (DequantizeLinear, MatMulNBits, ...)
    through the weight-parity reader, at their zero points."""
    import onnx
    from onnx import numpy_helper

    from edgeq.converters.parity import onnx_tensors, onnx_weights

    graph = onnx.load(str(path)).graph
    tensors = onnx_tensors(graph)
    found: dict[str, tuple[int, int]] = {}
    for node in graph.node:
        for index in _ONNX_WEIGHT_INPUTS.get(node.op_type, ()):
            name = node.input[index] if index < len(node.input) else ""
            if name not in tensors or name in found:
                continue
            values = numpy_helper.to_array(tensors[name])
            if values.ndim >= 2 and np.issubdtype(values.dtype, np.floating):
                found[name] = (int(np.count_nonzero(values == 0)), values.size)
    result = {_layer_name(name): counts for name, counts in found.items()}
    stored = onnx_weights(path)
    for fqn, (codes, _) in stored.quantized.items():
        zero = stored.zero_points.get(fqn)
        result[fqn] = (_zero_codes(codes, zero), codes.size)
    return result


def _zero_codes(codes: np.ndarray, zero: np.ndarray | None) -> int:
    """Codes equal to their zero point; `zero` [N] per row or [N, groups] per block of columns (None: 0)."""
    codes = np.asarray(codes).reshape(codes.shape[0], -1).astype(np.int32)
    if zero is None:
        return int(np.count_nonzero(codes == 0))
    zero = np.asarray(zero).reshape(codes.shape[0], -1).astype(np.int32)
    return int(np.count_nonzero(codes == np.repeat(zero, codes.shape[1] // zero.shape[1], axis=1)))


def _tflite_zeros(path: Path) -> dict[str, tuple[int, int]]:
    """Every constant a FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D / EMBEDDING_LOOKUP / GATHER reads (through a
    DEQUANTIZE for fp16 and dequantized weights): quantized codes at their per-tensor or per-channel zero point."""
    from edgeq.converters.parity_tflite import constant, op_names, read_model, tensor_name, weight_uses

    model = read_model(path.read_bytes())
    names = op_names(model)
    result: dict[str, tuple[int, int]] = {}
    for subgraph in model.subgraphs:
        for use in weight_uses(model, subgraph, names):
            tensor = subgraph.tensors[use.tensor]
            values = constant(model, tensor)
            if values is None or values.ndim < 2:
                continue
            zero = 0
            quant = tensor.quantization
            if quant is not None and quant.zeroPoint is not None and len(quant.zeroPoint) > 1:
                shape = [1] * values.ndim
                shape[quant.quantizedDimension] = -1
                zero = np.asarray(quant.zeroPoint).reshape(shape)
            elif quant is not None and quant.zeroPoint is not None and len(quant.zeroPoint) == 1:
                zero = int(quant.zeroPoint[0])
            result[_layer_name(tensor_name(tensor))] = (int(np.count_nonzero(values == zero)), values.size)
    return result


def _coreml_zeros(path: Path) -> dict[str, tuple[int, int]]:
    """Every constant the ML program computes with, materialized by the MIL reference executor (constexpr ops:
    dequantized, looked up, densified), rank 2 or more and float; edgeq-named weights by their FQN."""
    from edgeq.converters.parity_coreml import fqn_of
    from edgeq.validate.mil import MILExecutor

    executor = MILExecutor(path)
    result: dict[str, tuple[int, int]] = {}
    for op in executor.function.ops:
        if op.type != "const" and not op.type.startswith("constexpr_"):
            continue
        if op.type in ("constexpr_sparse_blockwise_shift_scale", "constexpr_lut_to_sparse"):
            continue  # the (mask, non-zeros) half of a sparse weight: its constexpr_sparse_to_dense is counted
        values = executor.constant(op.outputs[0][0])
        if not isinstance(values, np.ndarray) or values.ndim < 2 or not np.issubdtype(values.dtype, np.floating):
            continue
        decoded = fqn_of(op.name)
        name = _layer_name(decoded[0]) if decoded is not None else op.name
        result[name] = (int(np.count_nonzero(values == 0)), values.size)
    return result
