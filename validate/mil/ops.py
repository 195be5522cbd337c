"""MIL op semantics in numpy, one function per op type, as coremltools' op definitions state them
(coremltools/converters/mil/mil/ops/defs/iOS15..iOS18: docstrings and `value_inference`).

Every float value reaches an op as float32 (an fp16-typed value holds float16-rounded numbers in a float32
array) and the executor rounds each result to the dtype the program declares for it: float arithmetic is FP32,
and fp16-typed ops are emulated as "compute in float32, round the result to float16". Integer and bool
values keep their own dtypes. A parameter value or mode an op function does not implement raises
UnsupportedOp naming it; nothing falls back to a guess.
"""

from __future__ import annotations

import math

import numpy as np

from edgeq.validate.mil.decompress import DECOMPRESSION_OPS
from edgeq.validate.mil.program import DTYPES, Const, MILError


class UnsupportedOp(MILError):
    """An op type, or a parameter value of a supported op, that edgeq's MIL reference executor does not implement."""


class Args:
    """The inputs of one op, resolved to arrays (names looked up in the executor's values)."""

    def __init__(self, op, resolve, declared=None):
        self.op = op
        self._resolve = resolve
        self._declared = declared  # value name -> ValueType, where the executor knows it

    def vtype(self, key: str):
        """The declared type (ValueType) of the value bound to `key`; None where unknown (an attribute, a value
        built in memory without a type)."""
        bound = self.op.inputs.get(key)
        if not bound or len(bound) != 1:
            return None
        if isinstance(bound[0], Const):
            return bound[0].vtype
        return self._declared(bound[0]) if self._declared else None

    def __call__(self, key: str, default=None):
        bound = self.op.inputs.get(key)
        if bound is None:
            return self.op.constant(key, default)
        if len(bound) != 1:
            raise MILError(f"op {self.op.name!r} ({self.op.type}): parameter {key!r} binds {len(bound)} values, expected 1")
        return self._resolve(bound[0])

    def many(self, key: str) -> list:
        return [self._resolve(item) for item in self.op.inputs.get(key, [])]

    def scalar(self, key: str, default=None):
        value = self(key, default)
        if isinstance(value, np.ndarray):
            return value.item() if value.ndim == 0 else value.tolist()
        return value

    def unsupported(self, what: str):
        return UnsupportedOp(f"MIL op {self.op.type!r} (named {self.op.name!r}): {what} is not supported by edgeq's MIL reference executor")


def _f(x) -> np.ndarray:
    """A float operand as float32 (fp16 values are already float16-exact in float32)."""
    return np.asarray(x, dtype=np.float32)


# ---- elementwise -------------------------------------------------------------------------------------------

def _binary(fn):
    def run(a: Args):
        x, y = np.asarray(a("x")), np.asarray(a("y"))
        return fn(x, y)

    return run


def _unary(fn):
    def run(a: Args):
        return fn(_f(a("x")))

    return run


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf
    except ImportError:  # a device without scipy: exact, slower
        return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64)).astype(np.float32)
    return erf(x.astype(np.float64)).astype(np.float32)


def gelu(a: Args):
    x = _f(a("x"))
    mode = a.scalar("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-np.float32(1.702) * x))
    raise a.unsupported(f"mode {mode!r}")


def sigmoid(a: Args):
    x = _f(a("x"))
    return 1.0 / (1.0 + np.exp(-x))


def sigmoid_hard(a: Args):  # min(max(alpha * x + beta, 0), 1)
    x = _f(a("x"))
    return np.minimum(np.maximum(_f(a("alpha")) * x + _f(a("beta")), 0.0), 1.0)


def thresholded_relu(a: Args):  # x if x >= alpha else 0
    x = _f(a("x"))
    return np.where(x >= _f(a("alpha")), x, np.float32(0.0))


def clip(a: Args):  # min(max(x, alpha), beta)
    return np.minimum(np.maximum(_f(a("x")), _f(a("alpha"))), _f(a("beta")))


def softmax(a: Args):
    x = _f(a("x"))
    axis = int(a.scalar("axis", -1))
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


def select(a: Args):
    return np.where(np.asarray(a("cond")).astype(bool), a("a"), a("b"))


def cast(a: Args):
    dtype = a.scalar("dtype")
    names = {"fp16": "FLOAT16", "fp32": "FLOAT32", "fp64": "FLOAT64", "bool": "BOOL"}
    numpy_dtype = DTYPES.get(names.get(dtype, dtype.upper()))
    if numpy_dtype is None or numpy_dtype is str:
        raise a.unsupported(f"dtype {dtype!r}")
    return np.asarray(a("x")).astype(numpy_dtype)  # float -> int truncates toward zero, as numpy's astype


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
    return np.concatenate([np.asarray(v) for v in a.many("values")], axis=int(a.scalar("axis")))


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


OPS = {
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "greater_equal": _binary(np.greater_equal),
    "logical_and": _binary(np.logical_and),
    "relu": _unary(lambda x: np.maximum(x, np.float32(0.0))),
    "tanh": _unary(np.tanh),
    "sigmoid": sigmoid,
    "sigmoid_hard": sigmoid_hard,
    "thresholded_relu": thresholded_relu,
    "clip": clip,
    "gelu": gelu,
    "softmax": softmax,
    "select": select,
    "cast": cast,
    "linear": linear,
    "matmul": matmul,
    "layer_norm": layer_norm,
    "reduce_mean": reduce_mean,
    "reduce_sum": _reduce(np.sum),
    "reduce_l2_norm": _reduce(_l2_norm),
    "expand_dims": expand_dims,
    "tile": tile,
    "conv": conv,
    "max_pool": max_pool,
    "reshape": reshape,
    "transpose": transpose,
    "squeeze": squeeze,
    "concat": concat,
    "split": split,
    "slice_by_index": slice_by_index,
    "gather": gather,
    "gather_nd": gather_nd,
    "quantize": quantize,
    "dequantize": dequantize,
    "constexpr_affine_dequantize": constexpr_affine_dequantize,
    **DECOMPRESSION_OPS,
}
# compile-time ops: evaluated once when the program is loaded, as Core ML materializes them
CONSTEXPR = frozenset({"constexpr_affine_dequantize", *DECOMPRESSION_OPS})
