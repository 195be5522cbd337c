"""Shape an exported int8 ONNX graph for ONNX Runtime's CPU kernels, the plan's numbers unchanged.

The exporter writes what PyTorch computed, op for op; ORT then pays for shapes its fusions do not expect.
Measured with ORT's profiler on all-MiniLM-L6-v2 (int8-dynamic, one thread, sequence 128; benchmarks/bench_speed.py):
  tables     DequantizeLinear(table codes) -> Gather dequantizes the whole [30522, 384] table on every call:
             17% of the run. `com.microsoft.GatherBlockQuantized` gathers the int8 rows first and dequantizes
             only those (exact: the same (code - zero point) * scale, checked against the plan in parity).
  shared x   q, k and v read the same tensor, yet each linear multiplied it by its SmoothQuant factors and
             quantized it again (three Mul + three DynamicQuantizeLinear). Linears whose factors are equal
             (calibration/smoothquant.py plans them per shared input) now share one Mul and one
             DynamicQuantizeLinear; ORT runs that as one quantization feeding three MatMulIntegerToFloat.
The rewrites only move and merge nodes: every artifact still carries the plan's codes and scales as parity reads them.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgeq.converters.onnx_lowbit import DTYPE_KEY, PACKED, SCALE, ZERO
from edgeq.converters.onnx_lowbit_gather import gather_block_quantized, table_refusal
from edgeq.plan import LayerPlan, OpKind

DOMAIN = "com.microsoft"
CODES_SUFFIX = ".weight.codes"


def gather_first_tables(proto, layers: dict[str, LayerPlan]) -> list[str]:
    """Replace DequantizeLinear(`<fqn>.weight.codes`) -> Gather(axis 0) by GatherBlockQuantized over the plan's
    table codes (int8 per row: uint8 storage, codes + 128, one block a row). Returns the table FQNs rewritten.

    A table the op cannot hold (table_refusal) keeps its DequantizeLinear: correct, only slower.
    """
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    tables = {fqn: layer for fqn, layer in layers.items() if layer.op == OpKind.EMBEDDING and layer.weight is not None and table_refusal(layer) is None}
    replaced, added, rewritten = {}, [], []
    for node in graph.node:
        if node.op_type != "Gather" or _int_attribute(node, "axis", 0) != 0 or node.input[0] not in producer:
            continue
        dequant = producer[node.input[0]]
        fqn = dequant.input[0].removesuffix(CODES_SUFFIX).removeprefix("inner.") if dequant.op_type == "DequantizeLinear" else None
        if fqn not in tables or not dequant.input[0].endswith(CODES_SUFFIX):
            continue
        gather, initializers = gather_block_quantized(node, fqn, tables[fqn], (PACKED, SCALE, ZERO), DTYPE_KEY, DOMAIN)
        if fqn not in rewritten:  # a table gathered twice shares its initializers
            added += initializers
            rewritten.append(fqn)
        replaced[id(node)] = gather
    if replaced:
        nodes = [replaced.get(id(node), node) for node in graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(added)
        _ensure_domain(proto, DOMAIN)
        remove_dead_nodes(graph)
    return rewritten


def share_input_transforms(graph) -> int:
    """Merge nodes that compute the same value: same op and inputs, equal constant operands (by value), no
    attributes that differ. Run to a fixed point, so Mul(x, s) nodes merge first and then the
    DynamicQuantizeLinear nodes reading their (now one) output. Only ops whose result depends on nothing
    else merge: Mul by a constant and DynamicQuantizeLinear. Returns the number of nodes removed."""
    from onnx import numpy_helper

    from edgeq.converters.parity import onnx_tensors

    removed = 0
    while True:
        tensors = onnx_tensors(graph)
        constant_key: dict[str, tuple] = {}

        def operand(name: str):
            if name not in tensors:
                return ("value", name)
            if name not in constant_key:
                array = numpy_helper.to_array(tensors[name])
                constant_key[name] = ("constant", array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes())
            return constant_key[name]

        seen: dict[tuple, object] = {}
        renames: dict[str, str] = {}
        kept = []
        for node in graph.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
            if node.op_type not in _MERGEABLE or node.domain not in ("", "ai.onnx") or not _mergeable(node, tensors):
                kept.append(node)
                continue
            key = (node.op_type, tuple(operand(name) for name in node.input), tuple(a.SerializeToString() for a in node.attribute))
            first = seen.get(key)
            if first is None:
                seen[key] = node
                kept.append(node)
                continue
            renames.update(zip(node.output, first.output))
            removed += 1
        if not renames:
            break
        del graph.node[:]
        graph.node.extend(kept)
        _rename_graph_outputs(graph, renames)
    remove_unused_initializers(graph)
    return removed


_MERGEABLE = {"Mul", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}


def _mergeable(node, tensors) -> bool:
    """Mul merges when one operand is a constant (SmoothQuant's x * (1 / s)); QuantizeLinear/DequantizeLinear
    when they act on an activation (a weight's DequantizeLinear keeps its own codes, which parity reads by
    name); DynamicQuantizeLinear always."""
    if node.op_type == "Mul":
        return sum(name in tensors for name in node.input) == 1
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return node.input[0] not in tensors
    return True


def _rename_graph_outputs(graph, renames: dict[str, str]) -> None:
    outputs = {o.name for o in graph.output}
    if outputs & set(renames):  # a merged node produced a graph output: keep its name with an Identity
        from onnx import helper

        for old in sorted(outputs & set(renames)):
            graph.node.append(helper.make_node("Identity", [renames[old]], [old], name=f"{old}/shared"))


def remove_dead_nodes(graph) -> None:
    """Drop nodes whose outputs nothing reads (and initializers no node reads)."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    kept.reverse()
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    remove_unused_initializers(graph)


def remove_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def splice(proto, graph, replaced: dict, dropped: set) -> None:
    """`graph`'s nodes in order with each node whose id is in `replaced` swapped for its fused node and those in
    `dropped` left out; the contrib domain declared for the fused nodes."""
    nodes = [replaced.get(id(node), node) for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    _ensure_domain(proto, DOMAIN)


def _ensure_domain(proto, domain: str) -> None:
    if not any(entry.domain == domain for entry in proto.opset_import):
        entry = proto.opset_import.add()
        entry.domain, entry.version = domain, 1


def _int_attribute(node, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return attribute.i
    return default


def consumers_of(graph) -> dict[str, list]:
    found = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            found[name].append(node)
    return found


def untranspose_weights(graph) -> list[str]:
    """MatMul(x, Transpose(DequantizeLinear(codes [out, in], axis 0))) -> MatMul(x, DequantizeLinear(codesᵀ, axis 1)).

    ORT fuses DequantizeLinear -> MatMul pairs into integer kernels (MatMulIntegerToFloat, QLinearMatMul) only
    when the weight's DequantizeLinear feeds the MatMul itself; the exporter's Transpose in between left every
    static layer a float MatMul behind two dequantizations per call. The codes are stored transposed as
    `<fqn>.weight.codes.T` (the parity reader transposes them back); scales and zero points are unchanged.
    Returns the codes names rewritten."""
    from onnx import helper, numpy_helper

    from edgeq.converters.parity import onnx_tensors

    tensors = onnx_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers = consumers_of(graph)
    replaced, rewritten, added = {}, [], []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producer:
            continue
        transpose = producer[node.input[1]]
        dequant = producer.get(transpose.input[0]) if transpose.op_type == "Transpose" else None
        if dequant is None or dequant.op_type != "DequantizeLinear" or not dequant.input[0].endswith(CODES_SUFFIX):
            continue
        codes = numpy_helper.to_array(tensors[dequant.input[0]]) if dequant.input[0] in tensors else None
        perm = [a.ints for a in transpose.attribute if a.name == "perm"]
        if codes is None or codes.ndim != 2 or (perm and list(perm[0]) != [1, 0]) or _int_attribute(dequant, "axis", 1) != 0:
            continue
        if len(consumers[transpose.output[0]]) != 1 or len(consumers[dequant.output[0]]) != 1:
            continue  # shared weights stay as they are
        name = f"{dequant.input[0]}.T"
        added.append(numpy_helper.from_array(np.ascontiguousarray(codes.T), name))
        weight = helper.make_node("DequantizeLinear", [name, *dequant.input[1:]], [f"{name}/dequantized"], name=f"{dequant.name or name}/T", axis=1)
        weight.metadata_props.extend(dequant.metadata_props)
        replaced[id(transpose)] = None
        replaced[id(dequant)] = weight
        node.input[1] = weight.output[0]
        rewritten.append(dequant.input[0])
        added += _bias_as_row(node, consumers, tensors)
    if rewritten:
        nodes = [replaced.get(id(node), node) for node in graph.node]
        del graph.node[:]
        graph.node.extend(node for node in nodes if node is not None)
        graph.initializer.extend({tensor.name: tensor for tensor in added}.values())  # a shared bias row once
        remove_unused_initializers(graph)
    return rewritten


def _bias_as_row(matmul, consumers, tensors) -> list:
    """Give the bias Add after `matmul` its bias as [1, N] (same values, same broadcast): ORT's MatMulAddFusion
    (level 1) turns MatMul + Add with a 1-D bias into a float Gemm before the QDQ fusions (level 2) can see the
    DequantizeLinear -> MatMul pair, and a [1, N] bias is outside what it fuses (measured on onnxruntime 1.32:
    [N] -> Gemm, [1, N] -> MatMulIntegerToFloat + Add). Returns the new initializer, if any."""
    from onnx import numpy_helper

    readers = consumers[matmul.output[0]]
    if len(readers) != 1 or readers[0].op_type != "Add":
        return []
    add = readers[0]
    for position, name in enumerate(add.input):
        if name in tensors and len(tensors[name].dims) == 1:
            row = f"{name}.row"
            add.input[position] = row
            return [numpy_helper.from_array(numpy_helper.to_array(tensors[name])[None, :], row)]
    return []


def shape_for_ort(proto, plan=None, static: bool = False, cpu: bool = True) -> list[str]:
    """The rewrites of this module on an exported graph: with `cpu` (the profile runs ORT's CPU execution provider
    only), LayerNormalization kept off the slow fused kernel, at every precision; with an int8 `plan` (int8-weight,
    int8-dynamic, w8a8, w8a16) the int8 rewrites too, and with `static` (w8a8, w8a16) the weight layout ORT's QDQ
    fusions need. Returns notes for the manifest."""
    notes = []
    unfused = unfuse_skip_layer_norm(proto.graph) if cpu else 0
    if unfused:
        notes.append(f"{unfused} residual Add(s) before LayerNormalization written as Sum (ORT's fused SkipLayerNormalization is slower on CPU)")
    gelus = fuse_gelu(proto) if cpu else 0
    if gelus:
        notes.append(f"{gelus} erf GELU subgraph(s) as com.microsoft.Gelu (ORT's GeluFusion misses the exporter's form)")
    if plan is None:
        return notes
    if static:
        untransposed = untranspose_weights(proto.graph)
        if untransposed:
            notes.append(f"{len(untransposed)} linear layers store int8 weights as [in, out] so ORT fuses DequantizeLinear -> MatMul into an integer kernel")
    folded = fold_smoothing_into_values(proto.graph)
    if folded:
        notes.append(f"{len(folded)} SmoothQuant input scaling(s) of attention output projections folded into the value "
                     "projection's output scale and bias (constants ORT folds at load: no runtime Mul)")
    tables = gather_first_tables(proto, plan.layers)
    if tables:
        notes.append(f"{len(tables)} int8 embedding table(s) gather rows first (GatherBlockQuantized): {', '.join(tables)}")
    merged = share_input_transforms(proto.graph)
    if merged:
        notes.append(f"{merged} duplicate input scalings/quantizations merged (layers reading the same tensor share them)")
    if cpu and not static:  # after the value fold above, which reads the unfused chain (converters/onnx_fusion.py)
        from edgeq.converters.onnx_fusion import fuse_multi_head_attention

        attention = fuse_multi_head_attention(proto)
        if attention:
            notes.append(f"{attention} self-attention core(s) as com.microsoft.MultiHeadAttention (one kernel instead of ~11)")
            from edgeq.converters.onnx_key_compress import skip_padded_keys

            compressed = skip_padded_keys(proto)
            if compressed:
                notes.append(f"{compressed} attention core(s) read only the keys attention_mask keeps (batch 1: Compress, "
                             "no bias, so ORT runs flash attention over the real tokens, not the padding)")
    return notes


def unfuse_skip_layer_norm(graph) -> int:
    """Write the residual Add that feeds each LayerNormalization as Sum (the same float addition of two inputs).

    ORT's SkipLayerNormFusion turns Add -> LayerNormalization into com.microsoft.SkipLayerNormalization, and that
    CPU kernel is the slow one in onnxruntime 1.32: on all-MiniLM-L6-v2 (one thread, sequence 128) its 13 nodes
    took 7.1 ms of a 25.8 ms run; the same graph with the fusion disabled ran LayerNormalization in 0.9 ms
    (ORT's profiler; FP32 and ORT's own quantize_dynamic graph pay it alike). The fusion matches Add only, so a
    Sum keeps ORT on the fast LayerNormalization kernel. Returns the number of Adds rewritten."""
    producer = {out: node for node in graph.node for out in node.output}
    rewritten = 0
    for node in graph.node:
        if node.op_type != "LayerNormalization" or node.input[0] not in producer:
            continue
        add = producer[node.input[0]]
        if add.op_type == "Add" and add.domain in ("", "ai.onnx") and len(add.input) == 2:
            add.op_type = "Sum"
            rewritten += 1
    return rewritten


_SQRT2 = float(np.float32(np.sqrt(2.0)))


def fuse_gelu(proto) -> int:
    """Replace the exporter's erf GELU, x * ((erf(x / sqrt 2) + 1) * 0.5), by one com.microsoft.Gelu(x), the same
    formula in one kernel. ORT's GeluFusion matches other operand orders only and left it as five ops: with the
    fusion here MiniLM int8-dynamic ran 17% faster and FP32 8% (one thread, interleaved rounds). Returns the
    number of subgraphs replaced."""
    from onnx import helper, numpy_helper

    from edgeq.converters.parity import onnx_tensors

    graph = proto.graph
    tensors = onnx_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers = consumers_of(graph)

    def constant(name):
        return float(numpy_helper.to_array(tensors[name])) if name in tensors and numpy_helper.to_array(tensors[name]).size == 1 else None

    def only_reader(node):
        readers = consumers[node.output[0]]
        return readers[0] if len(readers) == 1 else None

    def other(node, name):
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    replaced, dropped = {}, set()
    for erf in graph.node:
        if erf.op_type != "Erf" or erf.input[0] not in producer:
            continue
        scale = producer[erf.input[0]]
        x = scale.input[0]
        if not ((scale.op_type == "Div" and _close(constant(scale.input[1]), _SQRT2)) or
                (scale.op_type == "Mul" and _close(constant(scale.input[1]), 1 / _SQRT2))):
            continue
        add = only_reader(erf)
        if add is None or add.op_type != "Add" or not _close(constant(other(add, erf.output[0])), 1.0):
            continue
        first = only_reader(add)
        second = only_reader(first) if first is not None and first.op_type == "Mul" else None
        if second is None or second.op_type != "Mul":
            continue
        operands = {other(first, add.output[0]), other(second, first.output[0])}
        half = [name for name in operands if _close(constant(name), 0.5)]
        if len(half) != 1 or operands - set(half) != {x} or len(consumers[scale.output[0]]) != 1:
            continue
        gelu = helper.make_node("Gelu", [x], list(second.output), name=f"{second.name or second.output[0]}/Gelu", domain=DOMAIN)
        gelu.metadata_props.extend(second.metadata_props)  # the module scope per-layer taps read
        replaced[id(second)] = gelu
        dropped.update({id(scale), id(erf), id(add), id(first)})
    if replaced:
        splice(proto, graph, replaced, dropped)
        remove_unused_initializers(graph)
    return len(replaced)


def _close(value, expected: float) -> bool:
    return value is not None and abs(value - expected) <= 1e-6 * abs(expected)


def fold_smoothing_into_values(graph) -> list[str]:
    """Fold the SmoothQuant Mul in front of an attention output projection into the value projection (int8-dynamic).

    The projection reads softmax(q kᵀ) @ v with its heads merged back; every op on the way from v's linear to that
    Mul keeps each channel apart (Reshape into heads, Transpose, the right operand of MatMul, Transpose, Reshape
    back), so x * c there equals the same chain run on v * c: the Mul's constant c goes into v's dynamic-int8
    output scale and its bias. The plan's initializers stay as parity reads them: the folded values are
    Mul(`<fqn>.weight.scale`, c) and Mul(bias, c) over constants, which ORT's constant folding computes once at
    load. Measured on all-MiniLM-L6-v2 (one thread): 6 of 24 runtime Muls gone, 2% faster, cosine unchanged.
    Returns the constants folded."""
    from onnx import helper, numpy_helper

    from edgeq.converters.parity import onnx_tensors

    tensors = onnx_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers = consumers_of(graph)

    def single(name, op):
        node = producer.get(name)
        ok = node is not None and node.op_type == op and node.domain in ("", "ai.onnx") and len(consumers[name]) == 1
        return node if ok else None

    def constant(name):
        return numpy_helper.to_array(tensors[name]) if name in tensors else None

    def perm(node):
        return [list(a.ints) for a in node.attribute if a.name == "perm"] == [[0, 2, 1, 3]]

    dropped, added, folded = {}, [], []
    for mul in graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2 or mul.input[1] not in tensors or mul.input[0] in tensors:
            continue
        factor = constant(mul.input[1])
        if factor.ndim != 1:
            continue
        n = factor.shape[0]
        merge = single(mul.input[0], "Reshape")
        back = merge and single(merge.input[0], "Transpose")
        matmul = back and single(back.input[0], "MatMul")
        heads = matmul and single(matmul.input[1], "Transpose")
        split = heads and single(heads.input[0], "Reshape")
        add = split and single(split.input[0], "Add")
        if add is None or not (perm(back) and perm(heads)):
            continue
        merged, splits = constant(merge.input[1]), constant(split.input[1])
        if merged is None or splits is None or len(merged) != 3 or len(splits) != 4 or merged[-1] not in (-1, n):
            continue
        width = splits[-1] if splits[-1] > 0 else (n // splits[-2] if splits[-2] > 0 and n % splits[-2] == 0 else 0)
        if width <= 0 or n % width or splits[-2] not in (-1, n // width) or splits[-1] not in (-1, width):
            continue  # not an [.., heads, head_dim] split of the N channels
        bias_at = [i for i, name in enumerate(add.input) if name in tensors]
        product = single(add.input[1 - bias_at[0]], "Mul") if len(bias_at) == 1 else None
        scales = next((single(i, "Mul") for i in product.input if single(i, "Mul") is not None), None) if product is not None else None
        weight_scale = next((i for i in scales.input if i.endswith(".weight.scale")), None) if scales is not None else None
        bias = constant(add.input[bias_at[0]]) if bias_at else None
        if weight_scale is None or bias is None or bias.shape[-1] != n or constant(weight_scale).shape[-1] != n:
            continue
        base = mul.output[0]
        added.append(helper.make_node("Mul", [weight_scale, mul.input[1]], [f"{base}/folded_scale"], name=f"{base}/fold_scale"))
        added.append(helper.make_node("Mul", [add.input[bias_at[0]], mul.input[1]], [f"{base}/folded_bias"], name=f"{base}/fold_bias"))
        scales.input[list(scales.input).index(weight_scale)] = f"{base}/folded_scale"
        add.input[bias_at[0]] = f"{base}/folded_bias"
        dropped[id(mul)] = (mul.output[0], mul.input[0])
        folded.append(mul.input[1])
    if folded:
        renames = dict(dropped.values())
        nodes = added + [node for node in graph.node if id(node) not in dropped]
        for node in nodes:
            node.input[:] = [renames.get(name, name) for name in node.input]
        del graph.node[:]
        graph.node.extend(nodes)
    return folded
