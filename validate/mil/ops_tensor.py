"""Shape and data-movement MIL ops: reshape, transpose, concat, split, slice, gather and kin."""

from __future__ import annotations

import math

import numpy as np

from edgeq.validate.mil.args import Args
from edgeq.validate.mil.program import MILError

# ---- shape and data movement ----------------------------------------------------------------------------

def reshape(a: Args):
    x = np.asarray(a("x"))
    shape = [int(s) for s in np.atleast_1d(a("shape"))]
    if 0 in shape:
        if len(shape) != x.ndim:  # iOS15 and iOS17 read a 0 differently unless the ranks agree
            raise a.unsupported(f"shape {shape} (a 0 with a rank change)")
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def transpose(a: Args):
    return np.transpose(np.asarray(a("x")), [int(p) for p in np.atleast_1d(a("perm"))])


def expand_dims(a: Args):
    x = np.asarray(a("x"))
    axes = sorted(int(i) % (x.ndim + len(np.atleast_1d(a("axes")))) for i in np.atleast_1d(a("axes")))
    for axis in axes:  # ascending positions in the output's rank
        x = np.expand_dims(x, axis)
    return x


def tile(a: Args):
    return np.tile(np.asarray(a("x")), [int(r) for r in np.atleast_1d(a("reps"))])


def squeeze(a: Args):
    x = np.asarray(a("x"))
    axes = a.scalar("axes")
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(int(i) for i in np.atleast_1d(axes)))


def concat(a: Args):
    if a.scalar("interleave", False):
        raise a.unsupported("interleave=True")
    values = [np.asarray(v) for v in a.many("values")]
    if values and all(v.ndim == 0 for v in values):  # scalars (shape arithmetic of flexible inputs): a vector, as Core ML
        return np.stack(values)
    return np.concatenate(values, axis=int(a.scalar("axis")))


def split(a: Args):
    x = np.asarray(a("x"))
    axis = int(a.scalar("axis")) % x.ndim
    sizes = a("split_sizes")
    if sizes is not None:
        bounds = np.cumsum([int(s) for s in np.atleast_1d(sizes)])[:-1]
        return np.split(x, bounds, axis=axis)
    count = int(a.scalar("num_splits"))
    if x.shape[axis] % count:  # MIL: the last piece is smaller when the axis does not divide evenly
        size = math.ceil(x.shape[axis] / count)
        return np.split(x, [size * i for i in range(1, count)], axis=axis)
    return np.split(x, count, axis=axis)


def slice_by_index(a: Args):
    x = np.asarray(a("x"))
    rank = x.ndim
    begin = [int(b) for b in np.atleast_1d(a("begin"))]
    end = [int(e) for e in np.atleast_1d(a("end"))]
    stride = [int(s) for s in np.atleast_1d(a("stride", np.ones(rank, np.int32)))]
    begin_mask = [bool(m) for m in np.atleast_1d(a("begin_mask", np.zeros(rank, bool)))]
    end_mask = [bool(m) for m in np.atleast_1d(a("end_mask", np.zeros(rank, bool)))]
    squeeze_mask = [bool(m) for m in np.atleast_1d(a("squeeze_mask", np.zeros(rank, bool)))]
    index = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(begin[i])  # one element, the axis dropped
        else:
            index.append(slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i]))
    return np.asarray(x[tuple(index)])


def gather(a: Args):
    x, indices = np.asarray(a("x")), np.asarray(a("indices")).astype(np.int64)
    axis = int(a.scalar("axis", 0))
    if int(a.scalar("batch_dims", 0)) != 0:
        raise a.unsupported("batch_dims != 0")
    _check_indices(a, indices, x.shape[axis])
    return np.take(x, indices, axis=axis)


def gather_nd(a: Args):
    x, indices = np.asarray(a("x")), np.asarray(a("indices")).astype(np.int64)
    if int(a.scalar("batch_dims", 0)) != 0:
        raise a.unsupported("batch_dims != 0")
    depth = indices.shape[-1]
    for i in range(depth):
        _check_indices(a, indices[..., i], x.shape[i])
    return x[tuple(indices[..., i] for i in range(depth))]


def _check_indices(a: Args, indices: np.ndarray, size: int) -> None:
    """Out-of-range indices are undefined in MIL; refuse them rather than return numpy's wrap-around."""
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise MILError(f"op {a.op.name!r} ({a.op.type}): index out of range [{-size}, {size}) for an axis of {size}")




def reverse(a: Args):
    x = np.asarray(a("x"))
    axes = a.scalar("axes")
    return np.flip(x, axis=None if axes is None else tuple(int(i) for i in np.atleast_1d(axes)))


def stack(a: Args):
    return np.stack([np.asarray(v) for v in a.many("values")], axis=int(a.scalar("axis")))


def slice_by_size(a: Args):  # size -1: to the end of the axis
    x = np.asarray(a("x"))
    begin = [int(b) for b in np.atleast_1d(a("begin"))]
    size = [int(s) for s in np.atleast_1d(a("size"))]
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]


def flatten2d(a: Args):
    x = np.asarray(a("x"))
    axis = int(a.scalar("axis", 1)) % max(x.ndim, 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def identity(a: Args):
    return np.asarray(a("x"))


def reshape_like(a: Args):  # x reshaped to the concatenation of slices [begin, end) of each reference's shape
    x = np.asarray(a("x"))
    shape = []
    for ref, begin, end in zip(a.many("ref_tensors"), np.atleast_1d(a("begins")), np.atleast_1d(a("ends"))):
        shape.extend(np.asarray(ref).shape[int(begin): int(end)])
    return x.reshape(shape)


TENSOR_MORE = {
    "reverse": reverse,
    "stack": stack,
    "slice_by_size": slice_by_size,
    "flatten2d": flatten2d,
    "identity": identity,
    "reshape_like": reshape_like,
}
