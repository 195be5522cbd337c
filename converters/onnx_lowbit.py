"""ONNX Runtime low-bit weights: a plan's 4/3/2-bit codes as `com.microsoft.MatMulNBits`, written exactly.

Why MatMulNBits (docs/research lowbit-prune-peers.md §2.5, measured on this machine with ORT 1.32): it is the
kernel ORT runs anyway (a blocked int4 DequantizeLinear + MatMul is fused into it at ORT_ENABLE_ALL, with int8
activations unless a session option says otherwise), and only the native op lets the artifact state its
`accuracy_level`: int4-weight / int3-weight / int2-weight deploy at level 1 (fp32 math: the product of the
plan's dequantized weights to ~1e-6), int4-dynamic at level 4 (activations quantized to int8 per block at run
time: ~1e-2 relative). Unfused DQ + MatMul dequantizes on every call (12x slower than fp32 at one token).

The layout (ContribOperators.md, MatMulNBits; verified in tests/converters/test_onnx_lowbit.py):
    Y = A @ dequant(B)^T,  dequant(B)[n, k] = (q[n, k] - zp[n, k // block_size]) * scales[n, k // block_size]
    B           uint8 [N, k_blocks, block_size * bits / 8], codes packed low bits first
    scales      float32 [N * k_blocks] (A's dtype: any float32 plan scale is held exactly)
    zero_points uint8 [N * ceil(k_blocks * bits / 8)], packed like B, per row; absent = 2^(bits-1)
    block_size  a power of two >= 16
The plan's codes go in unchanged up to an offset: signed codes c (INT4 [-8, 7], INT3 [-4, 3], INT2 [-2, 1],
zero 0) are stored as c + 2^(bits-1) with the default zero point; unsigned codes (UINT*) are stored as they are
with the plan's zero points packed. 3-bit codes live in the 4-bit container (bits=4: INT3 codes in [-4, 3],
stored 4..11; UINT3 codes and zero points in [0, 7]); the file is then 4 bits a weight. 2-bit codes go in the
same 4-bit container (see CONTAINER_BITS: ORT's 2-bit kernel is slow at fp32 accuracy levels). Per-channel plans are one
block per row: block_size is the smallest power of two >= K and the padding past K holds the zero point.

8-bit codes per group (an int8 layer of a mixed plan) go in bits=8 (stored c + 128, default zero point); int8 per
channel keeps the int8 route (DequantizeLinear). Embedding tables: converters/onnx_lowbit_gather.py
(com.microsoft.GatherBlockQuantized, the same initializer names and metadata).

Each MatMulNBits node carries `edgeq.weight_dtype` (the plan's code dtype) in its metadata, and its initializers
are named `<fqn>.weight.packed` / `.scale` / `.zero_point`, so `read_matmul_nbits` returns the plan's form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.converters.base import Refusal
from edgeq.converters.onnx_nbits_pack import PackedWeight, pack_layer, pack_rows, unpack_layer, unpack_rows  # noqa: F401
from edgeq.errors import ConversionError
from edgeq.plan import LayerPlan, OpKind, PerChannel, PerGroup, QDtype, QuantPlan
from edgeq.targets import Precision

DOMAIN = "com.microsoft"
LOW_BIT = frozenset({Precision.INT4_WEIGHT, Precision.INT3_WEIGHT, Precision.INT2_WEIGHT, Precision.INT4_DYNAMIC})
# accuracy_level: 1 = fp32 math (weight error only); 4 = int8 activations per block (the fast CPU path).
ACCURACY_LEVEL = {Precision.INT4_DYNAMIC: 4}
FLOAT_ACCURACY_LEVEL = 1
# The container each plan dtype is stored in. 3-bit: MatMulNBits has no 3-bit kernel. 2-bit: bits=2 exists, but
# at fp32 accuracy levels ORT 1.32 runs it through a per-call dequantizing fallback, measured here
# (benchmarks/bench_onnx_lowbit.py, 12 x 768x768, one thread) 2.6x slower than FP32 at 128 tokens and 8.7x at one,
# while the same codes in bits=4 run the fast 4-bit kernel (5.7x faster than FP32 at one token): int2-weight is
# stored in 4 bits, exact, at 4-bit size. bits=2 packing is kept (pack_rows, the reader) for a 2-bit int8-activation
# scheme, where ORT has fast W2 kernels.
CONTAINER_BITS = {
    QDtype.INT4: 4, QDtype.UINT4: 4, QDtype.INT3: 4, QDtype.UINT3: 4, QDtype.INT2: 4, QDtype.UINT2: 4,
}
# 8-bit codes of a mixed plan's linear layers and tables (an int8 fallback, per channel or per group) go in bits=8.
# Not DequantizeLinear + MatMul, as int8 plans lower them: ORT_ENABLE_EXTENDED fuses that pair into a MatMulNBits at
# the session's default accuracy_level 4 (measured, ORT 1.32: 48 dB against PyTorch instead of 135 dB), so an int8
# layer of a float-activation scheme would silently get int8 activations; the native op states its level. Per channel
# is one block a row, padded past K with the zero point (e.g. K 384 in a block of 512: 10.7 bits a weight stored).
EIGHT_BIT = {QDtype.INT8: 8, QDtype.UINT8: 8}
MIN_BLOCK = 16  # MatMulNBits: block_size is a power of two, at least 16
DTYPE_KEY = "edgeq.weight_dtype"
PACKED, SCALE, ZERO = ".weight.packed", ".weight.scale", ".weight.zero_point"


def accuracy_level(precision: Precision, profile=None) -> int:
    """The level `precision` deploys with: the profile's `dynamic_accuracy_level` for int4-dynamic (where it
    states one), else ACCURACY_LEVEL; float-activation schemes at 1."""
    if precision in ACCURACY_LEVEL and profile is not None and profile.quantization.dynamic_accuracy_level is not None:
        return profile.quantization.dynamic_accuracy_level
    return ACCURACY_LEVEL.get(precision, FLOAT_ACCURACY_LEVEL)


def is_lowbit(layer: LayerPlan) -> bool:
    """Packed by this module (MatMulNBits; GatherBlockQuantized for tables): codes of 4 bits or fewer, and the 8-bit
    codes of linear layers and tables (see EIGHT_BIT); an int8 convolution takes the int8 route (DequantizeLinear)."""
    if layer.weight is None:
        return False
    return layer.weight.dtype in CONTAINER_BITS or (
        layer.weight.dtype in EIGHT_BIT and layer.op in (OpKind.LINEAR, OpKind.EMBEDDING)
    )


def _container(dtype: QDtype) -> int:
    return CONTAINER_BITS.get(dtype) or EIGHT_BIT[dtype]


@dataclass(frozen=True)
class NBitsLayout:
    """How one layer's [N, K] codes sit in MatMulNBits."""

    bits: int  # container width: 2 or 4
    block_size: int
    n: int
    k: int
    offset: int  # stored = code + offset (2^(bits-1) for signed codes, 0 for unsigned)

    @property
    def k_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def default_zero(self) -> int:
        return 2 ** (self.bits - 1)


