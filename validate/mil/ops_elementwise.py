"""Elementwise MIL ops: arithmetic, comparisons, activations, softmax, select and cast."""

from __future__ import annotations

import math

import numpy as np

from edgeq.validate.mil.args import Args
from edgeq.validate.mil.args import f32 as _f
from edgeq.validate.mil.program import DTYPES

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



# ---- more unary, binary and activation ops (coremltools' value_inference formulas) ------------------------

def _with_epsilon(fn, default: float):
    """inverse, log, rsqrt: fn(x + epsilon), epsilon defaulting as the op definition does."""
    def run(a: Args):
        return fn(_f(a("x")) + np.float32(a.scalar("epsilon", default)))
    return run


def erf(a: Args):
    return _erf(_f(a("x")))


def threshold(a: Args):  # max(x, alpha)
    return np.maximum(_f(a("x")), _f(a("alpha")))


def _per_channel(param, x: np.ndarray) -> np.ndarray:
    """An alpha/beta vector of length C broadcast on axis 1 (prelu, softplus_parametric); scalars as they are."""
    param = _f(param)
    return param.reshape([1, -1] + [1] * (x.ndim - 2)) if param.ndim == 1 and x.ndim >= 2 else param


def prelu(a: Args):
    x = _f(a("x"))
    return np.maximum(x, np.float32(0.0)) + np.minimum(x, np.float32(0.0)) * _per_channel(a("alpha"), x)


def softplus_parametric(a: Args):  # alpha * log(1 + exp(beta * x)), per channel
    x = _f(a("x"))
    return _per_channel(a("alpha"), x) * np.log1p(np.exp(x * _per_channel(a("beta"), x)))


def leaky_relu(a: Args):
    x = _f(a("x"))
    return np.where(x >= 0, x, _f(a("alpha", 0.01)) * x)


def elu(a: Args):
    x = _f(a("x"))
    return np.where(x > 0, x, _f(a("alpha", 1.0)) * np.expm1(np.minimum(x, 0)))


def clamped_relu(a: Args):  # min(max(x, 0), beta) + min(min(x, 0) * alpha, beta)
    x = _f(a("x"))
    alpha, beta = _f(a("alpha", 0.0)), _f(a("beta", 6.0))
    return np.minimum(np.maximum(x, 0), beta) + np.minimum(np.minimum(x, 0) * alpha, beta)


def scaled_tanh(a: Args):  # alpha * tanh(beta * x)
    return _f(a("alpha", 1.0)) * np.tanh(_f(a("x")) * _f(a("beta", 1.0)))


def linear_activation(a: Args):  # alpha * x + beta
    return _f(a("alpha")) * _f(a("x")) + _f(a("beta", 0.0))


def softplus(a: Args):  # log(1 + exp(x)) without overflow
    x = _f(a("x"))
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, np.float32(0.0))


def silu(a: Args):
    x = _f(a("x"))
    return x / (1.0 + np.exp(-x))


UNARY = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "ceil": np.ceil, "floor": np.floor, "round": np.round,  # round: half to even, as value_inference's np.round
    "cos": np.cos, "cosh": np.cosh, "sin": np.sin, "sinh": np.sinh, "tan": np.tan,
    "exp": np.exp, "exp2": np.exp2, "sqrt": np.sqrt, "square": np.square, "sign": np.sign,
    "relu6": lambda x: np.minimum(np.maximum(x, np.float32(0.0)), np.float32(6.0)),
    "softsign": lambda x: x / (1.0 + np.abs(x)),
}
# arithmetic keeps integer operands integer (i32 add, floor_div, mod on indices); comparisons give bool
BINARY = {
    "pow": np.power, "floor_div": np.floor_divide, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "greater": np.greater, "less": np.less, "less_equal": np.less_equal,
    "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


def logical_not(a: Args):
    return np.logical_not(np.asarray(a("x")))


MORE_ELEMENTWISE = {
    **{name: _unary(fn) for name, fn in UNARY.items()},
    **{name: _binary(fn) for name, fn in BINARY.items()},
    "inverse": _with_epsilon(np.reciprocal, 1e-4),
    "log": _with_epsilon(np.log, 1e-45),
    "rsqrt": _with_epsilon(lambda v: 1.0 / np.sqrt(v), 1e-12),
    "erf": erf,
    "threshold": threshold,
    "logical_not": logical_not,
    "prelu": prelu,
    "softplus_parametric": softplus_parametric,
    "leaky_relu": leaky_relu,
    "elu": elu,
    "clamped_relu": clamped_relu,
    "scaled_tanh": scaled_tanh,
    "linear_activation": linear_activation,
    "softplus": softplus,
    "silu": silu,
}
