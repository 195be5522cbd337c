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


def _conv_operands(a: Args):
    """conv's and conv_transpose's shared operands: x, weight, spatial rank, kernel, strides, dilations, groups."""
    x, weight = _f(a("x")), _f(a("weight"))
    spatial = x.ndim - 2
    strides = [int(s) for s in np.atleast_1d(a("strides", np.ones(spatial, np.int32)))]
    dilations = [int(d) for d in np.atleast_1d(a("dilations", np.ones(spatial, np.int32)))]
    return x, weight, spatial, weight.shape[2:], strides, dilations, int(a.scalar("groups", 1))


def conv(a: Args):
    x, weight, spatial, kernel, strides, dilations, groups = _conv_operands(a)
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


def conv_transpose(a: Args):
    """The adjoint of conv: every input pixel scatters weight[c_in, :, k] to out[i * stride + k * dilation],
    then `pad` is cropped from each side (pad_type custom/valid) and `output_shape`, when given, is the size
    kept from pad-before on. weight is (C_in, C_out/groups, *K)."""
    x, weight, spatial, kernel, strides, dilations, groups = _conv_operands(a)
    pad_type = a.scalar("pad_type", "valid")
    if pad_type == "valid":
        pads = [(0, 0)] * spatial
    elif pad_type == "custom":
        pad = [int(p) for p in np.atleast_1d(a("pad", np.zeros(2 * spatial, np.int32)))]
        pads = [(pad[2 * i], pad[2 * i + 1]) for i in range(spatial)]
    else:  # `same` splits the extra size by a rule MIL leaves to the backend
        raise a.unsupported(f"pad_type {pad_type!r}")
    n, c_in = x.shape[:2]
    per_group_in, per_group_out = c_in // groups, weight.shape[1]
    if weight.shape[0] != c_in or c_in % groups:
        raise MILError(f"op {a.op.name!r} (conv_transpose): weight {weight.shape} does not fit {c_in} input channels in {groups} groups")
    full = [(size - 1) * s + (k - 1) * d + 1 for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations)]
    out = np.zeros((n, groups, per_group_out, *full), np.float32)
    xg = x.reshape(n, groups, per_group_in, *x.shape[2:])
    wg = weight.reshape(groups, per_group_in, per_group_out, *kernel)
    for offset in np.ndindex(*kernel):
        # (N, G, C_in/G, *D) x (G, C_in/G, C_out/G) -> (N, G, C_out/G, *D), placed on the strided grid
        contribution = np.einsum("ngi...,gio->ngo...", xg, wg[(slice(None),) * 3 + offset])
        place = tuple(slice(k * d, k * d + (size - 1) * s + 1, s) for k, d, s, size in zip(offset, dilations, strides, x.shape[2:]))
        out[(slice(None),) * 3 + place] += contribution
    out = out.reshape(n, groups * per_group_out, *full)
    shape = a("output_shape")
    sizes = [f - lo - hi for f, (lo, hi) in zip(full, pads)] if shape is None else [int(v) for v in np.atleast_1d(shape)[2:]]
    out = out[(slice(None), slice(None)) + tuple(slice(lo, lo + size) for (lo, _), size in zip(pads, sizes))]
    bias = a("bias")
    if bias is not None:
        out = out + _f(bias).reshape((1, -1) + (1,) * spatial)
    return out


def _pool_geometry(a: Args, x: np.ndarray):
    """Kernel, strides, (before, after) padding and, with ceil_mode, the extra cells past the padding that the
    last window may cover. Output sizes follow coremltools' spatial_dimensions_out_shape: with ceil_mode,
    out = ceil((L + pads - k) / s) + 1, less one where that window would start past the input and the left
    padding (checked only when there is padding, as coremltools does)."""
    spatial = x.ndim - 2
    kernel = [int(k) for k in np.atleast_1d(a("kernel_sizes"))]
    strides = [int(s) for s in np.atleast_1d(a("strides", np.ones(spatial, np.int32)))]
    pads = _pads(a, x.shape[2:], kernel, strides, [1] * spatial)
    ceil = bool(a.scalar("ceil_mode", False))
    overhang = []
    for size, k, s, (lo, hi) in zip(x.shape[2:], kernel, strides, pads):
        padded = size + lo + hi
        out = (padded - k + (s - 1 if ceil else 0)) // s + 1
        if ceil and (out - 1) * s >= size + lo:
            if lo > 0 or hi > 0:
                out -= 1
            else:  # a window wholly past the input (kernel < stride): PyTorch drops it, coremltools keeps it
                raise a.unsupported(f"ceil_mode with kernel {k} < stride {s} on an axis of {size}")
        overhang.append(max((out - 1) * s + k - padded, 0))
    return kernel, strides, pads, overhang


def max_pool(a: Args):
    x = _f(a("x"))
    spatial = x.ndim - 2
    kernel, strides, pads, overhang = _pool_geometry(a, x)
    pads = [(lo, hi + extra) for (lo, hi), extra in zip(pads, overhang)]  # ceil_mode's cells never win a max
    x = np.pad(x, [(0, 0), (0, 0), *pads], constant_values=-np.inf)
    windows = _windows(x, kernel, strides, [1] * spatial)
    return windows.max(axis=tuple(range(-spatial, 0)))


def avg_pool(a: Args):
    """Mean over each window. The divisor counts the padding unless exclude_padding_from_average; the cells
    ceil_mode adds past the padding are never counted (PyTorch's rule, which MIL's ceil_mode follows)."""
    x = _f(a("x"))
    spatial = x.ndim - 2
    kernel, strides, pads, overhang = _pool_geometry(a, x)
    exclude = bool(a.scalar("exclude_padding_from_average", False))
    full = [(lo, hi + extra) for (lo, hi), extra in zip(pads, overhang)]
    counted = np.ones((1, 1, *x.shape[2:]), np.float32)  # 1 where a cell counts in the divisor
    if exclude:
        counted = np.pad(counted, [(0, 0), (0, 0), *full])
    else:
        counted = np.pad(counted, [(0, 0), (0, 0), *pads], constant_values=1.0)
        counted = np.pad(counted, [(0, 0), (0, 0)] + [(0, extra) for extra in overhang])
    x = np.pad(x, [(0, 0), (0, 0), *full])
    axes = tuple(range(-spatial, 0))
    total = _windows(x, kernel, strides, [1] * spatial).sum(axis=axes)
    count = _windows(counted, kernel, strides, [1] * spatial).sum(axis=axes)
    return total / count


def l2_pool(a: Args):
    x = _f(a("x"))
    spatial = x.ndim - 2
    kernel, strides, pads, overhang = _pool_geometry(a, x)
    x = np.pad(x, [(0, 0), (0, 0)] + [(lo, hi + extra) for (lo, hi), extra in zip(pads, overhang)])
    windows = _windows(x, kernel, strides, [1] * spatial)
    return np.sqrt(np.sum(np.square(windows, dtype=np.float64), axis=tuple(range(-spatial, 0)))).astype(np.float32)