def _next_power_of_two(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def layout_of(layer: LayerPlan) -> NBitsLayout | str:
    """The MatMulNBits layout of a low-bit layer, or why it has none (what would work instead)."""
    quant = layer.weight
    if layer.op != OpKind.LINEAR:
        return f"{quant.dtype} weights lower to MatMulNBits for linear layers only, not {layer.op.value}; keep it int8 or float"
    if layer.weight_codes is None or layer.weight_codes.ndim != 2:
        return "a low-bit layer needs its [N, K] weight codes in the plan"
    n, k = layer.weight_codes.shape
    granularity = quant.granularity
    if isinstance(granularity, PerGroup) and granularity.axis == 1:
        size = granularity.size
        if size < MIN_BLOCK or size & (size - 1):
            return f"group size {size}: MatMulNBits blocks are powers of two >= {MIN_BLOCK} (e.g. 32, 64, 128)"
        if k % size:
            return f"{k} input features are not a multiple of the group size {size}"
        block = size
    elif isinstance(granularity, PerChannel) and granularity.axis == 0:
        block = max(MIN_BLOCK, _next_power_of_two(k))  # one block per row, padded past K with the zero point
    else:
        return f"{granularity.to_json()}: MatMulNBits holds groups along the input axis (per_group axis 1) or per output channel"
    bits = _container(quant.dtype)
    return NBitsLayout(bits, block, n, k, 2 ** (bits - 1) if quant.dtype.signed else 0)


def check_plan(plan: QuantPlan | None, precision: Precision) -> list[Refusal]:
    """Every planned layer this packer cannot hold, found before any work (nothing to check before the plan
    exists: the pipeline checks the request first, and resolve holds the plan to the profile's grid)."""
    if plan is None:
        return []
    from edgeq.converters.onnx_lowbit_gather import is_table, table_refusal

    refusals = []
    for fqn, layer in plan.layers.items():
        if layer.weight is None:
            continue
        dtype, granularity = layer.weight.dtype, layer.weight.granularity
        if dtype in EIGHT_BIT and not is_lowbit(layer):
            if not isinstance(granularity, PerChannel):
                refusals.append(Refusal(fqn, f"{dtype} {granularity.to_json()['kind']} weights on a {layer.op.value} layer: int8 lowers per channel there"))
            continue  # the int8 route (DequantizeLinear), as in any int8 plan
        if dtype not in CONTAINER_BITS and dtype not in EIGHT_BIT:
            refusals.append(Refusal(fqn, f"{dtype} weights: MatMulNBits holds int2/int3/int4 and uint2/uint3/uint4 codes"))
            continue
        if layer.activation is not None or layer.output is not None or layer.smooth is not None:
            refusals.append(Refusal(fqn, "low-bit weights lower with float or dynamic activations only (no static activation points, no smoothing)"))
            continue
        if is_table(layer):
            reason = table_refusal(layer)
            if reason:
                refusals.append(Refusal(fqn, reason))
            continue
        found = layout_of(layer)
        if isinstance(found, str):
            refusals.append(Refusal(fqn, found))
    return refusals


def split_plan(plan: QuantPlan | None) -> tuple[dict[str, LayerPlan], QuantPlan]:
    """(the low-bit layers, the plan of the rest): int8 layers of a low-bit plan (a sensitive layer's fallback)
    lower as int8 DequantizeLinear as in any int8 plan."""
    if plan is None:
        raise ConversionError("low-bit schemes lower a quantization plan (codes and scales); none was given")
    lowbit = {fqn: layer for fqn, layer in plan.layers.items() if is_lowbit(layer)}
    rest = QuantPlan(plan.scheme, plan.target, {f: l for f, l in plan.layers.items() if f not in lowbit}, list(plan.notes),
                     dict(plan.tensors), list(plan.inputs))
    return lowbit, rest


def lower_lowbit(proto, layers: dict[str, LayerPlan], precision: Precision, target: str, model=None, profile=None) -> list[str]:
    """Rewrite the exported graph's planned layers into MatMulNBits (tables: GatherBlockQuantized); refuses (ConversionError) a layer that is
    in the graph but could not be rewritten, rather than ship it float. Returns the artifact's notes (with
    `model`, a LoadedModel, and a level above 1: the kernel's error apart from the weights', on its example)."""
    from edgeq.converters.onnx_lowbit_gather import is_table, rewrite_gathers

    level = accuracy_level(precision, profile)
    tables = {fqn: layer for fqn, layer in layers.items() if is_table(layer)}
    gathered = rewrite_gathers(proto, tables, (PACKED, SCALE, ZERO), DTYPE_KEY, DOMAIN) if tables else []
    linears = {fqn: layer for fqn, layer in layers.items() if fqn not in tables}
    rewritten, scoped = rewrite_matmul_nbits(proto, linears, level)
    named = {i.name for i in proto.graph.initializer} | {n for node in proto.graph.node for n in node.input}
    present = scoped | {f for f in layers if any(n.startswith((f"{f}.", f"inner.{f}.")) for n in named)}
    left = sorted((set(layers) - set(rewritten) - set(gathered)) & present)
    if left:
        raise ConversionError(
            f"target {target}: {precision} could not lower layer(s) {', '.join(left[:5])} to MatMulNBits or "
            "GatherBlockQuantized (their weight is not a constant input of one MatMul/Gemm, or table of one Gather, in "
            "the exported graph); keep them float with --keep-float"
        )
    notes = [_tables_note(tables, gathered)] if tables else []
    _drop_unused_initializers(proto)
    if gathered and not any(o.domain == DOMAIN for o in proto.opset_import):
        from onnx import helper

        proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if not rewritten:
        return notes
    bits = sorted({_container(layers[f].weight.dtype) for f in rewritten})
    math = "int8 activations quantized per block at run time" if level == 4 else "fp32 math"
    notes.append(
        f"{len(set(rewritten))} linear layers run as com.microsoft.MatMulNBits ({'/'.join(map(str, bits))}-bit), "
        f"accuracy_level={level} ({math})"
    )
    narrow = sorted({layers[f].weight.dtype.bits for f in rewritten if layers[f].weight.dtype.bits < _container(layers[f].weight.dtype)})
    if narrow:
        widths = "/".join(map(str, narrow))
        notes.append(f"{widths}-bit codes are stored in 4-bit MatMulNBits containers (bits=4): the file holds 4 bits a weight")
    if model is not None and level != FLOAT_ACCURACY_LEVEL and rewritten:
        notes.append(accuracy_levels_note(proto, model, level))
    return notes


def _tables_note(tables: dict[str, LayerPlan], gathered: list[str]) -> str:
    lost = sorted(set(tables) - set(gathered))
    forms = sorted({f"{tables[f].weight.dtype} per block of {g.size}" if isinstance(g := tables[f].weight.granularity, PerGroup)
                    else f"{tables[f].weight.dtype} per row" for f in gathered})
    return (
        f"{len(set(gathered))} embedding table(s) run as com.microsoft.GatherBlockQuantized ({', '.join(forms)}): rows "
        "are gathered first, then only they are dequantized"
        + (f"; not in the exported graph (removed or folded by the exporter): {', '.join(lost)}" if lost else "")
    )


def _drop_unused_initializers(proto) -> None:
    """The float tables and weights the rewrites replaced are no longer read by any node."""
    graph = proto.graph
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)


