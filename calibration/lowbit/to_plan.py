"""A low-bit weight as the plan records it: the one form every packer (ONNX, TFLite, Core ML) reads.

LayerPlan.weight = TensorQuant(dtype, granularity, symmetric, scale, zero_point) and LayerPlan.weight_codes:
  dtype        INT2/INT3/INT4 (symmetric grids: signed codes, zero point 0) or UINT2/UINT3/UINT4 (asymmetric:
               unsigned codes with a zero point per group), INT8/UINT8 for 8 bits
  granularity  PerGroup(axis=1, size=group_size) - groups of contiguous input columns of the [N out, K in]
               weight - or PerChannel(axis=0) for per-output-channel grids
  scale        float32 [N, K / group_size] ([N] per channel), already rounded to the target's scale precision
  zero_point   int32, same shape
  weight_codes [N, K] in the storage dtype (int8 / uint8, one code per byte), original column order
A packer writes exactly these codes and scales (packing two 4-bit codes per byte, etc., as its runtime
defines) and its parity reader returns them unpacked in this form.
"""

from __future__ import annotations

import numpy as np

from edgeq.calibration.lowbit.rtn import LowBitWeight
from edgeq.plan import LayerPlan, OpKind, PerChannel, PerGroup, QDtype, TensorQuant


def code_dtype(bits: int, symmetric: bool) -> QDtype:
    try:
        return QDtype(f"{'' if symmetric else 'u'}int{bits}")
    except ValueError:
        raise ValueError(f"{bits}-bit codes have no plan dtype (2, 3, 4 and 8 bits do)") from None


def layer_plan(fqn: str, op: OpKind, weight: LowBitWeight) -> LayerPlan:
    """The plan entry of one low-bit layer; refuses a weight whose groups are not contiguous in the original
    column order (GPTQ act-order without static groups), which no runtime's blockwise format holds."""
    if not weight.contiguous_groups:
        raise ValueError(f"{fqn}: groups are not contiguous columns (act-order needs static groups for a runtime)")
    grid = weight.grid
    dtype = code_dtype(grid.bits, grid.symmetric)
    scale = weight.scale.detach().cpu().numpy().astype(np.float32)
    zero = weight.zero.detach().cpu().numpy().astype(np.int32)
    if grid.group_size is None:
        granularity, scale, zero = PerChannel(axis=0), scale[:, 0], zero[:, 0]
    else:
        granularity = PerGroup(axis=1, size=grid.group_size)
    quant = TensorQuant(dtype, granularity, grid.symmetric, scale, zero)
    codes = weight.codes.detach().cpu().numpy().astype(dtype.storage)
    return LayerPlan(fqn, op, weight=quant, weight_codes=codes)
