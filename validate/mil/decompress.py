"""Core ML's compressed-weight ops (compile-time `constexpr_*`), in numpy: quantized, palettized and sparse weights.

Each op follows coremltools' definition of it (docstring, `decompress`, which coremltools' own
`materialized_val_inference` calls): the iOS18 ops in coremltools/converters/mil/mil/ops/defs/iOS18/compression.py
(`constexpr_blockwise_shift_scale`, `constexpr_lut_to_dense`, `constexpr_sparse_to_dense`, and the joint
forms `constexpr_lut_to_sparse`, `constexpr_sparse_blockwise_shift_scale`), and the iOS16 spellings of
`constexpr_lut_to_dense` / `constexpr_sparse_to_dense` (iOS16/constexpr_ops.py: flat packed indices or mask
plus a `shape`). Sub-byte inputs (int4, uint1..uint6) arrive unpacked from the program reader
(`program.unpack_bits`); the iOS16 forms pack their own bytes, in the same bit order.

Bit for bit what coremltools computes (tests/validate/test_mil_lowbit.py): a look-up or a mask copies values;
shift-scale works in the output's dtype as coremltools' numpy does (`data.astype(scale.dtype)`, then
`- offset`, then `* scale`), so an fp16 output is rounded to fp16 after each step (the last rounding is the
executor's, as for every fp16-typed result).
"""

from __future__ import annotations

import numpy as np

from edgeq.validate.mil.program import MILError, ValueType, unpack_bits

_PALETTE_BITS = (1, 2, 3, 4, 6, 8)  # IndicesT of iOS18 constexpr_lut_to_dense: uint1/2/3/4/6/8
_PALETTE_BITS_IOS16 = (1, 2, 4, 6, 8)  # iOS16: NUM_PALETTES in {2, 4, 16, 64, 256}


def _error(a, what: str) -> MILError:
    return MILError(f"MIL op {a.op.type!r} (named {a.op.name!r}): {what}")


def _rounding(dtype: str):
    """Round a float32 array to the op's output dtype and back (fp16), or leave it (fp32)."""
    if dtype == "float16":
        return lambda x: x.astype(np.float16).astype(np.float32)
    return lambda x: x


