"""Weight parity for `.tflite`: read each planned layer's int8 codes and per-channel scales back from the file.

The reader parses the flatbuffer with LiteRT's own schema (`ai_edge_litert.schema_py_generated`) rather than
running an interpreter: constants are read as stored, with no kernel preparing or repacking them.

A weight is the constant a computing op multiplies by (FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D,
EMBEDDING_LOOKUP, GATHER), read directly or through the DEQUANTIZE op that feeds it. edgeq's TFLite converter
names each planned layer's weight `<torch FQN>.weight` (converters/tflite.py, `lower_plan`), so a layer is
found by name, and its layout comes from the op that uses it:
  FULLY_CONNECTED / EMBEDDING_LOOKUP / GATHER  [out, in] / [rows, dim]    quantized_dimension 0 (as PyTorch)
  CONV_2D                                      [O, kh, kw, I]  (OHWI)      quantized_dimension 0
  DEPTHWISE_CONV_2D                            [1, kh, kw, C]              quantized_dimension 3
Codes come back in PyTorch's layout (Linear [out, in], Conv [O, I/groups, kh, kw]). A Conv1d runs as CONV_2D
over [O, 1, k, I]; the op cannot tell it from a Conv2d with a (1, k) kernel, so the converter names it
`<fqn>.weight.conv1d` and the reader drops the kernel-height axis ([O, I, k], as PyTorch stores it); a depthwise
Conv1d runs as DEPTHWISE_CONV_2D over [1, 1, k, C], read back the same way.

Low-bit weights (converters/tflite_lowbit.py) are INT4 / INT2 tensors packed row-major, lowest bits first
(two int4 or four int2 codes per byte, sign-extended), as LiteRT and ai-edge-quantizer pack them. Per channel
they carry `scale` [N] like int8; blockwise, `details` is a BlockwiseQuantization naming a FLOAT16 scales
tensor [N, K / block_size], read back as float32 [N, K / block_size] (the plan's per-group scale shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.converters.parity import StoredWeights
from edgeq.converters.tflite_fold_lookups import ROWS_NAME

WEIGHT_SUFFIX = ".weight"
CONV1D_SUFFIX = ".weight.conv1d"
# op -> (index of its weight operand, permutation from the TFLite layout to PyTorch's, TFLite channel axis)
WEIGHT_OPS = {
    "FULLY_CONNECTED": (1, (0, 1), 0),
    "CONV_2D": (1, (0, 3, 1, 2), 0),
    "DEPTHWISE_CONV_2D": (1, (3, 0, 1, 2), 3),
    "EMBEDDING_LOOKUP": (1, (0, 1), 0),
    "GATHER": (0, (0, 1), 0),
}
_NUMPY_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8}
INT8 = 9
INT4 = 17
INT2 = 19
PACKED_BITS = {INT4: 4, INT2: 2}  # sub-byte signed types: codes per byte = 8 / bits
BLOCKWISE = 2  # QuantizationDetails.BlockwiseQuantization


@dataclass
class WeightUse:
    """A constant that an op computes with: the stored tensor, the op, and the DEQUANTIZE between them."""

    tensor: int  # index of the stored constant (int8 codes, or float weights)
    op: int  # index of the operator that computes with it
    op_name: str
    operand: int  # position of the weight among the op's inputs
    dequantize: int | None  # index of the DEQUANTIZE operator in between, if any


def builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}


def read_model(data: bytes):
    """The flatbuffer as LiteRT's mutable object tree (ModelT); buffers stored by offset are resolved."""
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def op_names(model) -> list[str]:
    """Builtin op name of every operator code (custom ops by their custom name)."""
    from ai_edge_litert.tools import flatbuffer_utils

    builtins = builtin_names()
    names = []
    for code in model.operatorCodes:
        builtin = flatbuffer_utils.get_builtin_code_from_operator_code(code)
        custom = code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode
        names.append(custom or builtins.get(builtin, str(builtin)))
    return names


def tensor_name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else (tensor.name or "")


