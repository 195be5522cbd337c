"""Convolution and pooling MIL ops (NC + spatial layout, 1 to 3 spatial axes)."""

from __future__ import annotations

import math

import numpy as np

from edgeq.validate.mil.args import Args
from edgeq.validate.mil.args import f32 as _f
from edgeq.validate.mil.program import MILError

# ---- convolution and pooling ---------------------------------------------------------------------------

def _pads(a: Args, spatial, kernel, strides, dilations) -> list[tuple[int, int]]:
    """(before, after) padding per spatial axis for pad_type valid / same / custom (pad = [b0, e0, b1, e1, ...])."""
    pad_type = a.scalar("pad_type", "valid")
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        pad = [int(p) for p in np.atleast_1d(a("pad"))]
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(spatial))]
    if pad_type in ("same", "same_lower"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            out.append((small, large) if pad_type == "same" else (large, small))
        return out
    raise a.unsupported(f"pad_type {pad_type!r}")


def _windows(x: np.ndarray, kernel, strides, dilations) -> np.ndarray:
    """(N, C, *out_spatial, *kernel) sliding windows over the spatial axes of an already padded x."""
    spatial = len(kernel)
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = np.lib.stride_tricks.sliding_window_view(x, extent, axis=tuple(range(2, 2 + spatial)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(slice(None, None, d) for d in dilations)
    return view[index]


def conv(a: Args):
    x, weight = _f(a("x")), _f(a("weight"))
    spatial = x.ndim - 2
    kernel = weight.shape[2:]
    strides = [int(s) for s in np.atleast_1d(a("strides", np.ones(spatial, np.int32)))]
    dilations = [int(d) for d in np.atleast_1d(a("dilations", np.ones(spatial, np.int32)))]
    groups = int(a.scalar("groups", 1))
    pads = _pads(a, x.shape[2:], kernel, strides, dilations)
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    windows = _windows(x, kernel, strides, dilations)  # (N, C_in, *out, *k)
    n, c_in = windows.shape[:2]
    out_spatial = windows.shape[2 : 2 + spatial]
    c_out = weight.shape[0]
    per_group_in, per_group_out = c_in // groups, c_out // groups
    if per_group_in != weight.shape[1] or c_out % groups:
        raise MILError(f"op {a.op.name!r} (conv): weight {weight.shape} does not fit {c_in} input channels in {groups} groups")
    k = int(np.prod(kernel))
    # (N, G, C_in/G, *out, K) -> (N, G, *out, C_in/G * K) against weight (G, C_out/G, C_in/G * K)
    cols = windows.reshape(n, groups, per_group_in, *out_spatial, k)
    cols = np.moveaxis(cols, 2, -2).reshape(n, groups, int(np.prod(out_spatial)), per_group_in * k)
    w = weight.reshape(groups, per_group_out, per_group_in * k)
    out = np.matmul(cols, np.swapaxes(w, -1, -2)[None])  # (N, G, P, C_out/G)
    out = np.moveaxis(out, -1, 2).reshape(n, c_out, *out_spatial)
    bias = a("bias")
    if bias is not None:
        out = out + _f(bias).reshape((1, c_out) + (1,) * spatial)
    return out


def max_pool(a: Args):
    x = _f(a("x"))
    spatial = x.ndim - 2
    kernel = [int(k) for k in np.atleast_1d(a("kernel_sizes"))]
    strides = [int(s) for s in np.atleast_1d(a("strides", np.ones(spatial, np.int32)))]
    pads = _pads(a, x.shape[2:], kernel, strides, [1] * spatial)
    if a.scalar("ceil_mode", False):
        raise a.unsupported("ceil_mode=True")
    x = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=-np.inf)
    windows = _windows(x, kernel, strides, [1] * spatial)
    return windows.max(axis=tuple(range(-spatial, 0)))