def _blocks(a, param: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    """`param` repeated over blocks to `shape`: block size per axis = shape[i] / param.shape[i]."""
    if param.ndim != len(shape) or any(p == 0 or d % p for d, p in zip(shape, param.shape)):
        raise _error(a, f"{what} {list(param.shape)} does not tile data {list(shape)} (same rank, each axis dividing)")
    for axis, (d, p) in enumerate(zip(shape, param.shape)):
        if d != p:
            param = np.repeat(param, d // p, axis=axis)
    return param


def _shift_scale(a, data: np.ndarray, scale, offset, dtype: str) -> np.ndarray:
    rounded = _rounding(dtype)
    x = rounded(np.asarray(data).astype(np.float32))
    if offset is not None:
        x = rounded(x - _blocks(a, np.asarray(offset), x.shape, "offset").astype(np.float32))
    return x * _blocks(a, np.asarray(scale, dtype=np.float32), x.shape, "scale")


def _scatter(a, nonzero: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A dense tensor of mask's shape: nonzero's values where mask is set, in row-major order; zeros elsewhere."""
    nonzero, mask = np.asarray(nonzero), np.asarray(mask)
    if nonzero.ndim != 1 or np.count_nonzero(mask) != nonzero.size:
        raise _error(a, f"the mask sets {np.count_nonzero(mask)} elements; the non-zero data holds {list(nonzero.shape)}")
    dense = np.zeros(mask.shape, dtype=nonzero.dtype)
    dense[mask != 0] = nonzero
    return dense


def _lookup(a, indices: np.ndarray, lut: np.ndarray, vector_axis, indices_key: str) -> np.ndarray:
    """iOS18 look-up: lut [B_0..B_{K-1}, 2^bits, V]; element i of indices [S_0..S_{K-1}] reads the table of its
    block (i_d // (S_d / B_d) along each axis d); V > 1 writes V consecutive values along `vector_axis`."""
    indices = np.asarray(indices).astype(np.int64)
    rank = indices.ndim
    if rank < 1 or lut.ndim != rank + 2:
        raise _error(a, f"lut {list(lut.shape)} must have 2 more axes than indices {list(indices.shape)}")
    palettes, vector = lut.shape[-2:]
    bits = palettes.bit_length() - 1
    if palettes != 1 << bits or bits not in _PALETTE_BITS:
        raise _error(a, f"a look-up table of {palettes} entries (it needs 2^bits, bits in {_PALETTE_BITS})")
    declared = a.vtype(indices_key)
    if declared is not None and declared.dtype != f"uint{bits}":
        raise _error(a, f"{indices_key} is {declared.dtype}; a table of {palettes} entries needs uint{bits}")
    if any(s % b for s, b in zip(indices.shape, lut.shape)):
        raise _error(a, f"lut {list(lut.shape)} does not tile indices {list(indices.shape)}")
    if indices.size and (indices.min() < 0 or indices.max() >= palettes):
        raise _error(a, f"an index outside the look-up table's {palettes} entries")
    table = np.zeros(indices.shape, dtype=np.int64)  # which LUT each element reads, row-major over the blocks
    for axis in range(rank):
        per_block = indices.shape[axis] // lut.shape[axis]
        position = np.arange(indices.shape[axis]) // per_block
        table = table * lut.shape[axis] + position.reshape([-1 if i == axis else 1 for i in range(rank)])
    values = lut.reshape(-1, palettes, vector)[table, indices]  # indices.shape + (V,)
    if vector == 1:
        return values[..., 0]
    if vector_axis is None:
        raise _error(a, f"a look-up table of vectors ({vector} values each) needs vector_axis")
    axis = int(vector_axis) % rank
    shape = list(indices.shape)
    shape[axis] *= vector
    return np.moveaxis(values, -1, axis + 1).reshape(shape)


def _unpack_ios16(a, key: str, bits: int, count: int) -> np.ndarray:
    """iOS16's packed uint8 vectors (LUT indices, sparsity masks): `count` values of `bits` bits, LSB first."""
    packed = np.asarray(a(key))
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise _error(a, f"{key} must be a packed uint8 vector, not {packed.dtype}{list(packed.shape)}")
    if bits == 8:
        if packed.size != count:
            raise _error(a, f"{key} holds {packed.size} uint8 indices for {count} elements")
        return packed
    return unpack_bits(packed.tobytes(), ValueType(f"uint{bits}", (count,)), f"MIL op {a.op.type!r} (named {a.op.name!r}) {key}")


def _shape_ios16(a) -> list[int]:
    return [int(s) for s in np.atleast_1d(a("shape"))]


def constexpr_blockwise_shift_scale(a):
    """iOS18: scale * (data - offset), scale and offset (data's rank) repeated over blocks of data."""
    return _shift_scale(a, a("data"), a("scale"), a("offset"), a.op.outputs[0][1].dtype)


def constexpr_lut_to_dense(a):
    """iOS18: lut[block][indices] (per-tensor, per-grouped-channel, vector palettes). iOS16 (a `shape`
    parameter): lut[unpack(indices)] reshaped, one table, indices packed LSB first in a uint8 vector."""
    if a("shape") is None:
        return _lookup(a, a("indices"), np.asarray(a("lut")), a.scalar("vector_axis"), "indices")
    lut, shape = np.asarray(a("lut")), _shape_ios16(a)
    bits = lut.size.bit_length() - 1
    if lut.ndim != 1 or lut.size != 1 << bits or bits not in _PALETTE_BITS_IOS16:
        raise _error(a, f"an iOS16 look-up table {list(lut.shape)} (it needs a vector of 2, 4, 16, 64 or 256 entries)")
    return lut[_unpack_ios16(a, "indices", bits, int(np.prod(shape)))].reshape(shape)


def constexpr_sparse_to_dense(a):
    """iOS18: nonzero_data placed where the uint1 mask is set (row-major), zeros elsewhere. iOS16 (a `shape`
    parameter): the mask is a packed uint8 vector, one bit per element, LSB first."""
    if a("shape") is None:
        return _scatter(a, a("nonzero_data"), a("mask"))
    shape = _shape_ios16(a)
    mask = _unpack_ios16(a, "mask", 1, int(np.prod(shape))).reshape(shape)
    return _scatter(a, a("nonzero_data"), mask)


def constexpr_lut_to_sparse(a):
    """iOS18 joint palettized + sparse: (mask, looked-up non-zero values); a vector LUT repeats the mask along
    vector_axis. A following constexpr_sparse_to_dense makes the dense weight."""
    mask = np.asarray(a("indices_mask"))
    indices = _scatter(a, a("indices_nonzero_data"), mask)
    lut, vector_axis = np.asarray(a("lut")), a.scalar("vector_axis")
    dense = _lookup(a, indices, lut, vector_axis, "indices_nonzero_data")
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=int(vector_axis))
    return mask, dense[mask != 0]


def constexpr_sparse_blockwise_shift_scale(a):
    """iOS18 joint quantized + sparse: (mask, shift-scaled non-zero values), blocks laid over the dense shape."""
    mask = np.asarray(a("data_mask"))
    dense = _shift_scale(a, _scatter(a, a("nonzero_data"), mask), a("scale"), a("offset"), a.op.outputs[1][1].dtype)
    return mask, dense[mask != 0]


DECOMPRESSION_OPS = {
    "constexpr_blockwise_shift_scale": constexpr_blockwise_shift_scale,
    "constexpr_lut_to_dense": constexpr_lut_to_dense,
    "constexpr_sparse_to_dense": constexpr_sparse_to_dense,
    "constexpr_lut_to_sparse": constexpr_lut_to_sparse,
    "constexpr_sparse_blockwise_shift_scale": constexpr_sparse_blockwise_shift_scale,
}
