"""Core ML sparse weights: a layer whose weight is mostly exact zeros (unstructured or N:M pruning,
edgeq/compress/sparsity.py) is stored as a bit mask plus its non-zero values (iOS18 compile-time ops, research:
shared/research/lowbit-prune-peers.md §4.1):
  float    constexpr_sparse_to_dense(nonzero_data, mask: uint1)  (non-zeros fp16 in fp16 programs, else fp32)
  int8 / int4 codes (the plan's, verbatim)
           constexpr_sparse_blockwise_shift_scale(data_mask, nonzero_data, scale, offset?) -> (mask, values)
           -> constexpr_sparse_to_dense(values, mask)
           the joint form: only the codes of non-zero weights are stored, with the same per-channel or per-block
           scales and offsets as the dense ops (constexpr_affine_dequantize / constexpr_blockwise_shift_scale).
A weight is "zero" where its code equals its zero point (its real value is exactly 0), so the artifact holds the
plan's codes exactly and the parity reader (parity_coreml.py) reads the mask back as zero-point codes.

When: the mask costs 1 bit per weight, so sparse storage of b-bit values saves bits once more than 1/b of the
weights are zero (fp16 1/16, int8 1/8, int4 1/4). Measured (weight.bin of the 128 -> 256 -> 64 -> 10 test stack,
zeros at random in the two big layers, sparse forced): int8 at 12.5% zeros 0.99x dense, at 15% 0.97x, at 25%
0.88x; fp16 at 6.25% 1.00x, at 8% 0.985x, at 25% 0.82x; 2:4 int8 0.64x. A layer is stored sparse from
MIN_ZERO_SHARE (25%) zeros on, and only if its sparse form is smaller: below that the saving is a few percent
and the dense ops are the better-trodden path on Apple's compilers.

How (as converters/coreml_lowbit.py does for blockwise codes): after the plan is applied, each such weight
module becomes a custom torch op over buffers (`edgeq_coreml::sparse_weight`, `edgeq_coreml::sparse_codes`);
torch.export keeps it as one node, and a coremltools frontend conversion registered here builds the constexpr
ops from the buffers as they are. The converter names the node after the layer (parity_coreml.mil_name).
The joint ops and the uint1 mask are iOS18: the converter raises the deployment target there and says so.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgeq.compress.apply import user_fqn
from edgeq.compress.qdq import QuantizedWeight, WeightForm
from edgeq.converters.coreml_lowbit import CONTAINER_BITS, PackedWeight

MIN_ZERO_SHARE = 0.25
SPARSE_MIN_TARGET = "iOS18"
SPARSE_SUFFIX = "_sparse"  # the shift-scale op before the densifying one: `<layer weight>_sparse` (mil_name suffix)


# ---- the torch side: one custom op per sparse weight ----------------------------------------------------------


@torch.library.custom_op("edgeq_coreml::sparse_weight", mutates_args=())
def sparse_weight(values: torch.Tensor) -> torch.Tensor:
    """The float weight itself; Core ML stores its non-zeros and a mask."""
    return values.clone()


@sparse_weight.register_fake
def _(values):
    return torch.empty_like(values)


@torch.library.custom_op("edgeq_coreml::sparse_codes", mutates_args=())
def sparse_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """scale * (codes - zero_point), float32 of codes' shape; scale and zero_point have codes' rank and repeat over
    blocks (size codes.shape[i] / scale.shape[i] along axis i). `bits` (4 or 8): the stored codes' data type."""
    return (codes.float() - _tile(zero_point.float(), codes.shape)) * _tile(scale, codes.shape)


@sparse_codes.register_fake
def _(codes, scale, zero_point, bits):
    return codes.new_empty(codes.shape, dtype=torch.float32)


SPARSE_WEIGHT_OPS = (torch.ops.edgeq_coreml.sparse_weight.default, torch.ops.edgeq_coreml.sparse_codes.default)


