"""Indexing and sequence MIL ops: gather/scatter along an axis, top-k, argsort, one-hot, band_part, cumsum,
and the ops that build tensors from shapes (shape, fill, fill_like, range_1d)."""

from __future__ import annotations

import numpy as np

from edgeq.validate.mil.args import Args
from edgeq.validate.mil.program import MILError


def _in_range(a: Args, indices: np.ndarray, size: int) -> np.ndarray:
    """Indices as int64, refused when out of [-size, size) (undefined in MIL); negatives count from the end."""
    indices = np.asarray(indices).astype(np.int64)
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise MILError(f"op {a.op.name!r} ({a.op.type}): index out of range [{-size}, {size}) for an axis of {size}")
    return np.where(indices < 0, indices + size, indices)


def gather_along_axis(a: Args):
    x = np.asarray(a("x"))
    axis = int(a.scalar("axis", 0)) % x.ndim
    return np.take_along_axis(x, _in_range(a, a("indices"), x.shape[axis]), axis=axis)


_SCATTER = {
    "update": None, "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
    "max": np.maximum, "min": np.minimum,
}


def _scatter_mode(a: Args):
    mode = a.scalar("mode", "add")
    if mode not in _SCATTER:
        raise a.unsupported(f"mode {mode!r}")
    return _SCATTER[mode]


def scatter_along_axis(a: Args):
    data = np.array(a("data"), copy=True)
    updates = np.asarray(a("updates"))
    axis = int(a.scalar("axis", 0)) % data.ndim
    indices = _in_range(a, a("indices"), data.shape[axis])
    fn = _scatter_mode(a)
    grid = list(np.indices(indices.shape, sparse=True))
    grid[axis] = indices
    where = tuple(grid)
    if fn is None:
        data[where] = updates
    else:  # ufunc.at: repeated indices accumulate, as a scatter-add must
        fn.at(data, where, updates)
    return data


def scatter(a: Args):  # updates[i, ...] into data[indices[i]] along `axis`
    data = np.array(a("data"), copy=True)
    axis = int(a.scalar("axis", 0)) % data.ndim
    indices = _in_range(a, a("indices"), data.shape[axis])
    moved, updates = np.moveaxis(data, axis, 0), np.moveaxis(np.asarray(a("updates")), axis, 0)
    fn = _scatter_mode(a)
    if fn is None:
        moved[indices] = updates
    else:
        fn.at(moved, indices, updates)
    return data


def scatter_nd(a: Args):
    data = np.array(a("data"), copy=True)
    indices = np.asarray(a("indices")).astype(np.int64)
    where = tuple(_in_range(a, indices[..., i], data.shape[i]) for i in range(indices.shape[-1]))
    fn = _scatter_mode(a)
    if fn is None:
        data[where] = a("updates")
    else:
        fn.at(data, where, np.asarray(a("updates")))
    return data


def topk(a: Args):
    """The k largest (smallest with ascending) along `axis`, sorted (iOS16 `sort=False` keeps them sorted too:
    any order is allowed then), with int32 indices; ties keep the lower index first (stable sort)."""
    x = np.asarray(a("x"))
    axis, k = int(a.scalar("axis", -1)), int(a.scalar("k", 1))
    ascending = bool(a.scalar("ascending", False))
    order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, indices, axis=axis)
    if not a.scalar("return_indices", True):
        return values
    return values, indices.astype(np.int32)


def argsort(a: Args):
    x = np.asarray(a("x"))
    ascending = bool(a.scalar("ascending", False))
    return np.argsort(x if ascending else -x, axis=int(a.scalar("axis", -1)), kind="stable").astype(np.int32)


def one_hot(a: Args):
    indices = np.asarray(a("indices")).astype(np.int64)
    depth = int(a.scalar("one_hot_vector_size"))
    axis = int(a.scalar("axis", -1)) % (indices.ndim + 1)
    on, off = np.asarray(a("on_value", 1)), np.asarray(a("off_value", 0))
    hot = np.expand_dims(indices, axis) == np.arange(depth).reshape([-1] + [1] * (indices.ndim - axis))
    return np.where(hot, on, off)


def band_part(a: Args):
    """Keep x[..., m, n] where (lower < 0 or m - n <= lower) and (upper < 0 or n - m <= upper); zero elsewhere."""
    x = np.asarray(a("x"))
    lower, upper = int(a.scalar("lower", -1)), int(a.scalar("upper", -1))
    m, n = np.ogrid[: x.shape[-2], : x.shape[-1]]
    keep = ((lower < 0) | (m - n <= lower)) & ((upper < 0) | (n - m <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


def cumsum(a: Args):
    x = np.asarray(a("x"))
    axis = int(a.scalar("axis", 0))
    reverse = bool(a.scalar("reverse", False))
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=x.dtype)
    if a.scalar("exclusive", False):  # shifted by one: the first element sums nothing
        out = np.concatenate([np.zeros_like(np.take(out, [0], axis=axis)), np.delete(out, -1, axis=axis)], axis=axis)
    return np.flip(out, axis) if reverse else out


def shape(a: Args):
    return np.asarray(np.asarray(a("x")).shape, np.int32)


def fill(a: Args):
    return np.full([int(s) for s in np.atleast_1d(a("shape"))], np.asarray(a("value", 0.0)))


def fill_like(a: Args):
    return np.full(np.asarray(a("ref_tensor")).shape, np.asarray(a("value", 0.0)))


def range_1d(a: Args):
    start, end, step = np.asarray(a("start")), np.asarray(a("end")), np.asarray(a("step"))
    return np.arange(start, end, step, dtype=np.result_type(start, end, step))


INDEX_OPS = {
    "gather_along_axis": gather_along_axis,
    "scatter_along_axis": scatter_along_axis,
    "scatter": scatter,
    "scatter_nd": scatter_nd,
    "topk": topk,
    "argsort": argsort,
    "one_hot": one_hot,
    "band_part": band_part,
    "cumsum": cumsum,
    "shape": shape,
    "fill": fill,
    "fill_like": fill_like,
    "range_1d": range_1d,
}
