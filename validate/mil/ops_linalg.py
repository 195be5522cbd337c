"""Linear algebra, normalization and reduction MIL ops."""

from __future__ import annotations

import numpy as np

from edgeq.validate.mil.args import Args
from edgeq.validate.mil.args import f32 as _f

# ---- linear algebra and normalization --------------------------------------------------------------------

def linear(a: Args):  # x @ weight.T + bias; weight is (D_out, D_in)
    x, weight = _f(a("x")), _f(a("weight"))
    out = np.matmul(x, weight.T)
    bias = a("bias")
    return out if bias is None else out + _f(bias)


def matmul(a: Args):
    x, y = _f(a("x")), _f(a("y"))
    if a.scalar("transpose_x", False):
        x = np.swapaxes(x, -1, -2) if x.ndim > 1 else x
    if a.scalar("transpose_y", False):
        y = np.swapaxes(y, -1, -2) if y.ndim > 1 else y
    return np.matmul(x, y)


def layer_norm(a: Args):
    x = _f(a("x"))
    axes = a.scalar("axes")
    axes = tuple(range(x.ndim)) if axes is None else tuple(int(i) % x.ndim for i in np.atleast_1d(axes))
    epsilon = np.float32(a.scalar("epsilon", 1e-5))
    mean = np.mean(x, axis=axes, keepdims=True)
    variance = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(variance + epsilon)
    # gamma and beta have the shape of the normalized axes (x.shape[axes]); place them on those axes
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    gamma, beta = a("gamma"), a("beta")
    if gamma is not None:
        out = out * _f(gamma).reshape(shape)
    if beta is not None:
        out = out + _f(beta).reshape(shape)
    return out


def _reduce(fn):
    """reduce_* ops: `axes` (None: all), `keep_dims` (default False)."""
    def run(a: Args):
        x = _f(a("x"))
        axes = a.scalar("axes")
        axes = None if axes is None else tuple(int(i) for i in np.atleast_1d(axes))
        return fn(x, axis=axes, keepdims=bool(a.scalar("keep_dims", False)))
    return run


def _l2_norm(x, axis, keepdims):  # sqrt(sum(x^2)), accumulated in float64 then rounded like the other ops
    return np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axis, keepdims=keepdims)).astype(np.float32)


reduce_mean = _reduce(np.mean)

