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

