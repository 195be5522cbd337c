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
    """reduce_* ops: `axes` (None: all), `keep_dims` (default False). Integer tensors stay integer."""
    def run(a: Args):
        x = np.asarray(a("x"))
        x = _f(x) if x.dtype.kind == "f" else x
        axes = a.scalar("axes")
        axes = None if axes is None else tuple(int(i) for i in np.atleast_1d(axes))
        return fn(x, axis=axes, keepdims=bool(a.scalar("keep_dims", False)))
    return run


def _l2_norm(x, axis, keepdims):  # sqrt(sum(x^2)), accumulated in float64 then rounded like the other ops
    return np.sqrt(np.sum(np.square(x, dtype=np.float64), axis=axis, keepdims=keepdims)).astype(np.float32)


reduce_mean = _reduce(np.mean)



def _channel(param, x: np.ndarray) -> np.ndarray:
    """A length-C vector placed on axis 1 of x (batch_norm, instance_norm's gamma/beta/mean/variance)."""
    return _f(param).reshape([1, -1] + [1] * (x.ndim - 2))


def _channel_affine(out: np.ndarray, a: Args, x: np.ndarray) -> np.ndarray:
    """out * gamma + beta per channel, each optional (batch_norm's and instance_norm's affine)."""
    gamma, beta = a("gamma"), a("beta")
    if gamma is not None:
        out = out * _channel(gamma, x)
    return out if beta is None else out + _channel(beta, x)


def batch_norm(a: Args):
    x = _f(a("x"))
    epsilon = np.float32(a.scalar("epsilon", 1e-5))
    out = (x - _channel(a("mean"), x)) / np.sqrt(_channel(a("variance"), x) + epsilon)
    return _channel_affine(out, a, x)


def instance_norm(a: Args):
    """Per sample and channel over the spatial axes, biased variance (PyTorch's InstanceNorm)."""
    x = _f(a("x"))
    axes = tuple(range(2, x.ndim))
    epsilon = np.float32(a.scalar("epsilon", 1e-5))
    mean = np.mean(x, axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(np.mean(np.square(x - mean), axis=axes, keepdims=True) + epsilon)
    return _channel_affine(out, a, x)


def l2_norm(a: Args):
    """x / sqrt(sum(x^2) + epsilon) over the last three axes (all of a rank-3 x), per leading index."""
    x = _f(a("x"))
    axes = tuple(range(max(x.ndim - 3, 0), x.ndim))
    total = np.sum(np.square(x, dtype=np.float64), axis=axes, keepdims=True)
    return (x / np.sqrt(total + float(a.scalar("epsilon", 1e-6)))).astype(np.float32)


def _reduce_arg(fn):
    """reduce_argmax/argmin: one `axis` (default -1), keep_dims; int32 indices of the first extreme."""
    def run(a: Args):
        x = np.asarray(a("x"))
        axis = int(a.scalar("axis", -1))
        out = fn(x, axis=axis)
        if a.scalar("keep_dims", False):
            out = np.expand_dims(out, axis)
        return out.astype(np.int32)
    return run


def _log_sum_exp(x, axis, keepdims):
    peak = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - peak), axis=axis, keepdims=True)) + peak
    return out if keepdims else np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


REDUCTIONS = {
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_prod": _reduce(np.prod),
    "reduce_l1_norm": _reduce(lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims)),
    "reduce_sum_square": _reduce(lambda x, axis, keepdims: np.sum(np.square(x), axis=axis, keepdims=keepdims)),
    "reduce_log_sum": _reduce(lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims))),
    "reduce_log_sum_exp": _reduce(_log_sum_exp),
    "reduce_argmax": _reduce_arg(np.argmax),
    "reduce_argmin": _reduce_arg(np.argmin),
}


def einsum(a: Args):
    """The two-operand equations MIL allows ("nchw,nwhu->nchu", "chw,whr->chr" and their relabellings);
    size-1 batch axes broadcast, so each operand is broadcast to the other's size on its shared labels."""
    x, y = (_f(v) for v in a.many("values"))
    equation = a.scalar("equation").replace(" ", "")
    inputs, _, output = equation.partition("->")
    left, right = inputs.split(",")
    sizes = {}
    for labels, array in ((left, x), (right, y)):
        for label, size in zip(labels, array.shape):
            sizes[label] = max(sizes.get(label, 1), size)
    x = np.broadcast_to(x, [sizes[c] for c in left])
    y = np.broadcast_to(y, [sizes[c] for c in right])
    return np.einsum(f"{left},{right}->{output}", x, y)


def local_response_norm(a: Args):
    """x / (k + alpha / size * sum of x^2 over `size` neighbouring channels) ^ beta, the window centred on the
    channel (zeros past the edges). MIL does not say where an even window leans, so only odd sizes run."""
    x = _f(a("x"))
    size = int(a.scalar("size"))
    if size % 2 == 0:
        raise a.unsupported(f"an even size ({size})")
    squares = np.pad(np.square(x), [(0, 0), (size // 2, size // 2)] + [(0, 0)] * (x.ndim - 2))
    window = sum(squares[:, i : i + x.shape[1]] for i in range(size))
    alpha, beta, k = (np.float32(a.scalar(name, default)) for name, default in (("alpha", 1e-4), ("beta", 0.75), ("k", 1.0)))
    return x / np.power(k + alpha / np.float32(size) * window, beta)
