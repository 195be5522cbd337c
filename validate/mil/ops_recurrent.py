"""Recurrent MIL ops (lstm, gru, rnn) and iOS18's scaled_dot_product_attention.

Layouts and step equations as coremltools states them (ops/defs/iOS15/recurrent.py) and as its own numpy
references check them (ops/tests/iOS14/test_recurrent.py):
- x is (seq, batch, input); states are (batch, directions * hidden); gate blocks are stacked on axis 0 of
  the weights: lstm [input, forget, output, cell] with peepholes [input, forget, output]; gru
  [reset, output (new), update]; `bias` is the input and hidden biases summed.
- direction "reverse" feeds the sequence back to front and emits the states in that processing order
  (coremltools' reference flips the input, not the output); "bidirectional" (lstm) concatenates a forward and
  a backward pass on the hidden axis with both aligned to time, as PyTorch's bidirectional LSTM does.
- output_sequence=False emits the final hidden state as a sequence of one step.
"""

from __future__ import annotations

import math

import numpy as np

from edgeq.validate.mil.args import Args
from edgeq.validate.mil.args import f32 as _f

_ACTIVATIONS = {
    "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
    "tanh": np.tanh,
    "relu": lambda v: np.maximum(v, np.float32(0.0)),
    "linear": lambda v: v,
}


def _activation(a: Args, key: str, default: str):
    name = a.scalar(key, default)
    if name not in _ACTIVATIONS:  # hard_sigmoid and scaled_tanh carry parameters MIL does not expose here
        raise a.unsupported(f"{key} {name!r}")
    return _ACTIVATIONS[name]


def _gates(weight: np.ndarray, count: int) -> list[np.ndarray]:
    return np.split(_f(weight), count, axis=0)


def _outputs(a: Args, steps: list[np.ndarray], final: list[np.ndarray]):
    sequence = np.stack(steps) if a.scalar("output_sequence", False) else final[0][None]
    return [sequence, *final]


def lstm(a: Args):
    x = _f(a("x"))
    recurrent = _activation(a, "recurrent_activation", "sigmoid")
    cell_act = _activation(a, "cell_activation", "tanh")
    out_act = _activation(a, "activation", "tanh")
    if a("clip") is not None:
        raise a.unsupported("clip")
    direction = a.scalar("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise a.unsupported(f"direction {direction!r}")
    hidden = _f(a("weight_hh")).shape[1]

    def run(suffix: str, h: np.ndarray, c: np.ndarray, backwards: bool):
        w_ih, w_hh = _f(a("weight_ih" + suffix)), _f(a("weight_hh" + suffix))
        bias = a("bias" + suffix)
        bias = np.zeros(4 * hidden, np.float32) if bias is None else _f(bias)
        peephole = a("peephole" + suffix)
        p_i, p_f, p_o = (np.zeros(hidden, np.float32),) * 3 if peephole is None else _gates(peephole, 3)
        steps = []
        for t in (range(len(x) - 1, -1, -1) if backwards else range(len(x))):
            i, f, o, z = np.split(x[t] @ w_ih.T + h @ w_hh.T + bias, 4, axis=-1)
            i, f = recurrent(i + p_i * c), recurrent(f + p_f * c)
            c = f * c + i * cell_act(z)
            h = recurrent(o + p_o * c) * out_act(c)
            steps.append(h)
        return steps, h, c

    h0, c0 = _f(a("initial_h")), _f(a("initial_c"))
    if direction != "bidirectional":
        steps, h, c = run("", h0, c0, direction == "reverse")
        return _outputs(a, steps, [h, c])
    forward, h_f, c_f = run("", h0[:, :hidden], c0[:, :hidden], False)
    backward, h_b, c_b = run("_back", h0[:, hidden:], c0[:, hidden:], True)
    steps = [np.concatenate([f, b], axis=-1) for f, b in zip(forward, backward[::-1])]
    return _outputs(a, steps, [np.concatenate([h_f, h_b], -1), np.concatenate([c_f, c_b], -1)])


def gru(a: Args):
    """h = (1 - z) * o + z * h_prev with o = act(W_o x + b_o + W_ho (r * h_prev)), or with reset_after
    (iOS18, PyTorch's form) o = act(W_o x + b_io + r * (W_ho h_prev + b_ho)) where `input_bias` is b_i*."""
    x = _f(a("x"))
    recurrent = _activation(a, "recurrent_activation", "sigmoid")
    act = _activation(a, "activation", "tanh")
    direction = a.scalar("direction", "forward")
    if direction not in ("forward", "reverse"):
        raise a.unsupported(f"direction {direction!r}")
    w_ir, w_io, w_iz = _gates(a("weight_ih"), 3)
    w_hr, w_ho, w_hz = _gates(a("weight_hh"), 3)
    hidden = w_hr.shape[0]
    zeros = np.zeros(3 * hidden, np.float32)
    b_r, b_o, b_z = _gates(zeros if a("bias") is None else a("bias"), 3)
    reset_after = bool(a.scalar("reset_after", False))
    i_r, i_o, i_z = _gates(zeros if a("input_bias") is None else a("input_bias"), 3)
    h = _f(a("initial_h"))
    steps = []
    for t in (range(len(x) - 1, -1, -1) if direction == "reverse" else range(len(x))):
        r = recurrent(x[t] @ w_ir.T + h @ w_hr.T + b_r + i_r)
        z = recurrent(x[t] @ w_iz.T + h @ w_hz.T + b_z + i_z)
        if reset_after:
            o = act(x[t] @ w_io.T + i_o + r * (h @ w_ho.T + b_o))
        else:
            o = act(x[t] @ w_io.T + (r * h) @ w_ho.T + b_o + i_o)
        h = (1.0 - z) * o + z * h
        steps.append(h)
    return _outputs(a, steps, [h])


def rnn(a: Args):
    x = _f(a("x"))
    act = _activation(a, "activation", "tanh")
    direction = a.scalar("direction", "forward")
    if direction not in ("forward", "reverse"):
        raise a.unsupported(f"direction {direction!r}")
    w_ih, w_hh = _f(a("weight_ih")), _f(a("weight_hh"))
    bias = a("bias")
    bias = np.float32(0.0) if bias is None else _f(bias)
    h = _f(a("initial_h"))
    steps = []
    for t in (range(len(x) - 1, -1, -1) if direction == "reverse" else range(len(x))):
        h = act(x[t] @ w_ih.T + h @ w_hh.T + bias)
        steps.append(h)
    return _outputs(a, steps, [h])


def scaled_dot_product_attention(a: Args):
    """softmax(Q K^T / sqrt(d) + mask) V over the last two axes; a bool mask keeps where True."""
    q, k, v = _f(a("query")), _f(a("key")), _f(a("value"))
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    mask = a("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + _f(mask)
    scores = np.exp(scores - np.max(scores, axis=-1, keepdims=True))
    return np.matmul(scores / np.sum(scores, axis=-1, keepdims=True), v)


RECURRENT_OPS = {"lstm": lstm, "gru": gru, "rnn": rnn, "scaled_dot_product_attention": scaled_dot_product_attention}
