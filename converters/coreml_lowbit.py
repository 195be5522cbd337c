"""Core ML packer for low-bit weights: the plan's codes, scales and palettes written verbatim as iOS18
compile-time ops (research: shared/research/lowbit-prune-peers.md §4).

Two forms, each one MIL op over the weight of an nn.Linear, which the `linear` op then reads (or of an
nn.Embedding table, which MIL `gather` reads: 4-bit tables per group along D, and 8-bit codes per group, take
the affine form with int8/uint8 data):
  affine (int4/int3/int2-weight)  constexpr_blockwise_shift_scale(data, scale, offset?) = scale * (data - offset)
      data   int4 [N, K] (signed codes) or uint4 (unsigned codes): the plan's weight_codes. 3- and 2-bit codes
             are held in the 4-bit container (Core ML has no int3/int2 data type), so they cost 4 bits each;
      scale  fp16 [N, K/g] per group of g input columns ([N, 1] per channel): the plan's scales, which must
             be fp16 numbers already (the profiles' scale_dtype): this packer never rounds them;
      offset uint4/int4 [N, K/g], only where a zero point is not 0 (asymmetric grids).
  palette (lut*-weight)  constexpr_lut_to_dense(indices, lut) = lut[n // group_channels, 0, indices[n, k], 0]
      indices uint{bits} [N, K] (bits 1, 2, 3, 4, 6, 8) and lut fp16 [N / group_channels, 1, 2^bits, 1]:
      calibration/lowbit/kmeans.py's Palette (one LUT per tensor or per block of output channels).

How the exact numbers get there (research §4.3, route 4 with route 1's shape): each layer's weight becomes a
custom torch op over buffers holding the plan's arrays (`edgeq_coreml::blockwise_weight`,
`edgeq_coreml::lut_weight`); torch.export keeps it as one node, and this module registers a coremltools
frontend conversion for it that builds the constexpr op from those arrays as they are (no re-rounding, no
value-range guessing of the data type). The converter names each node after its layer (parity_coreml's
`mil_name`), and the parity reader reads the stored op back into the plan's form.

Where Core ML runs them: per-block int4 runs on the CPU and GPU (the `coreml` and `coreml-cpu` profiles);
the Neural Engine does not take per-block scales (coremltools#2510: "ANE only support per-cout/per-tensor
quantization", falls back to CPU; apple/coreai-models#279: per-block weights gave cosine 0.367 on the ANE
with no error), so `coreml-ane` offers palettes only. Apple's runtime is not available on Linux: artifacts are
executed here by edgeq's MIL reference executor, which is bit-exact with coremltools' decompression.

Palettes in a plan (proposed contract; `lut_layer` builds it): LayerPlan.weight None, LayerPlan.weight_codes =
the indices uint8 [N, K], and LayerPlan.palette = the LUTs float32 [N / group_channels, 2^bits] (row g is
the table of output channels g*group_channels .. (g+1)*group_channels - 1; one row: per tensor), values fp16.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgeq.compress.apply import user_fqn
from edgeq.compress.qdq import _bias
from edgeq.converters.base import Refusal
from edgeq.plan import LayerPlan, OpKind, PerChannel, PerGroup, QDtype, QuantPlan
from edgeq.targets import Precision, TargetProfile
from edgeq.targets.profile import Granularity

AFFINE = frozenset({Precision.INT4_WEIGHT, Precision.INT3_WEIGHT, Precision.INT2_WEIGHT})
PALETTES = frozenset({
    Precision.LUT2_WEIGHT, Precision.LUT3_WEIGHT, Precision.LUT4_WEIGHT, Precision.LUT6_WEIGHT, Precision.LUT8_WEIGHT,
})
LOWBIT = AFFINE | PALETTES
# constexpr_blockwise_shift_scale with sub-byte data, per-grouped-channel LUTs and uint3 indices are iOS18 ops.
LOWBIT_MIN_TARGET = "iOS18"
AFFINE_DTYPES = frozenset({QDtype.INT2, QDtype.INT3, QDtype.INT4, QDtype.UINT2, QDtype.UINT3, QDtype.UINT4})
PALETTE_BITS = (1, 2, 3, 4, 6, 8)  # constexpr_lut_to_dense's index types uint1 .. uint8 (no uint5 / uint7)
CONTAINER_BITS = 4  # int2/int3 codes are stored as int4: Core ML's narrowest affine data type
# 8-bit codes per group (a mixed plan's int8 layer with blocks along K) take the same op with int8/uint8 data;
# int8 per channel keeps the int8 route (constexpr_affine_dequantize), as in int8 plans.
BLOCKWISE_8BIT = frozenset({QDtype.INT8, QDtype.UINT8})


# ---- the plan side ----------------------------------------------------------------------------------------


def palette_of(layer: LayerPlan) -> np.ndarray | None:
    """The layer's LUTs float32 [groups, 2^bits], or None for a layer without a palette."""
    palette = getattr(layer, "palette", None)  # the proposed LayerPlan field; absent until it lands
    return None if palette is None else np.asarray(palette, dtype=np.float32)


