"""int8 tables looked up at constant indices, folded into the float rows they produce (TFLite int8 schemes).

BERT-style models look their position table up at `position_ids[:, :sequence]`, a buffer; at TFLite's static
sequence length those indices are a constant, so the lookup computes the same rows on every call. Converted from
the FP32 model, litert-torch folds it into a float constant (ai-edge-quantizer's graphs, built from that FP32 file,
have no lookup there). Converted with the plan's int8 table it stays an EMBEDDING_LOOKUP (+ RESHAPE) at run time,
the builtin kernel (XNNPACK takes no EMBEDDING_LOOKUP) between delegated partitions: on all-MiniLM-L6-v2
int8-dynamic the only ops edgeq's graph had beyond AEQ's `dynamic_wi8_afp32` (0.991-0.997x its speed).

Folded here: the op's output (through a RESHAPE that is its only reader) becomes a float32 constant holding
codes[i] * scale[i] for the looked-up rows i, the product LiteRT's hybrid lookup computes in float32, so the outputs
are bit-identical. The same bytes as the table where the sequence is a quarter of its rows (MiniLM: 128 float rows
= 512 int8 rows); the table's own codes are dropped. The constant is named `<fqn>.weight.rows[a:b]`, and weight
parity checks those rows against the plan's codes and scales bit for bit (converters/parity_tflite.py).
Only contiguous index ranges are folded (positions); other constant lookups are left as they are.
"""

from __future__ import annotations

import re

import numpy as np

ROWS_SUFFIX = ".weight.rows"
ROWS_NAME = re.compile(r"^(?P<fqn>.+)\.weight\.rows\[(?P<start>\d+):(?P<stop>\d+)\]$")


def rows_name(fqn: str, start: int, stop: int) -> str:
    return f"{fqn}{ROWS_SUFFIX}[{start}:{stop}]"


def fold_constant_lookups(model, subgraph, names: list[str], lookups: dict, plan) -> list[str]:
    """Fold each EMBEDDING_LOOKUP in `lookups` (FQN -> its operator object) whose indices are a constant range;
    returns the FQNs folded. `plan` holds each table's codes and per-row scales."""
    from ai_edge_litert import schema_py_generated as schema

    from edgeq.converters.parity_tflite import constant

    folded, dropped = [], set()
    graph_ends = set(subgraph.inputs or []) | set(subgraph.outputs or [])
    for fqn, op in lookups.items():
        layer = plan.layers.get(fqn)
        if names[op.opcodeIndex] != "EMBEDDING_LOOKUP" or layer is None or layer.weight_codes is None:
            continue
        scale = np.asarray(layer.weight.scale, np.float32).ravel()
        if layer.weight_codes.ndim != 2 or scale.size != layer.weight_codes.shape[0]:
            continue  # only int8 per-row tables (low-bit tables have their own path)
        indices = constant(model, subgraph.tensors[op.inputs[0]])
        if indices is None or indices.ndim != 1 or indices.size == 0:
            continue
        start = int(indices[0])
        if not np.array_equal(indices, np.arange(start, start + indices.size)) or start + indices.size > scale.size:
            continue
        rows = layer.weight_codes[start:start + indices.size].astype(np.float32) * scale[start:start + indices.size, None]
        output = op.outputs[0]
        readers = [other for other in subgraph.operators if output in (other.inputs or [])]
        result, removed = output, [op]
        if len(readers) == 1 and names[readers[0].opcodeIndex] == "RESHAPE":
            result, removed = readers[0].outputs[0], [op, readers[0]]
        tensor = subgraph.tensors[result]
        shape = [int(d) for d in tensor.shape] if tensor.shape is not None else []
        if result in graph_ends or int(np.prod(shape)) != rows.size or tensor.type != 0:  # 0: FLOAT32
            continue
        model.buffers.append(schema.BufferT())
        model.buffers[-1].data = np.ascontiguousarray(rows.reshape(shape)).view(np.uint8).ravel()
        tensor.buffer = len(model.buffers) - 1
        tensor.name = rows_name(fqn, start, start + indices.size).encode()
        table = subgraph.tensors[op.inputs[1]]
        alone = sum(op.inputs[1] in (other.inputs or []) for other in subgraph.operators) == 1
        if alone and sum(t.buffer == table.buffer for t in subgraph.tensors) == 1:  # nothing else holds these codes
            model.buffers[table.buffer].data = None  # not needed any more (the tensor stays, unread)
        dropped.update(id(node) for node in removed)
        folded.append(fqn)
    if dropped:
        subgraph.operators = [node for node in subgraph.operators if id(node) not in dropped]
    return folded
