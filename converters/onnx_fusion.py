"""Attention as one ONNX Runtime kernel: the exporter's per-op self-attention fused into com.microsoft.MultiHeadAttention.

The dynamo exporter writes a BERT block's attention core op for op: q, k and v each reshaped into heads and
transposed, MatMul(q, kᵀ), Mul by the scale, Add of the mask, Softmax, MatMul with v, Transpose and Reshape back.
ORT's own fusions do not match that form (onnxruntime.transformers.optimizer on edgeq's FP32 file finds no
Attention: its patterns expect the TorchScript exporter's mask arithmetic), so ORT ran it as ~11 kernels a layer.
MultiHeadAttention takes the three projections' outputs as they are ([batch, sequence, hidden]) and the mask as
its additive attention_bias, so the linears in front (int8 MatMulInteger, float MatMul) and their weights stay
untouched: the plan's codes and scales are what they were, and the op computes the same formula,
softmax(scale · q kᵀ + bias) v, per head (MiniLM's sentence embeddings: bit-identical outputs on ORT 1.32).

Measured on all-MiniLM-L6-v2 int8-dynamic (one thread, sequence 128, interleaved rounds; docs/research/ort-kernels-cpus.md):
this machine (AMD EPYC, onnxruntime 1.32): 0-7% faster in six interleaved runs (median 1.5%; 17.63 -> 17.17 ms in
the pipeline run), edgeq's speed 0.978-0.997x ORT quantize_dynamic's on the same FP32 file (median 0.986x, unfused
0.971x), cosine unchanged; the lent Xeon (onnxruntime 1.30): -1.5% and +0.9% in two runs (300, 600 rounds).
Kept for int8-dynamic (int8-weight too: same float core) on CPU profiles; FP32 and static graphs are left as
exported (not measured enough, QDQ patterns). The
form matched is transformers' eager attention (q kᵀ then one Mul by the scale); the exporter's decomposition of
F.scaled_dot_product_attention (the scale's square root on q and on k) is not matched. QAttention (the int8 q/k/v
projections packed into the op) was measured too: no better than this (1.001x/0.991x ORT's time here, 0.971x on the
Xeon; 1.002x in a second Xeon run), and it has no attention_bias: the mask would have to be proven a 0/1 mask of
attention_mask, and parity would read the q/k/v codes through a Concat.
"""

from __future__ import annotations

import numpy as np

DOMAIN = "com.microsoft"
_HEADS = [0, 2, 1, 3]  # [batch, sequence, heads, head_dim] <-> [batch, heads, sequence, head_dim]
_KEYS = [0, 2, 3, 1]  # k into [batch, heads, head_dim, sequence] for q kᵀ