def lut_layer(fqn: str, palette, op: OpKind = OpKind.LINEAR) -> LayerPlan:
    """The plan entry of a palettized layer from calibration/lowbit/kmeans.py's `Palette` (lut [G, 2^bits],
    indices uint8 [N, K]): weight_codes = indices, palette = lut as float32; weight stays None."""
    indices = palette.indices.detach().cpu().numpy().astype(np.uint8)
    lut = palette.lut.detach().cpu().numpy().astype(np.float32)
    return LayerPlan(fqn, op, weight_codes=indices, palette=lut)


def is_lowbit(layer: LayerPlan) -> bool:
    """Packed here: a palette, affine codes of 4 bits or fewer, or 8-bit codes per group (int8 per channel takes
    the int8 route)."""
    if palette_of(layer) is not None:
        return True
    quant = layer.weight
    return quant is not None and (quant.dtype in AFFINE_DTYPES or (quant.dtype in BLOCKWISE_8BIT and isinstance(quant.granularity, PerGroup)))


def palette_bits(lut: np.ndarray) -> int:
    entries = lut.shape[-1]
    return entries.bit_length() - 1 if entries > 0 and entries & (entries - 1) == 0 else -1


# ---- check: every layer, before any work -----------------------------------------------------------------


def check_plan(plan: QuantPlan, profile: TargetProfile, module: nn.Module) -> list[Refusal]:
    """Every layer of a low-bit plan this target cannot hold exactly as planned, with what would work."""
    caps = profile.quantization
    linears = {user_fqn(name): child for name, child in module.named_modules() if isinstance(child, (nn.Linear, nn.Embedding))}
    refusals = []
    for fqn, layer in plan.layers.items():
        if not is_lowbit(layer):
            if layer.weight is not None and (layer.weight.dtype != QDtype.INT8 or not isinstance(layer.weight.granularity, PerChannel)):
                refusals.append(Refusal(fqn, f"{layer.weight.describe()} weights: Core ML lowers int8 per channel or "
                                             "low-bit (4 bits or fewer, or a palette) weights"))
            continue
        linear = linears.get(fqn)
        if linear is None or (isinstance(linear, nn.Embedding) and palette_of(layer) is not None):
            refusals.append(Refusal(fqn, "low-bit weights are lowered for nn.Linear layers and (affine, not palettes) "
                                         "nn.Embedding tables, and the model has no such layer by this name; keep it float or int8"))
            continue
        reason = _weight_only(layer) or (
            _check_palette(layer, palette_of(layer), linear, profile) if palette_of(layer) is not None
            else _check_affine(layer, linear, profile)
        )
        if reason:
            refusals.append(Refusal(fqn, reason))
    if caps.scale_dtype != "float16" and any(is_lowbit(layer) for layer in plan.layers.values()):
        refusals.append(Refusal("", f"target {profile.id} states scale_dtype {caps.scale_dtype}, but Core ML low-bit "
                                    "programs compute in float16 and store fp16 scales and LUTs; the profile needs float16"))
    return refusals


