"""Attention over the unpadded keys only: a batch-1 graph's padding mask applied by dropping the padded keys.

A sentence model exported at a fixed sequence (MiniLM: 128) runs every sentence padded to that length, and the
exporter's attention mask is an additive bias: 0 for a real key, -FLT_MAX for a padded one. ONNX Runtime's
MultiHeadAttention CPU kernel takes its flash-attention path only without a bias; with one it computes all
sequence x sequence scores per head and exponentiates the masked ones too. MLAS clamps exp's input, so a masked
probability comes out as a denormal (~1e-45) rather than 0, and on Intel cores denormal arithmetic is slow: on
the lent Xeon (onnxruntime 1.30) MiniLM int8-dynamic spent ~8 of 22 ms there on a 22-token sentence, and the
same graph without the bias ran in 14 ms.

Where the bias is provably a key-padding mask of a batch-1 graph (per key: 0 where a bool key mask holds, a
value <= -1e4 where it does not, the same for every query and head), each fused MultiHeadAttention reads
Compress(k, keep) and Compress(v, keep) along the sequence instead, and no bias. That is the same attention
(a masked key's softmax weight is 0 up to that denormal), every query included, padded ones too, and the kernel
runs flash attention over the real keys only. The q/k/v projections and their int8 codes are untouched.
Measured on all-MiniLM-L6-v2 int8-dynamic (one thread; docs/research/ort-kernels-cpus.md): outputs within
2.3e-8 (22 real tokens) and 6.5e-6 (100) of the masked kernel's; this machine (AMD EPYC, onnxruntime 1.32)
10.10 against 11.95 ms on a 22-token sentence padded to 128.

If every key is masked (an all-padding input), all keys are kept: the kernel then attends to all of them
plainly, where the bias made the weights uniform; both are meaningless outputs for an empty input. Graphs with
a batch axis other than a static 1 keep the bias (rows would keep different numbers of keys).
"""

from __future__ import annotations

import numpy as np

MASKED_AT_MOST = -1.0e4  # a masked key's additive value: exp(-1e4 + score) is 0 (or a denormal) in float32


def skip_padded_keys(proto) -> int:
    """Rewrite each MultiHeadAttention whose attention_bias is a batch-1 key-padding mask to read only the keys the
    mask keeps (Compress on k and v, no bias). Returns the number of attention nodes rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.converters.onnx_fusion import _shapes
    from edgeq.converters.parity import onnx_tensors

    graph = proto.graph
    attentions = [n for n in graph.node if n.op_type == "MultiHeadAttention" and len(n.input) > 5 and n.input[5]]
    if not attentions:
        return 0
    tensors = onnx_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    shapes = _shapes(proto)

    def constant(name):
        return numpy_helper.to_array(tensors[name]) if name in tensors else None

    def key_mask(bias: str, keys: int) -> str | None:
        """The [1, 1, 1, keys] bool tensor the bias is made from, if bias == Where(mask, 0, v <= -1e4) broadcast."""
        where = producer.get(bias)
        if where is None or where.op_type != "Where":
            return None
        kept, masked = constant(where.input[1]), constant(where.input[2])
        if kept is None or masked is None or kept.size != 1 or masked.size != 1:
            return None
        if float(kept.reshape(())) != 0.0 or not float(masked.reshape(())) <= MASKED_AT_MOST:
            return None
        condition = where.input[0]
        while condition in producer and producer[condition].op_type == "And":  # And with an all-True constant is the other input
            node = producer[condition]
            values = {name: constant(name) for name in node.input}
            trues = [name for name, value in values.items() if value is not None and value.dtype == bool and value.all()]
            others = [name for name in node.input if name not in trues]
            if not trues or len(others) != 1:
                return None
            condition = others[0]
        # Query and head extents of 1: the same mask for every query and head, and batch 1.
        return condition if shapes.get(condition) == (1, 1, 1, keys) else None

    def batch_one(*names) -> int | None:
        """The static sequence length shared by [1, sequence, hidden] tensors `names`, else None."""
        found = {shapes.get(name) for name in names}
        if len(found) != 1:
            return None
        shape = found.pop()
        ok = shape is not None and len(shape) == 3 and shape[0] == 1 and isinstance(shape[1], int) and shape[1] > 0
        return shape[1] if ok else None

    keeps: dict[str, str] = {}  # mask tensor -> its 1-D keep vector (computed once, shared by the layers)
    setup: list = []
    before: dict[str, list] = {}  # attention output -> the Compress nodes it reads
    for attention in attentions:
        query, key, value, bias = attention.input[0], attention.input[1], attention.input[2], attention.input[5]
        keys = batch_one(query, key, value)
        mask = key_mask(bias, keys) if keys else None
        if mask is None:
            continue
        if mask not in keeps:
            stem = f"{mask}/keys"
            graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{stem}/flat"))
            setup += [  # keep = mask, or every key when the mask keeps none (Compress would leave no key)
                helper.make_node("Reshape", [mask, f"{stem}/flat"], [f"{stem}/mask"]),
                helper.make_node("Cast", [f"{stem}/mask"], [f"{stem}/as_float"], to=TensorProto.FLOAT),
                helper.make_node("ReduceMax", [f"{stem}/as_float"], [f"{stem}/any"], keepdims=0),
                helper.make_node("Cast", [f"{stem}/any"], [f"{stem}/any_bool"], to=TensorProto.BOOL),
                helper.make_node("Not", [f"{stem}/any_bool"], [f"{stem}/none"]),
                helper.make_node("Or", [f"{stem}/mask", f"{stem}/none"], [f"{stem}/keep"]),
            ]
            keeps[mask] = f"{stem}/keep"
        keep = keeps[mask]
        base = attention.name or attention.output[0]
        before[attention.output[0]] = [
            helper.make_node("Compress", [key, keep], [f"{base}/real_keys"], axis=1, name=f"{base}/real_keys"),
            helper.make_node("Compress", [value, keep], [f"{base}/real_values"], axis=1, name=f"{base}/real_values"),
        ]
        for node in before[attention.output[0]]:
            node.metadata_props.extend(attention.metadata_props)
        attention.input[1], attention.input[2] = f"{base}/real_keys", f"{base}/real_values"
        del attention.input[3:]
    if not before:
        return 0
    nodes, placed = [], False
    for node in graph.node:
        compresses = before.get(node.output[0], []) if node.op_type == "MultiHeadAttention" else []
        if compresses and not placed:  # the keep vectors right before the first attention that reads one
            nodes += setup
            placed = True
        nodes += compresses
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    from edgeq.converters.onnx_graph_shape import remove_dead_nodes

    remove_dead_nodes(graph)  # the bias chain, now unread
    return len(before)