def fuse_multi_head_attention(proto) -> int:
    """Replace every exporter self-attention core (from the q/k/v projection outputs to the merged-heads Reshape)
    by one MultiHeadAttention(q, k, v, attention_bias = the mask) node. Returns the number of cores fused."""
    from onnx import helper, numpy_helper

    from edgeq.converters.onnx_graph_shape import consumers_of, remove_dead_nodes, splice
    from edgeq.converters.parity import onnx_tensors

    graph = proto.graph
    tensors = onnx_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers = consumers_of(graph)
    outputs = {o.name for o in graph.output}

    def only(name, op):
        """The node of type `op` producing `name`, if `name` has no other reader (so the node may go)."""
        node = producer.get(name)
        ok = node is not None and node.op_type == op and node.domain in ("", "ai.onnx")
        return node if ok and len(consumers[name]) == 1 and name not in outputs else None

    def reader(name, op):
        """The one node reading `name`, if it is of type `op` and `name` is not a graph output."""
        found = consumers[name]
        ok = len(found) == 1 and found[0].op_type == op and found[0].domain in ("", "ai.onnx") and name not in outputs
        return found[0] if ok else None

    def constant(name):
        return numpy_helper.to_array(tensors[name]) if name in tensors else None

    def perm(node):
        found = [list(a.ints) for a in node.attribute if a.name == "perm"]
        return found[0] if found else None

    def heads_of(transpose, order):
        """(projection output, heads, head_dim) behind Transpose(perm=order)(Reshape(x, [b, s, heads, dim]))."""
        if transpose is None or perm(transpose) != order:
            return None
        reshape = only(transpose.input[0], "Reshape")
        shape = constant(reshape.input[1]) if reshape is not None else None
        if shape is None or shape.shape != (4,) or shape[3] <= 0:
            return None
        heads, dim = int(shape[2]), int(shape[3])
        if heads <= 0:  # the exporter writes [1, 128, -1, 32]: the width comes from the projection's bias
            width = bias_width(reshape.input[0])
            heads = width // dim if width and width % dim == 0 else 0
        return (reshape.input[0], heads, dim) if heads > 0 else None

    def bias_width(name):
        """The length of the 1-D constant added to make `name` (a linear's bias), or None."""
        add = producer.get(name)
        widths = [constant(i).shape[0] for i in add.input if i in tensors and constant(i).ndim == 1] if add is not None and add.op_type == "Add" else []
        return widths[0] if len(widths) == 1 else None

    shapes = _shapes(proto)

    def bias_fits(bias, query, key):
        """MultiHeadAttention takes attention_bias as [batch or 1, heads or 1, sequence, total sequence] only; the
        exporter's mask may be [batch, 1, 1, sequence] (broadcast by Add, not by the op): known shapes or no fusion."""
        b, q, k = shapes.get(bias), shapes.get(query), shapes.get(key)
        if b is None or q is None or k is None or len(b) != 4 or len(q) != 3 or len(k) != 3:
            return False
        return None not in (b[2], b[3]) and b[2] == q[1] and b[3] == k[1]

    fused, replacements, dropped = 0, {}, set()
    for softmax in graph.node:
        if softmax.op_type != "Softmax" or any(a.name == "axis" and a.i not in (-1, 3) for a in softmax.attribute):
            continue
        add = only(softmax.input[0], "Add")
        scaled = [only(name, "Mul") for name in add.input] if add is not None else []
        if [m is not None for m in scaled] not in ([True, False], [False, True]):
            continue
        mul = scaled[0] or scaled[1]
        bias = add.input[1] if scaled[0] else add.input[0]
        factors = [constant(name) for name in mul.input]
        scale = next((f for f in factors if f is not None and f.size == 1), None)
        scores = next((only(name, "MatMul") for name in mul.input if name not in tensors), None)
        readers = consumers[softmax.output[0]]
        if scale is None or scores is None or len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[0] != softmax.output[0]:
            continue
        context = readers[0]
        query = heads_of(only(scores.input[0], "Transpose"), _HEADS)
        key = heads_of(only(scores.input[1], "Transpose"), _KEYS)
        value = heads_of(only(context.input[1], "Transpose"), _HEADS)
        back = reader(context.output[0], "Transpose")
        merge = reader(back.output[0], "Reshape") if back is not None and perm(back) == _HEADS else None
        merged = constant(merge.input[1]) if merge is not None else None
        if None in (query, key, value) or merged is None or merged.shape != (3,) or len({query[1:], key[1:], value[1:]}) != 1:
            continue
        if not bias_fits(bias, query[0], key[0]):
            continue
        heads, dim = query[1], query[2]
        if merged[2] not in (-1, heads * dim):
            continue
        chain = [add, mul, scores, context, back, merge]
        chain += [producer[scores.input[0]], producer[scores.input[1]], producer[context.input[1]]]
        chain += [producer[producer[name].input[0]] for name in (scores.input[0], scores.input[1], context.input[1])]
        base = merge.name or merge.output[0]
        attention = helper.make_node(
            "MultiHeadAttention", [query[0], key[0], value[0], "", "", bias], [merge.output[0]], name=f"{base}/MultiHeadAttention",
            domain=DOMAIN, num_heads=heads, scale=float(np.float32(scale.reshape(()))),
        )
        attention.metadata_props.extend(merge.metadata_props)  # the module scope per-layer taps read
        replacements[id(softmax)] = attention
        dropped.update(id(node) for node in chain)
        fused += 1
    if fused:
        splice(proto, graph, replacements, dropped)
        remove_dead_nodes(graph)
    return fused


def _shapes(proto) -> dict[str, tuple]:
    """name -> dims (int, or the symbolic name, or None where unknown) of every value ONNX shape inference types."""
    import onnx
    from onnx import helper

    light = onnx.ModelProto()  # initializers as typed inputs: the same shapes without serializing the weights (60x faster)
    light.CopyFrom(proto)
    light.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in light.graph.initializer)
    del light.graph.initializer[:]
    try:
        graph = onnx.shape_inference.infer_shapes(light).graph
    except Exception:  # no shapes: nothing fuses (bias_fits needs them)
        return {}
    found = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            found[info.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in info.type.tensor_type.shape.dim)
    return found