def _weight_only(layer: LayerPlan) -> str | None:
    extras = [name for name in ("activation", "dynamic_activation", "output", "smooth") if getattr(layer, name) is not None]
    if extras:
        return (f"low-bit Core ML weights take float activations (weight-only), but the plan also has {', '.join(extras)} "
                "(Core ML has no run-time activation quantization); plan this layer weight-only")
    return None


def _check_affine(layer: LayerPlan, linear: nn.Linear, profile: TargetProfile) -> str | None:
    quant, codes, caps = layer.weight, layer.weight_codes, profile.quantization
    shape = tuple(linear.weight.shape)
    held = ", ".join(caps.weight_dtypes) or "no quantized weights"
    if quant.dtype.value not in caps.weight_dtypes:
        lut = [d for d in caps.weight_dtypes if d.startswith("lut")]
        hint = f"; k-means palettes ({', '.join(lut)}-weight) are its low-bit form" if lut else ""
        return f"{quant.dtype} weights: target {profile.id} holds {held}{hint}"
    if not quant.symmetric and caps.weight_symmetric:
        return f"asymmetric {quant.dtype} weights: target {profile.id} holds symmetric low-bit weights only (signed codes, zero point 0)"
    if codes is None or codes.shape != shape:
        return f"weight_codes {None if codes is None else codes.shape}; the layer's weight is {shape} ([N out, K in])"
    if codes.dtype != quant.dtype.storage or codes.size and (codes.min() < quant.dtype.qmin or codes.max() > quant.dtype.qmax):
        return f"weight_codes ({codes.dtype}) do not all lie in {quant.dtype}'s range [{quant.dtype.qmin}, {quant.dtype.qmax}]"
    granularity = quant.granularity
    if isinstance(granularity, PerGroup):
        if Granularity.PER_GROUP not in caps.weight_granularity or granularity.size not in caps.group_sizes:
            sizes = ", ".join(map(str, caps.group_sizes)) or "none"
            return f"group size {granularity.size}: target {profile.id} runs groups of {sizes} input columns"
        if granularity.axis != 1 or shape[1] % granularity.size or quant.scale.shape != (shape[0], shape[1] // granularity.size):
            return (f"groups of {granularity.size} along axis {granularity.axis} with scales {quant.scale.shape}: Core ML "
                    f"blocks run along K (axis 1) of [N, K] = {shape}, scales [N, K/group]")
    elif isinstance(granularity, PerChannel):
        if Granularity.PER_CHANNEL not in caps.weight_granularity:
            return f"per-channel {quant.dtype} weights: target {profile.id} holds them per group; plan with a group size"
        if granularity.axis != 0 or quant.scale.shape != (shape[0],):
            return f"per-channel scales {quant.scale.shape} on axis {granularity.axis}: expected [N out] = ({shape[0]},) on axis 0"
    else:
        return f"{granularity.to_json()['kind']} low-bit weights: Core ML blocks are per group along K or per output channel"
    return _fp16_exact(quant.scale, "scales", profile)


def _check_palette(layer: LayerPlan, lut: np.ndarray, linear: nn.Linear, profile: TargetProfile) -> str | None:
    indices, caps, shape = layer.weight_codes, profile.quantization, tuple(linear.weight.shape)
    bits = palette_bits(lut)
    if lut.ndim != 2 or bits not in PALETTE_BITS:
        return f"palette {lut.shape}: expected [groups, 2^bits] with bits in {PALETTE_BITS} (Core ML's index types)"
    if f"lut{bits}" not in caps.weight_dtypes:
        held = ", ".join(d for d in caps.weight_dtypes if d.startswith("lut")) or "none"
        return f"{bits}-bit palettes: target {profile.id} holds palettes of {held}"
    if indices is None or indices.shape != shape or indices.dtype != np.uint8:
        return f"palette indices {None if indices is None else (indices.shape, str(indices.dtype))}: expected uint8 {shape}"
    if shape[0] % lut.shape[0]:
        return f"{lut.shape[0]} LUTs do not split {shape[0]} output channels into equal blocks (Core ML shares a LUT by blocks of output channels)"
    if indices.size and indices.max() >= 1 << bits:
        return f"palette index {int(indices.max())} is outside the {1 << bits}-entry LUT"
    return _fp16_exact(lut, "LUT values", profile)


def _fp16_exact(values: np.ndarray, what: str, profile: TargetProfile) -> str | None:
    values = np.asarray(values, dtype=np.float32)
    rounded = values.astype(np.float16).astype(np.float32)
    off = ~(rounded == values)  # NaN and fp16 overflow count as off
    if off.any():
        worst = float(np.max(np.abs(np.where(off, rounded - values, 0)) / np.maximum(np.abs(values), np.finfo(np.float32).tiny)))
        return (f"{int(off.sum())} of {values.size} {what} are not float16 numbers (relative error up to {worst:.2g} if "
                f"rounded): Core ML stores them in fp16 and edgeq does not re-round; make the plan on target "
                f"{profile.id}'s grid (scale_dtype float16)")
    return None


# ---- the torch side: one custom op per weight, over buffers that hold the plan's arrays ---------------------


@torch.library.custom_op("edgeq_coreml::blockwise_weight", mutates_args=())
def blockwise_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """scale * (codes - zero_point), float32 [N, K]; scale and zero_point [N, groups] repeat over K / groups columns.
    `bits` (4 or 8) is the data type the constexpr op stores the codes in (int8 buffers hold both)."""
    columns = codes.shape[1] // scale.shape[1]
    shift = codes.float() - zero_point.float().repeat_interleave(columns, dim=1)
    return shift * scale.repeat_interleave(columns, dim=1)


@blockwise_weight.register_fake
def _(codes, scale, zero_point, bits):
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.custom_op("edgeq_coreml::lut_weight", mutates_args=())
def lut_weight(indices: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """lut[n // group_channels, indices[n, k]], float32 [N, K]; lut [groups, 2^bits]."""
    rows = indices.shape[0]
    tables = lut.repeat_interleave(rows // lut.shape[0], dim=0)
    return torch.gather(tables, 1, indices.long())


@lut_weight.register_fake
def _(indices, lut):
    return lut.new_empty(indices.shape, dtype=torch.float32)


WEIGHT_OPS = (torch.ops.edgeq_coreml.blockwise_weight.default, torch.ops.edgeq_coreml.lut_weight.default)


class PackedWeight(nn.Module):
    """The dequantized weight of one layer as one custom op over the plan's arrays (buffer `codes` or `indices`:
    the converter names the op after it)."""

    def __init__(self, layer: LayerPlan):
        super().__init__()
        lut = palette_of(layer)
        if lut is not None:
            self.register_buffer("indices", torch.from_numpy(np.ascontiguousarray(layer.weight_codes, dtype=np.uint8)))
            self.register_buffer("lut", torch.from_numpy(lut))
        else:
            quant = layer.weight
            rows = layer.weight_codes.shape[0]
            storage = quant.dtype.storage
            self.register_buffer("codes", torch.from_numpy(np.ascontiguousarray(layer.weight_codes, dtype=storage)))
            self.register_buffer("scale", torch.from_numpy(quant.scale.reshape(rows, -1).astype(np.float32)))
            self.register_buffer("zero_point", torch.from_numpy(quant.zero_point.reshape(rows, -1).astype(storage)))
            self.bits = 8 if quant.dtype in BLOCKWISE_8BIT else CONTAINER_BITS

    def forward(self) -> torch.Tensor:
        if hasattr(self, "lut"):
            return lut_weight(self.indices, self.lut)
        return blockwise_weight(self.codes, self.scale, self.zero_point, self.bits)


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, layer: LayerPlan):
        super().__init__()
        self.weight = PackedWeight(layer)
        self.bias = _bias(linear.bias, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class PackedEmbedding(nn.Module):
    """A table gathered from its constexpr weight: MIL `gather` over constexpr_blockwise_shift_scale (Core ML
    materializes the weight at load; the program never dequantizes it per call)."""

    def __init__(self, embedding: nn.Embedding, layer: LayerPlan):
        super().__init__()
        self.weight = PackedWeight(layer)
        self.padding_idx = embedding.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight(), self.padding_idx)


def pack_module(module: nn.Module, plan: QuantPlan) -> tuple[nn.Module, QuantPlan]:
    """A copy of `module` with each low-bit layer of `plan` replaced by its PackedLinear (tables: PackedEmbedding),
    and the rest of the plan (int8 per-channel layers, tensor points) for the int8 route (compress.apply.apply_plan)."""
    packed = {fqn: layer for fqn, layer in plan.layers.items() if is_lowbit(layer)}
    rest = QuantPlan(plan.scheme, plan.target, {f: l for f, l in plan.layers.items() if f not in packed},
                     list(plan.notes), dict(plan.tensors), list(plan.inputs))
    result = copy.deepcopy(module)
    for name, child in list(result.named_modules()):
        if user_fqn(name) in packed:
            parent_name, _, attribute = name.rpartition(".")
            parent = result.get_submodule(parent_name) if parent_name else result
            packing = PackedEmbedding if isinstance(child, nn.Embedding) else PackedLinear
            setattr(parent, attribute, packing(child, packed[user_fqn(name)]))
    return result.eval(), rest


# ---- the coremltools side: the constexpr ops built from the buffers as they are ---------------------------

_registered = False


def register_frontend() -> None:
    """Teach coremltools' torch frontend the two ops (once per process; coremltools' registry is global)."""
    global _registered
    if _registered:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.mil import types

    def subbyte(name: str):
        return types.nptype_from_builtin(types.string_to_builtin(name))

    @register_torch_op(torch_alias=["edgeq_coreml::blockwise_weight"], override=True)
    def edgeq_coreml_blockwise_weight(context, node):
        codes, scale, zero, bits = (value.val for value in _get_inputs(context, node, expected=4))
        signed = codes.dtype == np.int8
        container = (np.int8 if signed else np.uint8) if int(bits) == 8 else subbyte("int4" if signed else "uint4")
        # Scales go in as the plan's float32 values (fp16 numbers: check_plan); the fp16 compute pass stores
        # them as fp16 without changing a value. An offset only where a zero point is not 0, as coremltools does.
        arguments = {"data": codes.astype(container), "scale": scale.astype(np.float32)}
        if np.any(zero):
            arguments["offset"] = zero.astype(container)
        context.add(mb.constexpr_blockwise_shift_scale(**arguments, name=node.name), node.name)

    @register_torch_op(torch_alias=["edgeq_coreml::lut_weight"], override=True)
    def edgeq_coreml_lut_weight(context, node):
        indices, lut = (value.val for value in _get_inputs(context, node, expected=2))
        bits = palette_bits(lut)
        container = np.uint8 if bits == 8 else subbyte(f"uint{bits}")
        table = lut.astype(np.float32).reshape(lut.shape[0], 1, lut.shape[1], 1)  # [groups, 1, 2^bits, VECTOR_SIZE 1]
        context.add(mb.constexpr_lut_to_dense(indices=indices.astype(container), lut=table, name=node.name), node.name)

    _registered = True


# ---- sizes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredBits:
    """What one layer's weight occupies in the artifact: payload (codes or indices) and side tables."""

    weights: int  # N * K
    payload_bits: int  # codes or indices, packed
    side_bits: int  # scales, offsets, LUTs

    @property
    def bits_per_weight(self) -> float:
        return (self.payload_bits + self.side_bits) / self.weights


def stored_bits(layer: LayerPlan) -> StoredBits:
    """Bits the packer stores for a low-bit layer (fp16 scales and LUTs; sub-byte payloads packed tight)."""
    lut = palette_of(layer)
    rows, columns = layer.weight_codes.shape
    if lut is not None:
        return StoredBits(rows * columns, rows * columns * palette_bits(lut), lut.size * 16)
    groups = layer.weight.scale.size
    container = 8 if layer.weight.dtype in BLOCKWISE_8BIT else CONTAINER_BITS
    offsets = groups * container if np.any(layer.weight.zero_point) else 0
    return StoredBits(rows * columns, rows * columns * container, groups * 16 + offsets)
