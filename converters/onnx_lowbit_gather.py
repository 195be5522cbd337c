"""ONNX Runtime quantized embedding tables: a plan's blockwise table codes as `com.microsoft.GatherBlockQuantized`.

The op gathers first and dequantizes only the gathered rows (never the whole table per call). Its contract, read
from the installed onnxruntime 1.32's own schema (`get_all_operator_schema`) and checked exact in
tests/converters/test_onnx_lowbit.py:
    output[i..., d] = (data[idx, d] - zero_points[idx, d // block_size]) * scales[idx, d // block_size]
    data         [V, D]: tensor(int4) (signed codes, default zero point 0) or tensor(uint4) (unsigned codes, with
                 uint4 zero points [V, D / block_size]); or uint8 with bits=8 (codes + 128, default zero point 128):
                 int8 tables per group, or per row as one block of the next power of two >= D (scales [V, 1]; the op
                 takes ceil(D / block_size) blocks, so nothing is padded). Not DequantizeLinear + Gather, as int8
                 plans lower tables: ORT keeps that DequantizeLinear and dequantizes the whole table on every call
    scales       [V, D / block_size], the output's dtype (float32 here: any plan scale is held as is)
    gather_axis  0 (rows are the vocabulary), quantize_axis 1 (the last: blocks run along the embedding dim)
    block_size   a power of two >= 16
int4/uint4 tensors are packed two codes a byte, low nibble first (ONNX's int4 layout), which is also how ORT's own
quantizer (`matmul_nbits_quantizer.quantize_gather`) writes them. 3- and 2-bit codes, should a plan hold them,
go in the same 4-bit types (exact values, 4 bits of storage). Initializers are named `<fqn>.weight.packed` /
`.scale` / `.zero_point` and the node carries `edgeq.weight_dtype`, as for MatMulNBits, so parity reads the
plan's form back.
"""

from __future__ import annotations

import numpy as np

from edgeq.plan import LayerPlan, OpKind, PerChannel, PerGroup, QDtype

MIN_BLOCK = 16
_FOUR_BIT = (QDtype.INT2, QDtype.INT3, QDtype.INT4, QDtype.UINT2, QDtype.UINT3, QDtype.UINT4)


def is_table(layer: LayerPlan) -> bool:
    """A quantized embedding table (this module lowers all of them: per group, or int8 per row)."""
    return layer.op == OpKind.EMBEDDING and layer.weight is not None


def block_of(layer: LayerPlan) -> int:
    """The block size: the group, or per row the smallest power of two >= D (>= 16; the op takes scales
    [V, ceil(D / block_size)], so the data needs no padding)."""
    granularity = layer.weight.granularity
    if isinstance(granularity, PerGroup):
        return granularity.size
    return max(MIN_BLOCK, 1 << (layer.weight_codes.shape[1] - 1).bit_length())


def table_refusal(layer: LayerPlan) -> str | None:
    """Why GatherBlockQuantized cannot hold this planned table as it is (None: it can)."""
    quant, codes = layer.weight, layer.weight_codes
    if quant.dtype not in _FOUR_BIT + (QDtype.INT8, QDtype.UINT8):
        return f"{quant.dtype} tables: GatherBlockQuantized holds 4-bit (int2/int3/int4 in int4, uint* in uint4) or 8-bit codes"
    if codes is None or codes.ndim != 2:
        return "a quantized table needs its [V, D] codes in the plan"
    granularity, dim = quant.granularity, codes.shape[1]
    if isinstance(granularity, PerChannel):
        if granularity.axis != 0:
            return f"per-channel scales along axis {granularity.axis}: a table's rows (axis 0) take one scale each"
        return None if quant.dtype.bits == 8 else f"{quant.dtype} per row: plan 4-bit tables per group along D"
    if not isinstance(granularity, PerGroup) or granularity.axis != 1:
        return f"{granularity.to_json()['kind']} scales: GatherBlockQuantized takes blocks along the embedding dim (axis 1) or int8 per row"
    size = granularity.size
    if size < MIN_BLOCK or size & (size - 1) or dim % size:
        return f"group size {size} over {dim} columns: GatherBlockQuantized blocks are powers of two >= {MIN_BLOCK} dividing D"
    if codes.min(initial=0) < quant.dtype.qmin or codes.max(initial=0) > quant.dtype.qmax:
        return f"codes outside the {quant.dtype} range [{quant.dtype.qmin}, {quant.dtype.qmax}]"
    return None