def accuracy_levels_note(proto, model, level: int) -> str:
    """The artifact against FP32 PyTorch on the model's example input, at `level` (deployed) and at level 1 (the
    plan's weights in fp32 math): the weights' error and the kernel's int8 activations' error apart."""
    import onnxruntime as ort

    from edgeq.calibration.collect import run_module
    from edgeq.validate.metrics import sqnr_db

    if proto.ByteSize() >= 2**31 - 1:  # a session from bytes holds up to 2 GiB; validation still runs the file
        return f"accuracy_level {level} vs 1 not compared at conversion (graph over 2 GiB)"
    sample = {name: tensor.numpy() for name, tensor in zip(model.input_names, model.example_inputs)}
    (reference,) = run_module(model.module, [sample], model.input_names, model.outputs, "FP32 reference")
    floats = [name for name in model.outputs if np.issubdtype(reference[name].dtype, np.floating)]
    figures = {}
    for run_level in (level, FLOAT_ACCURACY_LEVEL):
        session = ort.InferenceSession(with_accuracy_level(proto, run_level).SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = dict(zip(floats, session.run(floats, sample)))
        figures[run_level] = min(sqnr_db(reference[name], outputs[name]) for name in floats)
    return (
        f"example input vs FP32 PyTorch: SQNR {figures[level]:.1f} dB at accuracy_level {level} (deployed), "
        f"{figures[FLOAT_ACCURACY_LEVEL]:.1f} dB at level 1 (the plan's weights in fp32 math): the difference is the kernel's"
    )


# -- the graph ------------------------------------------------------------------------------------------------


def dequantized_weights(module, layers: dict[str, LayerPlan]):
    """A copy of `module` whose low-bit linear layers hold the plan's dequantized weights (float32).

    The exporter writes these floats into the graph; `rewrite_matmul_nbits` then finds each layer's MatMul/Gemm
    by them (bit for bit) and replaces it. It is also the PyTorch reference an artifact is validated against."""
    import copy

    import torch

    from edgeq.compress.apply import user_fqn

    result = copy.deepcopy(module)
    found = set()
    for name, child in result.named_modules():
        layer = layers.get(user_fqn(name))
        if layer is None:
            continue
        dequantized = layer.weight.dequantize(layer.weight_codes)
        if tuple(child.weight.shape) != dequantized.shape:
            raise ConversionError(f"{layer.fqn}: the plan's codes are {dequantized.shape}, the layer's weight {tuple(child.weight.shape)}")
        with torch.no_grad():
            child.weight.copy_(torch.from_numpy(dequantized))
        found.add(layer.fqn)
    missing = sorted(set(layers) - found)
    if missing:
        raise ConversionError(f"the plan names layers the model does not have: {', '.join(missing[:5])}")
    return result.eval()


def _scope(node) -> str | None:
    """The torch module FQN (wrapper prefix removed) the exporter recorded for `node`, if any."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return scopes[-2].removeprefix("inner.") if len(scopes) >= 2 else None
    return None


def rewrite_matmul_nbits(proto, layers: dict[str, LayerPlan], level: int) -> tuple[list[str], set[str]]:
    """Replace each planned layer's MatMul / Gemm in place with MatMulNBits over the plan's packed codes.

    A node is a layer's when its constant weight equals the plan's dequantized weight bit for bit ([K, N] for
    MatMul and Gemm, [N, K] for Gemm transB=1); equal weights of two layers are told apart by the node's module
    scope. The bias stays an Add after the MatMulNBits. Returns (rewritten FQNs, once per node, and the FQNs
    some node's module scope names)."""
    from onnx import helper, numpy_helper

    from edgeq.converters.parity import onnx_tensors

    graph = proto.graph
    tensors = onnx_tensors(graph)
    from edgeq.converters.onnx_lowbit_gather import by_dequantized_value

    by_weight = by_dequantized_value(layers)
    scoped = {s for s in (_scope(node) for node in graph.node) if s}

    def owner(node) -> str | None:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in tensors:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            return None
        weight = numpy_helper.to_array(tensors[node.input[1]])
        if weight.ndim != 2 or weight.dtype != np.float32:
            return None
        if not attrs.get("transB", 0):
            weight = weight.T
        candidates = by_weight.get((weight.shape, np.ascontiguousarray(weight).tobytes()), [])
        if len(candidates) > 1:
            candidates = [fqn for fqn in candidates if fqn == _scope(node)]
        return candidates[0] if len(candidates) == 1 else None

    rewritten, nodes, initializers = [], [], []
    for node in graph.node:
        fqn = owner(node)
        if fqn is None:
            nodes.append(node)
            continue
        packed = pack_layer(layers[fqn])
        lay = packed.layout
        names = [f"{fqn}{PACKED}", f"{fqn}{SCALE}"] + ([f"{fqn}{ZERO}"] if packed.zero_points is not None else [])
        if fqn not in rewritten:  # a weight used twice shares its packed initializers
            initializers += [numpy_helper.from_array(packed.b, names[0]), numpy_helper.from_array(packed.scales, names[1])]
            if packed.zero_points is not None:
                initializers.append(numpy_helper.from_array(packed.zero_points, names[2]))
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}/matmul_nbits" if has_bias else node.output[0]
        replacement = helper.make_node(
            "MatMulNBits", [node.input[0], *names], [product], name=f"{node.name or fqn}/MatMulNBits", domain=DOMAIN,
            K=lay.k, N=lay.n, bits=lay.bits, block_size=lay.block_size, accuracy_level=level,
        )
        replacement.metadata_props.extend(node.metadata_props)  # the module scopes layer taps read
        tag = replacement.metadata_props.add()
        tag.key, tag.value = DTYPE_KEY, layers[fqn].weight.dtype.value
        nodes.append(replacement)
        if has_bias:  # keep the bias add (Gemm's C broadcasts over rows like Add)
            add = helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name or fqn}/bias")
            add.metadata_props.extend(node.metadata_props)
            nodes.append(add)
        rewritten.append(fqn)
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(initializers)
        used = {name for node in graph.node for name in node.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        if not any(o.domain == DOMAIN for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return rewritten, scoped


def read_matmul_nbits(graph, tensors: dict) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{user FQN: (codes [N, K], scale, zero point)} of every MatMulNBits over `<fqn>.weight.packed`, unpacked to
    the plan's form (per-channel layers: scale and zero point [N])."""
    from onnx import helper, numpy_helper

    found = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits" or not node.input[1].endswith(PACKED):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        meta = {p.key: p.value for p in node.metadata_props}
        dtype = QDtype(meta[DTYPE_KEY]) if DTYPE_KEY in meta else None
        zero_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
        codes, scale, zero = unpack_layer(
            numpy_helper.to_array(tensors[node.input[1]]),
            numpy_helper.to_array(tensors[node.input[2]]),
            numpy_helper.to_array(tensors[zero_name]) if zero_name else None,
            attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"], dtype,
        )
        if scale.shape[1] == 1 and attrs["block_size"] >= attrs["K"]:  # one block a row: per channel
            scale, zero = scale[:, 0], zero[:, 0]
        found[node.input[1].removesuffix(PACKED).removeprefix("inner.")] = (codes, scale, zero)
    from edgeq.converters.onnx_lowbit_gather import read_gathers

    return found | read_gathers(graph, tensors, PACKED, DTYPE_KEY)


def with_accuracy_level(proto, level: int):
    """A copy of `proto` whose MatMulNBits nodes run at `level` (validation compares levels 1 and 4)."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in copy.graph.node:
        if node.op_type == "MatMulNBits":
            set_accuracy_level(node, level)
    return copy


def set_accuracy_level(node, level: int) -> None:
    """`node` (a MatMulNBits) runs at `level` from now on, in place."""
    from onnx import helper

    kept = [a for a in node.attribute if a.name != "accuracy_level"]
    del node.attribute[:]
    node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
