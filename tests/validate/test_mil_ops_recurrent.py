"""MIL lstm, gru, rnn and scaled_dot_product_attention against PyTorch (method: test_mil_ops.py).

PyTorch's nn.LSTM/nn.GRU/nn.RNN with random weights are the references; their gate blocks are reordered to
MIL's layouts here (LSTM: torch i,f,g,o -> MIL i,f,o,z; GRU: torch r,z,n -> MIL r,o,z) and their two biases
summed where MIL has one, so a wrong gate order or a dropped bias gives a wrong answer. "reverse" is PyTorch on
the flipped sequence, outputs in processing order (coremltools' own reference does the same); bidirectional
is PyTorch's bidirectional LSTM. GRU without reset_after (MIL's older form, reset applied to h before the
matmul) has no PyTorch module: its reference is that equation in torch ops.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.validate.test_mil_ops import Case, _check, _np, _randn, _t, run_op

SEQ, BATCH, INPUT, HIDDEN = 5, 2, 3, 4


def _lstm_weights(lstm: nn.LSTM, suffix: str = "") -> dict:
    def ifoz(t):  # torch [i, f, g, o] -> MIL [i, f, o, z]
        i, f, g, o = t.detach().chunk(4)
        return _np(torch.cat([i, f, o, g]))

    sd = dict(lstm.named_parameters())
    key = "_back" if suffix else ""
    return {
        f"weight_ih{key}": ifoz(sd[f"weight_ih_l0{suffix}"]),
        f"weight_hh{key}": ifoz(sd[f"weight_hh_l0{suffix}"]),
        f"bias{key}": ifoz(sd[f"bias_ih_l0{suffix}"] + sd[f"bias_hh_l0{suffix}"]),
    }


def _lstm_cases() -> list[Case]:
    torch.manual_seed(0)
    cases = []
    x, h0, c0 = _randn(SEQ, BATCH, INPUT), _randn(BATCH, HIDDEN), _randn(BATCH, HIDDEN)
    lstm = nn.LSTM(INPUT, HIDDEN)
    with torch.no_grad():
        out, (h, c) = lstm(_t(x), (_t(h0)[None], _t(c0)[None]))
        out_r, (h_r, c_r) = lstm(torch.flip(_t(x), (0,)), (_t(h0)[None], _t(c0)[None]))
    params = {"x": x, "initial_h": h0, "initial_c": c0, **_lstm_weights(lstm)}
    cases.append(Case("lstm_sequence", "lstm", {**params, "output_sequence": np.bool_(True)}, [_np(out), _np(h[0]), _np(c[0])], ulps=32))
    cases.append(Case("lstm_last_step", "lstm", params, [_np(out[-1:]), _np(h[0]), _np(c[0])], ulps=32))
    cases.append(Case("lstm_reverse", "lstm", {**params, "direction": "reverse", "output_sequence": np.bool_(True)},
                      [_np(out_r), _np(h_r[0]), _np(c_r[0])], ulps=32, tags=["mode"]))
    bi = nn.LSTM(INPUT, HIDDEN, bidirectional=True)
    h2, c2 = _randn(BATCH, 2 * HIDDEN), _randn(BATCH, 2 * HIDDEN)
    with torch.no_grad():
        states = (_t(h2).reshape(BATCH, 2, HIDDEN).transpose(0, 1).contiguous(), _t(c2).reshape(BATCH, 2, HIDDEN).transpose(0, 1).contiguous())
        out_b, (h_b, c_b) = bi(_t(x), states)
    cases.append(Case("lstm_bidirectional", "lstm",
                      {"x": x, "initial_h": h2, "initial_c": c2, **_lstm_weights(bi), **_lstm_weights(bi, "_reverse"),
                       "direction": "bidirectional", "output_sequence": np.bool_(True)},
                      [_np(out_b), _np(h_b.transpose(0, 1).reshape(BATCH, -1)), _np(c_b.transpose(0, 1).reshape(BATCH, -1))], ulps=32, tags=["mode"]))
    return cases


def _gru_cases() -> list[Case]:
    torch.manual_seed(1)
    cases = []
    x, h0 = _randn(SEQ, BATCH, INPUT), _randn(BATCH, HIDDEN)
    gru = nn.GRU(INPUT, HIDDEN)

    def roz(t):  # torch [r, z, n] -> MIL [r, o, z]
        r, z, n = t.detach().chunk(3)
        return _np(torch.cat([r, n, z]))

    w_ih, w_hh, b_ih, b_hh = (roz(p) for p in (gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0))
    with torch.no_grad():
        out, h = gru(_t(x), _t(h0)[None])
        out_r, h_r = gru(torch.flip(_t(x), (0,)), _t(h0)[None])
    after = {"x": x, "initial_h": h0, "weight_ih": w_ih, "weight_hh": w_hh, "bias": b_hh, "input_bias": b_ih, "reset_after": np.bool_(True)}
    cases.append(Case("gru_reset_after", "gru", {**after, "output_sequence": np.bool_(True)}, [_np(out), _np(h[0])], ulps=32, tags=["mode"]))
    cases.append(Case("gru_reset_after_reverse_last", "gru", {**after, "direction": "reverse"}, [_np(out_r[-1:]), _np(h_r[0])], ulps=32))

    # MIL's older form: o = tanh(W_o x + W_ho (r * h) + b_o), one summed bias
    w_r, w_o, w_z = (torch.from_numpy(a) for a in np.split(w_ih, 3))
    u_r, u_o, u_z = (torch.from_numpy(a) for a in np.split(w_hh, 3))
    b_r, b_o, b_z = (torch.from_numpy(a) for a in np.split(b_ih + b_hh, 3))
    state, steps = _t(h0), []
    for t in range(SEQ):
        xt = _t(x[t])
        r = torch.sigmoid(xt @ w_r.T + state @ u_r.T + b_r)
        z = torch.sigmoid(xt @ w_z.T + state @ u_z.T + b_z)
        o = torch.tanh(xt @ w_o.T + (r * state) @ u_o.T + b_o)
        state = (1 - z) * o + z * state
        steps.append(state)
    cases.append(Case("gru_reset_before", "gru", {"x": x, "initial_h": h0, "weight_ih": w_ih, "weight_hh": w_hh, "bias": b_ih + b_hh,
                                                  "output_sequence": np.bool_(True)}, [_np(torch.stack(steps)), _np(state)], ulps=32, tags=["mode"]))
    return cases


def _rnn_cases() -> list[Case]:
    torch.manual_seed(2)
    cases = []
    x, h0 = _randn(SEQ, BATCH, INPUT), _randn(BATCH, HIDDEN)
    for activation in ("tanh", "relu"):
        rnn = nn.RNN(INPUT, HIDDEN, nonlinearity=activation)
        with torch.no_grad():
            out, h = rnn(_t(x), _t(h0)[None])
        params = {"x": x, "initial_h": h0, "weight_ih": _np(rnn.weight_ih_l0), "weight_hh": _np(rnn.weight_hh_l0),
                  "bias": _np(rnn.bias_ih_l0 + rnn.bias_hh_l0), "activation": activation, "output_sequence": np.bool_(True)}
        cases.append(Case(f"rnn_{activation}", "rnn", params, [_np(out), _np(h[0])], ulps=32, tags=["mode"]))
    return cases


def _attention_cases() -> list[Case]:
    cases = []
    q, k, v = _randn(2, 3, 5, 8), _randn(2, 3, 6, 8), _randn(2, 3, 6, 4)
    tq, tk, tv = _t(q), _t(k), _t(v)
    keep = np.tril(np.ones((5, 6), bool), 1)  # every row keeps at least one key
    cases.append(Case("sdpa_bool_mask", "scaled_dot_product_attention", {"query": q, "key": k, "value": v, "attn_mask": keep},
                      _np(F.scaled_dot_product_attention(tq, tk, tv, attn_mask=_t(keep))), ulps=16, tags=["mode"]))
    bias = _randn(1, 1, 5, 6)
    cases.append(Case("sdpa_float_mask", "scaled_dot_product_attention", {"query": q, "key": k, "value": v, "attn_mask": bias},
                      _np(F.scaled_dot_product_attention(tq, tk, tv, attn_mask=_t(bias))), ulps=16))
    cases.append(Case("sdpa_no_mask", "scaled_dot_product_attention", {"query": q, "key": k, "value": v},
                      _np(F.scaled_dot_product_attention(tq, tk, tv)), ulps=16))
    return cases


CASES = _lstm_cases() + _gru_cases() + _rnn_cases() + _attention_cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op_matches_pytorch(case):
    outputs = len(case.expected) if isinstance(case.expected, list) else 1
    _check(case, run_op(case.op, case.params, case.dtype, outputs), case.expected)
