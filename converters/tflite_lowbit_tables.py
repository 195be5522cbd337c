"""TFLite / LiteRT quantized embedding tables in low-bit artifacts: the plan's table codes in EMBEDDING_LOOKUP.

litert-torch lowers an nn.Embedding looked up by model inputs to EMBEDDING_LOOKUP over a float constant table.
The converter converts the model with the plan's dequantized tables (`dequantized_tables`), finds each lookup's
table by value (bit for bit), and rewrites it in place, as ai-edge-quantizer's `dynamic_wi4b*` recipes write
EMBEDDING_LOOKUP tables (same tensor type, BlockwiseQuantization and op version, checked on a reference model),
but with the plan's codes and scales verbatim:

  plan table                    tensor  quantization                                       kernel (LiteRT builtin)
  int4 (int3/int2) per group g  INT4    BlockwiseQuantization{scales: FLOAT16 [V, D/g]    EvalBlockwise: dequantizes
                                        tensor, zero_points -1, block_size g}              the gathered rows only
  int8 per row                  INT8    scale [V] float32, zero point 0, dimension 0       hybrid: the same

Both measured exact against numpy in ai-edge-litert 2.3 (tests/converters/test_tflite_lowbit.py). XNNPACK does not
take EMBEDDING_LOOKUP; a lookup is memory-bound either way, and the table is never dequantized whole.

A lookup of constant indices (BERT's position embeddings: a buffer of positions sliced to the static sequence
length) is folded by the converter into a float constant of the looked-up rows. Those rows are the plan's
dequantized rows (the model was converted with them), stored float; the artifact's notes name such tables, and
weight parity reports them as not in the artifact rather than as quantized.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from edgeq.errors import ConversionError
from edgeq.plan import LayerPlan, OpKind, PerChannel, PerGroup, QDtype, QuantPlan

BLOCK_MULTIPLE = 32  # ai-edge-quantizer's blockwise EMBEDDING_LOOKUP recipes: blocks of 32, 64, 128, 256
FP16_MIN_NORMAL, FP16_MAX = 2.0**-14, 65504.0
_FOUR_BIT = (QDtype.INT2, QDtype.INT3, QDtype.INT4)


def is_table(layer: LayerPlan) -> bool:
    return layer.op == OpKind.EMBEDDING and layer.weight is not None


def table_refusal(layer: LayerPlan, module: torch.nn.Module | None) -> str | None:
    """Why an EMBEDDING_LOOKUP cannot hold this planned table exactly (None: it can)."""
    quant, codes = layer.weight, layer.weight_codes
    if not isinstance(module, torch.nn.Embedding):
        return "a quantized table for a layer that is not an nn.Embedding"
    if codes is None or tuple(codes.shape) != tuple(module.weight.shape):
        return f"the plan's codes {None if codes is None else tuple(codes.shape)} are not the table {tuple(module.weight.shape)}"
    if not quant.symmetric or quant.zero_point.any():
        return f"asymmetric {quant.dtype} table: LiteRT's EMBEDDING_LOOKUP takes zero point 0; quantize symmetric"
    if codes.min(initial=0) < quant.dtype.qmin or codes.max(initial=0) > quant.dtype.qmax:
        return f"codes outside the {quant.dtype} range [{quant.dtype.qmin}, {quant.dtype.qmax}]"
    granularity = quant.granularity
    if quant.dtype == QDtype.INT8:
        if isinstance(granularity, PerChannel) and granularity.axis == 0:
            return None
        return "an int8 table: LiteRT's EMBEDDING_LOOKUP takes int8 per row (scales along axis 0), not per group"
    if quant.dtype not in _FOUR_BIT:
        return f"{quant.dtype} table: EMBEDDING_LOOKUP holds INT4 blocks (int2/int3/int4 codes) or int8 per row"
    if not isinstance(granularity, PerGroup) or granularity.axis != 1:
        return "a 4-bit table takes blocks along the embedding dim (per group, axis 1): LiteRT's blockwise EMBEDDING_LOOKUP"
    if granularity.size % BLOCK_MULTIPLE or codes.shape[1] % granularity.size:
        return f"group size {granularity.size} over {codes.shape[1]} columns: blocks are multiples of {BLOCK_MULTIPLE} dividing D"
    scale = quant.scale
    if not np.array_equal(scale.astype(np.float16).astype(np.float32), scale) or scale.min() < FP16_MIN_NORMAL or scale.max() > FP16_MAX:
        return "block scales that are not normal float16 values: LiteRT stores them FLOAT16; make the plan on the target's grid"
    return None


def dequantized_tables(module: torch.nn.Module, plan: QuantPlan) -> torch.nn.Module:
    """A copy of `module` whose planned tables hold the plan's dequantized values (what is converted; the
    lookups are then found by these values, and a folded lookup holds the plan's rows)."""
    from edgeq.compress.apply import user_fqn

    tables = {fqn: layer for fqn, layer in plan.layers.items() if is_table(layer)}
    if not tables:
        return module
    result = copy.deepcopy(module)
    for name, child in result.named_modules():
        layer = tables.get(user_fqn(name))
        if layer is not None:
            with torch.no_grad():
                child.weight.copy_(torch.from_numpy(layer.weight.dequantize(layer.weight_codes)))
    return result.eval()