def _pack4(values: np.ndarray) -> bytes:
    """ONNX int4/uint4 raw data: values (any shape, row-major) two a byte, the first in the low nibble."""
    flat = (np.ravel(values).astype(np.int16) & 0xF).astype(np.uint8)
    flat = np.concatenate([flat, np.zeros(flat.size % 2, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def packed_table(layer: LayerPlan, names: tuple[str, str, str]) -> tuple[list, dict]:
    """(initializers [data, scales, zero points?], node attributes) of one table, the plan's numbers exactly."""
    from onnx import TensorProto, helper, numpy_helper

    quant, codes = layer.weight, layer.weight_codes
    rows, dim = codes.shape
    scale = quant.scale.reshape(rows, -1).astype(np.float32)
    zero = quant.zero_point.reshape(rows, -1)
    if quant.dtype in (QDtype.INT8, QDtype.UINT8):  # uint8 bits=8: stored = code + offset, zero points uint8
        offset = 128 if quant.dtype.signed else 0
        data = numpy_helper.from_array((codes.astype(np.int16) + offset).astype(np.uint8), names[0])
        zeros = None if quant.dtype.signed and not zero.any() else numpy_helper.from_array((zero + offset).astype(np.uint8), names[2])
        bits = 8
    else:
        kind = TensorProto.INT4 if quant.dtype.signed else TensorProto.UINT4
        data = helper.make_tensor(names[0], kind, [rows, dim], _pack4(codes), raw=True)
        zeros = None if quant.dtype.signed and not zero.any() else helper.make_tensor(names[2], kind, list(zero.shape), _pack4(zero), raw=True)
        bits = 4
    initializers = [data, numpy_helper.from_array(scale, names[1])] + ([zeros] if zeros is not None else [])
    return initializers, {"bits": bits, "block_size": block_of(layer), "gather_axis": 0, "quantize_axis": 1}


def gather_block_quantized(node, fqn: str, layer: LayerPlan, suffixes: tuple[str, str, str], dtype_key: str, domain: str):
    """(GatherBlockQuantized node, its initializers): `node` (a Gather over table `fqn`) over the plan's packed
    codes `<fqn><suffix>`, keeping the node's metadata (the scopes layer taps read) and tagging the codes' dtype."""
    from onnx import helper

    names = tuple(f"{fqn}{suffix}" for suffix in suffixes)
    packed, attributes = packed_table(layer, names)
    inputs = [names[0], node.input[1], names[1]] + ([names[2]] if len(packed) > 2 else [])
    replacement = helper.make_node("GatherBlockQuantized", inputs, list(node.output), name=f"{node.name or fqn}/GatherBlockQuantized",
                                   domain=domain, **attributes)
    replacement.metadata_props.extend(node.metadata_props)
    tag = replacement.metadata_props.add()
    tag.key, tag.value = dtype_key, layer.weight.dtype.value
    return replacement, packed


def rewrite_gathers(proto, tables: dict[str, LayerPlan], suffixes: tuple[str, str, str], dtype_key: str, domain: str) -> list[str]:
    """Replace each Gather (axis 0) over a planned table with GatherBlockQuantized over its packed codes.

    A Gather is a table's when its constant data equals the plan's dequantized table bit for bit (the exporter
    wrote the dequantized table: onnx_lowbit.dequantized_weights). Returns the FQNs rewritten, once per node."""
    from onnx import helper, numpy_helper

    from edgeq.converters.parity import onnx_tensors

    graph = proto.graph
    tensors = onnx_tensors(graph)
    by_value = by_dequantized_value(tables)
    cache: dict[str, tuple] = {}  # data tensor name -> the FQN it is (None: not a table)
    rewritten, nodes, initializers = [], [], []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gather" or attrs.get("axis", 0) != 0 or node.input[0] not in tensors:
            nodes.append(node)
            continue
        if node.input[0] not in cache:
            data = numpy_helper.to_array(tensors[node.input[0]])
            found = by_value.get((data.shape, np.ascontiguousarray(data).tobytes()), []) if data.dtype == np.float32 else []
            cache[node.input[0]] = found[0] if len(found) == 1 else None
        fqn = cache[node.input[0]]
        if fqn is None:
            nodes.append(node)
            continue
        replacement, packed = gather_block_quantized(node, fqn, tables[fqn], suffixes, dtype_key, domain)
        if fqn not in rewritten:  # a table gathered twice shares its initializers
            initializers += packed
        nodes.append(replacement)
        rewritten.append(fqn)
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(initializers)
    return rewritten


def read_gathers(graph, tensors: dict, suffix: str, dtype_key: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{user FQN: (codes [V, D], scale [V, D / block], zero point)} of every GatherBlockQuantized over
    `<fqn><suffix>`, in the plan's form (codes in the plan dtype's storage, zero points signed-offset removed)."""
    from onnx import helper, numpy_helper

    found = {}
    for node in graph.node:
        if node.op_type != "GatherBlockQuantized" or not node.input[0].endswith(suffix):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        meta = {p.key: p.value for p in node.metadata_props}
        data = numpy_helper.to_array(tensors[node.input[0]])
        scale = numpy_helper.to_array(tensors[node.input[2]]).astype(np.float32)
        zero_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
        stored_zero = None if zero_name is None else numpy_helper.to_array(tensors[zero_name]).astype(np.int32)
        if attrs.get("bits", 4) == 8 and data.dtype == np.uint8:
            dtype = QDtype(meta.get(dtype_key, QDtype.INT8.value))
            offset = 128 if dtype.signed else 0
            codes = (data.astype(np.int16) - offset).astype(dtype.storage)
            zero = np.zeros(scale.shape, np.int32) if stored_zero is None else stored_zero - offset
        else:  # int4 / uint4 tensors come back one value per element (ml_dtypes)
            dtype = QDtype(meta[dtype_key]) if dtype_key in meta else (QDtype.INT4 if stored_zero is None else QDtype.UINT4)
            codes = data.astype(np.int16).astype(dtype.storage)
            zero = np.zeros(scale.shape, np.int32) if stored_zero is None else stored_zero
        if scale.shape[1] == 1 and attrs["block_size"] >= codes.shape[1]:  # one block a row: per row
            scale, zero = scale[:, 0], zero[:, 0]
        found[node.input[0].removesuffix(suffix).removeprefix("inner.")] = (codes, scale, zero)
    return found


def by_dequantized_value(layers: dict) -> dict[tuple, list[str]]:
    """(shape, bytes) of each layer's dequantized plan weight -> the FQNs holding it: how the rewrites find the
    exporter's constants (it wrote exactly these floats), bit for bit."""
    found: dict[tuple, list[str]] = {}
    for fqn, layer in layers.items():
        values = layer.weight.dequantize(layer.weight_codes)
        found.setdefault((values.shape, values.tobytes()), []).append(fqn)
    return found
