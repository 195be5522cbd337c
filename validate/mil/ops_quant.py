"""Quantization MIL ops: activation quantize/dequantize and int8 weights dequantized at load."""

from __future__ import annotations

import numpy as np

from edgeq.validate.mil.args import Args
from edgeq.validate.mil.args import f32 as _f
from edgeq.validate.mil.program import MILError

# ---- quantization ---------------------------------------------------------------------------------------

_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


def _along(param, rank: int, axis) -> np.ndarray:
    """A scalar or per-axis vector scale/zero point shaped to broadcast against a tensor of `rank`."""
    param = np.asarray(param)
    if param.ndim == 0:
        return param
    if axis is None:
        raise MILError("a vector scale or zero point needs an axis")
    shape = [1] * rank
    shape[int(axis) % rank] = param.shape[0]
    return param.reshape(shape)


def quantize(a: Args):  # clip(round(x / scale) + zero_point), round half to even (numpy's around, as coremltools)
    x = _f(a("input"))
    axis = a.scalar("axis")
    dtype = np.dtype({"int8": np.int8, "uint8": np.uint8}.get(a.scalar("output_dtype"), np.void))
    if dtype not in _RANGES:
        raise a.unsupported(f"output_dtype {a.scalar('output_dtype')!r}")
    q = np.around(x / _f(_along(a("scale"), x.ndim, axis)))
    zero = a("zero_point")
    if zero is not None:
        q = q + _along(zero, x.ndim, axis).astype(np.float32)
    low, high = _RANGES[dtype]
    return np.clip(q, low, high).astype(dtype)


def _dequantize(codes: np.ndarray, zero, scale, axis) -> np.ndarray:
    """(codes - zero_point) * scale in float32, as coremltools' dequantize_by_scale_and_zp."""
    out = np.asarray(codes).astype(np.float32)
    if zero is not None:
        out = out - _along(zero, out.ndim, axis).astype(np.float32)
    return out * _f(_along(scale, out.ndim, axis))


def dequantize(a: Args):
    return _dequantize(a("input"), a("zero_point"), a("scale"), a.scalar("axis"))


def constexpr_affine_dequantize(a: Args):
    return _dequantize(a("quantized_data"), a("zero_point"), a("scale"), a.scalar("axis"))