def pack_tables(model, subgraph, plan: QuantPlan, notes: list[str], target: str) -> None:
    """Rewrite each planned table's EMBEDDING_LOOKUP constant as the plan's codes, named `<fqn>.weight`."""
    from ai_edge_litert import schema_py_generated as schema

    from edgeq.converters.parity_tflite import INT4, INT8, WEIGHT_SUFFIX, constant, op_names, pack_codes
    from edgeq.converters.tflite_lowbit import _quantization

    tables = {fqn: layer for fqn, layer in plan.layers.items() if is_table(layer)}
    if not tables:
        return
    by_value: dict[tuple, list[str]] = {}
    for fqn, layer in tables.items():
        table = layer.weight.dequantize(layer.weight_codes)
        by_value.setdefault((table.shape, table.tobytes()), []).append(fqn)
    names = op_names(model)  # after the FULLY_CONNECTED rewrite, which may add operator codes
    references: dict[int, int] = {}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            references[tensor.buffer] = references.get(tensor.buffer, 0) + 1
    found: dict[str, int] = {}  # fqn -> table tensor
    for op in subgraph.operators:
        if names[op.opcodeIndex] != "EMBEDDING_LOOKUP" or len(op.inputs) < 2:
            continue
        tensor = subgraph.tensors[op.inputs[1]]
        values = constant(model, tensor) if tensor.type == 0 else None  # FLOAT32
        owners = [] if values is None else by_value.get((values.shape, np.ascontiguousarray(values).tobytes()), [])
        if len(owners) != 1:
            continue
        fqn = owners[0]
        if found.setdefault(fqn, op.inputs[1]) != op.inputs[1]:
            raise ConversionError(f"target {target}: table {fqn} is stored twice in the TFLite model")
    for fqn, index in found.items():
        layer, tensor = tables[fqn], subgraph.tensors[found[fqn]]
        int8 = layer.weight.dtype == QDtype.INT8
        data = np.ascontiguousarray(layer.weight_codes, np.int8).view(np.uint8).ravel() if int8 else pack_codes(layer.weight_codes, 4)
        if references.get(tensor.buffer, 0) > 1:  # shared with an equal constant: a buffer of its own
            model.buffers.append(schema.BufferT())
            tensor.buffer = len(model.buffers) - 1
        buffer = model.buffers[tensor.buffer]
        buffer.data, buffer.offset, buffer.size = data, 0, 0
        tensor.type = INT8 if int8 else INT4
        tensor.name = (fqn + WEIGHT_SUFFIX).encode()
        tensor.quantization = _quantization(model, subgraph, fqn, layer, schema)  # as FULLY_CONNECTED's, dimension 0
    lost = sorted(set(tables) - set(found))
    forms = sorted({"INT8 per row" if tables[f].weight.dtype == QDtype.INT8 else f"INT4 blocks of {tables[f].weight.granularity.size}"
                    for f in found})
    notes.append(
        f"{len(found)} embedding table(s) run as EMBEDDING_LOOKUP over packed codes ({', '.join(forms) or 'none'}): "
        "the builtin kernel dequantizes only the rows it gathers"
        + (f"; lookup(s) folded by the converter into float constants of the plan's dequantized rows (constant "
           f"indices, e.g. positions at a static sequence length), so not stored as codes: {', '.join(lost)}" if lost else "")
    )