def _tile(param: torch.Tensor, shape) -> torch.Tensor:
    for axis, (size, blocks) in enumerate(zip(shape, param.shape)):
        if size != blocks:
            param = param.repeat_interleave(size // blocks, dim=axis)
    return param


class _WeightLike:
    """Model code reads its layers' weights as tensors (HF ViT: `projection.weight.dtype`): answer as the float
    weight this module stands for (as compress.qdq.QuantizedWeight does)."""

    @property
    def shape(self) -> torch.Size:
        return (self.values if hasattr(self, "values") else self.codes).shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return (self.values if hasattr(self, "values") else self.codes).device


class SparseFloatWeight(_WeightLike, nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("values", weight.detach().float().clone())

    def forward(self) -> torch.Tensor:
        return sparse_weight(self.values)


class SparseCodes(_WeightLike, nn.Module):
    """A quantized weight (codes, scale, zero point; any rank) whose zero-point codes Core ML does not store."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int):
        super().__init__()
        self.register_buffer("codes", torch.from_numpy(np.ascontiguousarray(codes)))
        self.register_buffer("scale", torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)))
        self.register_buffer("zero_point", torch.from_numpy(np.ascontiguousarray(zero_point).astype(codes.dtype)))
        self.bits = bits

    def forward(self) -> torch.Tensor:
        return sparse_codes(self.codes, self.scale, self.zero_point, self.bits)


class SparseLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = SparseFloatWeight(linear.weight)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class SparseConv(nn.Module):
    def __init__(self, conv: nn.Conv1d | nn.Conv2d):
        super().__init__()
        self.weight = SparseFloatWeight(conv.weight)
        self.bias = conv.bias
        self.conv = F.conv2d if isinstance(conv, nn.Conv2d) else F.conv1d
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


# ---- which weights, and the module rewrite ---------------------------------------------------------------------


def sparse_pays(zeros: int, size: int, bits: int) -> bool:
    """Whether `size` weights of `bits` bits with `zeros` of them zero are worth storing sparse (module docstring)."""
    return size > 0 and zeros >= MIN_ZERO_SHARE * size and size + (size - zeros) * bits < size * bits


def store_sparse(module: nn.Module, fp16: bool, plan=None) -> tuple[nn.Module, list[str]]:
    """A copy of `module` with every weight that pays stored sparse (`module` itself when none does): float linears
    and convs, the plan's int8 codes (compress.qdq.QuantizedWeight, CODES form) and low-bit affine codes
    (coreml_lowbit.PackedWeight). Returns it and one line per layer for the artifact's notes (empty: none).

    Codes are considered only for layers `plan` gives 8- or 4-bit codes: 2- and 3-bit grids put a large share of
    even a dense weight at the zero point (their 4-bit container would go sparse for that alone), a form whose
    speed on Apple's compilers is unmeasured, so they keep the dense blockwise op."""
    chosen: list[tuple[str, str, float]] = []  # (module name, what the non-zeros are, zero share)
    for name, child in module.named_modules():
        found = _sparse_candidate(child, fp16)
        if found is not None and found[0] not in ("fp16", "fp32") and not _sparse_codes_planned(plan, _layer(name)):
            continue
        if found is not None:
            kind, bits, zeros, size = found
            if sparse_pays(zeros, size, bits):
                chosen.append((name, kind, zeros / size))
    if not chosen:
        return module, []
    result = copy.deepcopy(module)  # the caller's module may be the user's model (float precisions)
    for name, _, _ in chosen:
        parent_name, _, attribute = name.rpartition(".")
        parent = result.get_submodule(parent_name) if parent_name else result
        setattr(parent, attribute, _sparse_form(getattr(parent, attribute)))
    notes = [f"{_layer(name)}: weight stored sparse ({kind} non-zeros + a 1-bit mask; {100 * share:.1f}% zeros)"
             for name, kind, share in chosen]
    return result.eval(), notes


def _sparse_candidate(child: nn.Module, fp16: bool):
    """(what the non-zeros are, their bits, zeros, weights) for a weight module that may be stored sparse, else None."""
    if isinstance(child, QuantizedWeight):
        if child.form != WeightForm.CODES or child.qmin != -128:
            return None
        codes = child.codes
        zero = child.zero_point.to(codes.dtype).reshape(_along(codes.ndim, child.axis))
        return "int8", 8, int((codes == zero).sum()), codes.numel()
    if isinstance(child, PackedWeight):
        if not hasattr(child, "codes"):
            return None  # a palette: constexpr_lut_to_sparse is not written (yet); stays dense
        bits = 8 if child.bits == 8 else CONTAINER_BITS
        zeros = int((child.codes == _tile(child.zero_point, child.codes.shape)).sum())
        return f"{bits}-bit", bits, zeros, child.codes.numel()
    # exact types: a subclass may be read by its parent as a parameter (MultiheadAttention's out_proj.weight)
    if type(child) is nn.Linear or (type(child) in (nn.Conv1d, nn.Conv2d) and child.padding_mode == "zeros"):
        weight = child.weight.detach()
        kind, bits = ("fp16", 16) if fp16 else ("fp32", 32)
        return kind, bits, int((weight == 0).sum()), weight.numel()
    return None


def sparse_code_bits(layer) -> int | None:
    """The bits converters/coreml.py stores for a plan layer's codes when it stores them sparse (a 1-bit mask plus
    the codes off the zero point, in their 8- or 4-bit container), or None when the layer stays dense; for
    edgeq/footprint.py's account of what the artifact holds."""
    from edgeq.plan import QDtype

    quant, codes = layer.weight, layer.weight_codes
    if quant is None or codes is None or getattr(layer, "palette", None) is not None:
        return None
    if quant.dtype not in (QDtype.INT8, QDtype.UINT8, QDtype.INT4, QDtype.UINT4):
        return None
    rows = codes.reshape(codes.shape[0], -1)
    zero = np.asarray(quant.zero_point).reshape(codes.shape[0], -1)
    zeros = int(np.count_nonzero(rows == np.repeat(zero, rows.shape[1] // zero.shape[1], axis=1)))
    bits = 8 if quant.dtype.bits == 8 else CONTAINER_BITS
    return codes.size + (codes.size - zeros) * bits if sparse_pays(zeros, codes.size, bits) else None


def _sparse_codes_planned(plan, fqn: str) -> bool:
    from edgeq.plan import QDtype

    layer = None if plan is None else plan.layers.get(fqn)
    return layer is not None and layer.weight is not None and layer.weight.dtype in (QDtype.INT8, QDtype.UINT8, QDtype.INT4, QDtype.UINT4)


def _sparse_form(child: nn.Module) -> nn.Module:
    if isinstance(child, QuantizedWeight):
        shape = _along(child.codes.ndim, child.axis)
        return SparseCodes(child.codes.numpy(), child.scale.numpy().reshape(shape),
                           child.zero_point.numpy().astype(np.int8).reshape(shape), 8)
    if hasattr(child, "codes"):  # coreml_lowbit.PackedWeight: scale and zero point [N, groups] already
        return SparseCodes(child.codes.numpy(), child.scale.numpy(), child.zero_point.numpy(), 8 if child.bits == 8 else CONTAINER_BITS)
    return SparseLinear(child) if isinstance(child, nn.Linear) else SparseConv(child)


def _along(rank: int, axis: int) -> list[int]:
    """The shape that puts a per-channel vector on `axis` of a rank-`rank` weight ([N, 1, ...] for axis 0)."""
    return [-1 if i == axis % rank else 1 for i in range(rank)]


def _layer(name: str) -> str:
    """The user FQN of the layer a replaced module belongs to (`up.weight` -> `up`)."""
    return user_fqn(name.removesuffix(".weight"))


# ---- the coremltools side ----------------------------------------------------------------------------------

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

    @register_torch_op(torch_alias=["edgeq_coreml::sparse_weight"], override=True)
    def edgeq_coreml_sparse_weight(context, node):
        (values,) = (value.val for value in _get_inputs(context, node, expected=1))
        mask = values != 0
        # fp32 non-zeros: the fp16 compute pass stores them as fp16 in an fp16 program (as it does dense weights)
        op = mb.constexpr_sparse_to_dense(nonzero_data=values[mask].astype(np.float32), mask=mask.astype(subbyte("uint1")),
                                          name=node.name)
        context.add(op, node.name)

    @register_torch_op(torch_alias=["edgeq_coreml::sparse_codes"], override=True)
    def edgeq_coreml_sparse_codes(context, node):
        codes, scale, zero, bits = (value.val for value in _get_inputs(context, node, expected=4))
        signed = codes.dtype == np.int8
        container = (np.int8 if signed else np.uint8) if int(bits) == 8 else subbyte("int4" if signed else "uint4")
        mask = codes != _tile(torch.from_numpy(zero), codes.shape).numpy()
        arguments = {"data_mask": mask.astype(subbyte("uint1")), "nonzero_data": codes[mask].astype(container),
                     "scale": scale.astype(np.float32)}
        if np.any(zero):  # an offset only where a zero point is not 0, as coremltools does
            arguments["offset"] = zero.astype(container)
        mask_var, values = mb.constexpr_sparse_blockwise_shift_scale(**arguments, name=node.name + SPARSE_SUFFIX)
        context.add(mb.constexpr_sparse_to_dense(nonzero_data=values, mask=mask_var, name=node.name), node.name)

    _registered = True