def constant(model, tensor) -> np.ndarray | None:
    """The stored values of a constant tensor (None for activations), in its TFLite shape; sub-byte INT4/INT2
    codes unpacked to int8, one per element."""
    buffer = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
    if buffer is None or buffer.data is None or len(buffer.data) == 0:
        return None
    raw = np.asarray(buffer.data, dtype=np.uint8)
    shape = [int(d) for d in tensor.shape] if tensor.shape is not None else None
    if tensor.type in PACKED_BITS:
        if shape is None:
            return None
        return unpack_codes(raw, PACKED_BITS[tensor.type], int(np.prod(shape))).reshape(shape)
    if tensor.type not in _NUMPY_TYPES:
        return None
    data = np.frombuffer(raw.tobytes(), dtype=_NUMPY_TYPES[tensor.type])
    return data.reshape(shape) if shape is not None else data


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed `bits`-bit codes (any shape, one per element) packed row-major into uint8, lowest bits first:
    LiteRT's layout for INT4 (two per byte) and INT2 (four per byte); a last partial byte is zero-padded."""
    per_byte = 8 // bits
    flat = (np.ravel(codes).astype(np.int16) & ((1 << bits) - 1)).astype(np.uint8)
    flat = np.concatenate([flat, np.zeros(-flat.size % per_byte, np.uint8)]).reshape(-1, per_byte)
    packed = np.zeros(flat.shape[0], np.uint8)
    for slot in range(per_byte):
        packed |= flat[:, slot] << np.uint8(slot * bits)
    return packed


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` signed codes of `packed` (pack_codes' layout), sign-extended to int8."""
    per_byte = 8 // bits
    packed = np.asarray(packed, dtype=np.uint8)
    slots = [(packed >> np.uint8(slot * bits)) & np.uint8((1 << bits) - 1) for slot in range(per_byte)]
    values = np.stack(slots, axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(values >= 1 << (bits - 1), values - (1 << bits), values).astype(np.int8)


def blockwise_scales(model, subgraph, tensor) -> np.ndarray | None:
    """The float32 [N, K / block_size] scales of a blockwise-quantized [N, K] weight, or None if it is not one
    (or its scales are not a FLOAT16 table of that shape, which is all LiteRT's kernels take)."""
    quant = tensor.quantization
    if quant is None or quant.detailsType != BLOCKWISE or quant.details is None or len(tensor.shape) != 2:
        return None
    rows, columns = (int(d) for d in tensor.shape)
    block = int(quant.details.blockSize)
    table = subgraph.tensors[quant.details.scales] if 0 <= quant.details.scales < len(subgraph.tensors) else None
    scales = constant(model, table) if table is not None and table.type == 1 else None
    if block <= 0 or columns % block or scales is None or scales.shape != (rows, columns // block):
        return None
    return scales.astype(np.float32)


def weight_uses(model, subgraph, names: list[str]) -> list[WeightUse]:
    """Every constant that a FULLY_CONNECTED/CONV_2D/DEPTHWISE_CONV_2D/EMBEDDING_LOOKUP/GATHER computes with."""
    producers = {out: index for index, op in enumerate(subgraph.operators) for out in (op.outputs or [])}
    uses = []
    for index, op in enumerate(subgraph.operators):
        name = names[op.opcodeIndex]
        if name not in WEIGHT_OPS or len(op.inputs) <= WEIGHT_OPS[name][0]:
            continue
        operand = WEIGHT_OPS[name][0]
        tensor, dequantize = op.inputs[operand], None
        if tensor < 0:
            continue
        producer = producers.get(tensor)
        if producer is not None and names[subgraph.operators[producer].opcodeIndex] == "DEQUANTIZE":
            dequantize, tensor = producer, subgraph.operators[producer].inputs[0]
            if tensor in producers:
                continue  # a run-time quantized activation, not a stored weight
        elif producer is not None:
            continue
        if constant(model, subgraph.tensors[tensor]) is not None:
            uses.append(WeightUse(tensor, index, name, operand, dequantize))
    return uses


def tflite_weights(path: Path) -> StoredWeights:
    """Codes (PyTorch layout) and scales of every int8/int4/int2 per-channel weight, and of every blockwise
    INT4 FULLY_CONNECTED weight or EMBEDDING_LOOKUP table (scales [N, K / block_size]), named `<fqn>.weight`.

    A weight stored float, per tensor, or along another axis than the op's output channels is left out
    of `quantized` (parity then reports the layer as not quantized); its name still marks the layer present.
    """
    model = read_model(Path(path).read_bytes())
    names = op_names(model)
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    stored_names: set[str] = set()
    for subgraph in model.subgraphs:
        stored_names.update(tensor_name(t) for t in subgraph.tensors)
        for use in weight_uses(model, subgraph, names):
            tensor = subgraph.tensors[use.tensor]
            name = tensor_name(tensor)
            quant = tensor.quantization
            suffix = next((x for x in (WEIGHT_SUFFIX, CONV1D_SUFFIX) if name.endswith(x)), None)
            if suffix is None or tensor.type not in (INT8, *PACKED_BITS) or quant is None:
                continue
            if quant.detailsType == BLOCKWISE:
                scales = blockwise_scales(model, subgraph, tensor) if use.op_name in ("FULLY_CONNECTED", "EMBEDDING_LOOKUP") else None
                if scales is not None and suffix == WEIGHT_SUFFIX:
                    found[name.removesuffix(suffix)] = (np.ascontiguousarray(constant(model, tensor)), scales)
                continue
            if quant.scale is None:
                continue
            _, to_torch, channel_axis = WEIGHT_OPS[use.op_name]
            codes = constant(model, tensor)
            scale = np.asarray(quant.scale, dtype=np.float32)
            if codes.ndim != len(to_torch) or quant.quantizedDimension != channel_axis or scale.size != codes.shape[channel_axis]:
                continue
            if quant.zeroPoint is not None and np.any(np.asarray(quant.zeroPoint) != 0):
                continue  # TFLite int8 weights are symmetric; a non-zero zero point is not the plan's
            codes = codes.transpose(to_torch)
            if suffix == CONV1D_SUFFIX and use.op_name in ("CONV_2D", "DEPTHWISE_CONV_2D") and codes.shape[2] == 1:
                codes = codes[:, :, 0, :]
            found[name.removesuffix(suffix)] = (np.ascontiguousarray(codes), scale)
    folded = {}
    for subgraph in model.subgraphs:  # tables folded into the rows a constant lookup produced
        for tensor in subgraph.tensors:
            match = ROWS_NAME.match(tensor_name(tensor))
            values = constant(model, tensor) if match else None
            if values is not None and values.dtype == np.float32:
                start, stop = int(match["start"]), int(match["stop"])
                if values.size % max(stop - start, 1) == 0:
                    folded[match["fqn"]] = (start, values.reshape(stop - start, -1))
    return StoredWeights(found, stored_names, folded_rows=folded)
