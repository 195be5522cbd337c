"""Dynamic int8 for ONNX Runtime: weights int8 (the plan's codes), activations quantized per call.

The exporter writes weight-only graphs (MatMul over Transpose(DequantizeLinear(codes))); no PyTorch op
exports as a dynamic activation quantizer, so this post-export rewrite replaces each such MatMul with the
standard-op pattern ORT fuses into its DynamicQuantizeMatMul kernel (measured, docs/research):

    DynamicQuantizeLinear(x) -> MatMulInteger(x_q, codesᵀ, x_zp, w_zp) -> Cast -> Mul(x_scale * w_scale)

The codes are stored transposed ([in, out]) as `<fqn>.weight.codes.T` and the scales as `<fqn>.weight.scale`,
which the parity reader maps back to the plan.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgeq.converters.parity import onnx_tensors

CODES_SUFFIX = ".weight.codes"


def rewrite_dynamic_matmuls(proto) -> list[str]:
    """Rewrite every MatMul(x, Transpose(DQ(int8 codes))) and Gemm(x, DQ(codes), b, transB=1) in place.

    Returns the codes initializer names (`<fqn>.weight.codes`) of the rewritten layers.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    tensors = onnx_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def value(name):
        return numpy_helper.to_array(tensors[name])

    def weight_source(node):
        """(DequantizeLinear, nodes to drop) feeding `node`'s weight input as [out, in] codes, or None."""
        if len(node.input) < 2 or node.input[1] not in producer:
            return None
        first = producer[node.input[1]]
        if node.op_type == "MatMul" and first.op_type == "Transpose" and first.input[0] in producer:
            dequant, chain = producer[first.input[0]], [first]
        elif node.op_type == "Gemm" and _attribute(node, "transB") == 1 and _attribute(node, "transA") in (None, 0):
            dequant, chain = first, []
        else:
            return None
        if dequant.op_type != "DequantizeLinear" or not dequant.input[0].endswith(CODES_SUFFIX):
            return None
        if any(len(consumers[n.output[0]]) != 1 for n in [dequant, *chain]):
            return None  # shared weights: leave them weight-only rather than duplicate them
        return dequant, [dequant, *chain]

    replaced, drop, new_nodes = [], set(), {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        found = weight_source(node)
        if found is None:
            continue
        dequant, chain = found
        codes = value(dequant.input[0])
        scale = value(dequant.input[1]).astype(np.float32)
        zero = value(dequant.input[2]) if len(dequant.input) > 2 and dequant.input[2] else np.zeros_like(scale, dtype=np.int8)
        if codes.dtype != np.int8 or codes.ndim != 2:
            continue
        stem = dequant.input[0]  # "<fqn>.weight.codes"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(codes.T), f"{stem}.T"),
                numpy_helper.from_array(zero.astype(np.int8), f"{stem}.zero_point"),
                numpy_helper.from_array(scale, stem.removesuffix(".codes") + ".scale"),
            ]
        )
        base = node.name or node.output[0]
        product = node.output[0] if node.op_type == "MatMul" or len(node.input) < 3 else f"{base}/product"
        new_nodes[id(node)] = [
            helper.make_node("DynamicQuantizeLinear", [node.input[0]], [f"{base}/x_q", f"{base}/x_scale", f"{base}/x_zp"]),
            helper.make_node("MatMulInteger", [f"{base}/x_q", f"{stem}.T", f"{base}/x_zp", f"{stem}.zero_point"], [f"{base}/acc"]),
            helper.make_node("Cast", [f"{base}/acc"], [f"{base}/acc_float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{base}/x_scale", stem.removesuffix(".codes") + ".scale"], [f"{base}/scale"]),
            helper.make_node("Mul", [f"{base}/acc_float", f"{base}/scale"], [product]),
        ]
        if product != node.output[0]:  # Gemm's bias (beta = 1 by the exporter)
            new_nodes[id(node)].append(helper.make_node("Add", [product, node.input[2]], [node.output[0]]))
        drop.update(id(n) for n in chain)
        replaced.append(stem)
    if replaced:
        nodes = []
        for node in graph.node:
            if id(node) in drop:
                continue
            nodes.extend(new_nodes.get(id(node), [node]))
        del graph.node[:]
        graph.node.extend(nodes)
        used = {name for node in graph.node for name in node.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return replaced


def _attribute(node, name):
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.i
    return None


def gather_int8_tables(proto, layers: dict | None = None) -> list[str]:
    """int8 per-row embedding tables gathered as Gather(codes) -> Cast -> Mul(Gather(row scales)), standard ops:
      - at constant indices (a position table read at positions 0..L-1) ORT's constant folding turns them into
        one float tensor at load; the exporter's DequantizeLinear -> Gather stays a runtime op (ORT never
        constant-folds DequantizeLinear) and so does com.microsoft.GatherBlockQuantized;
      - at run-time indices (token ids) they gather the int8 rows first, as GatherBlockQuantized does, and run
        faster than it on ORT 1.30 on the lent Xeon (MiniLM one thread: 0.989x ORT quantize_dynamic's speed
        against 0.974x with GatherBlockQuantized), about level with it here (AMD EPYC, ORT 1.32)
    (docs/research/ort-kernels-cpus.md). Exact: the same codes times the same row scales. Low-bit (grouped)
    tables keep GatherBlockQuantized (converters/onnx_graph_shape.py). Parity reads the codes from the Gather and
    the scales from `<fqn>.weight.scale`. Returns the codes rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    tensors = onnx_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    replaced, added, folded = {}, [], []
    for node in graph.node:
        dequant = producer.get(node.input[0]) if node.op_type == "Gather" else None
        if dequant is None or dequant.op_type != "DequantizeLinear" or not dequant.input[0].endswith(CODES_SUFFIX):
            continue
        if _attribute(node, "axis") not in (None, 0) or _attribute(dequant, "axis") not in (None, 0):
            continue
        layer = (layers or {}).get(dequant.input[0].removesuffix(CODES_SUFFIX).removeprefix("inner."))
        if dequant.input[0] not in tensors or (layer is None and any(n and n not in tensors for n in dequant.input[1:])):
            continue
        codes = numpy_helper.to_array(tensors[dequant.input[0]])
        if layer is not None and layer.weight is not None:  # the plan's numbers (the exporter may compute the scale)
            scale, zero = np.asarray(layer.weight.scale, np.float32), np.asarray(layer.weight.zero_point)
        elif layer is not None:
            continue
        else:
            scale = numpy_helper.to_array(tensors[dequant.input[1]])
            zero = numpy_helper.to_array(tensors[dequant.input[2]]) if len(dequant.input) > 2 and dequant.input[2] else None
        if codes.dtype != np.int8 or codes.ndim != 2 or scale.shape != (codes.shape[0],) or (zero is not None and zero.any()):
            continue  # only int8 symmetric per-row tables, the form int8 plans give tables
        stem = dequant.input[0].removesuffix(".codes")
        scale_name = f"{stem}.scale"
        if scale_name not in tensors and not any(i.name == scale_name for i in added):
            added.append(numpy_helper.from_array(scale.astype(np.float32), scale_name))
        base = node.name or node.output[0]
        axis = f"{base}/last_axis"
        added.append(numpy_helper.from_array(np.array([-1], np.int64), axis))
        replaced[id(node)] = [
            helper.make_node("Gather", [dequant.input[0], node.input[1]], [f"{base}/codes"], axis=0),
            helper.make_node("Cast", [f"{base}/codes"], [f"{base}/codes_float"], to=TensorProto.FLOAT),
            helper.make_node("Gather", [scale_name, node.input[1]], [f"{base}/row_scale"], axis=0),
            helper.make_node("Unsqueeze", [f"{base}/row_scale", axis], [f"{base}/row_scale_column"]),
            helper.make_node("Mul", [f"{base}/codes_float", f"{base}/row_scale_column"], [node.output[0]]),
        ]
        folded.append(dequant.input[0])
    if folded:
        nodes = [new for node in graph.node for new in replaced.get(id(node), [node])]
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(added)
        from edgeq.converters.onnx_graph_shape import remove_dead_nodes

        remove_dead_nodes(graph)  # the table DequantizeLinear nodes and whatever computed their inputs
    return folded
