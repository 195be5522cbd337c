"""Recurrent layers (nn.GRU, nn.LSTM, nn.RNN and their cells) rebuilt from nn.Linear layers, so a plan can
quantize their weights like any other linear layer.

PyTorch's recurrent modules hand their weights to one fused op (aten.gru, aten.lstm), so no converter sees a
linear layer to quantize. These modules compute the same function with the same numbers: per layer and
direction, an input projection `ih` (applied to the whole sequence at once) and a recurrent projection `hh`
(once per step, the recurrence unrolled over the sequence length the module is traced with). Gate order and
equations are PyTorch's (torch.nn.GRU / LSTM / RNN docs):

  GRU   r, z, n = chunks of ih(x) and hh(h);  n = tanh(ih_n + r * hh_n);  h' = (1 - z) * n + z * h
  LSTM  i, f, g, o = sigmoid/sigmoid/tanh/sigmoid(ih(x) + hh(h));  c' = f * c + i * g;  h' = o * tanh(c')
        (proj_size > 0: h' = proj(o * tanh(c')))
  RNN   h' = tanh or relu(ih(x) + hh(h))
"""

from __future__ import annotations

import torch
from torch import nn

RECURRENT = (nn.GRU, nn.LSTM, nn.RNN)
CELLS = (nn.GRUCell, nn.LSTMCell, nn.RNNCell)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` [out, in] and `bias` [out] (the FP32 reference keeps its own)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _projections(mode: str, w_ih, b_ih, w_hh, b_hh) -> tuple[nn.Linear, nn.Linear]:
    """(ih, hh). LSTM and RNN add both biases before any nonlinearity, so ih carries their sum and hh none (one
    bias less to store, equal up to float rounding); GRU's n gate needs b_hn inside r * (W_hn h + b_hn)."""
    if mode != "gru" and b_ih is not None and b_hh is not None:
        return _linear(w_ih, b_ih + b_hh), _linear(w_hh, None)
    return _linear(w_ih, b_ih), _linear(w_hh, b_hh)


def _mode(module: nn.Module) -> str:
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "gru"
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    return "rnn_relu" if module.nonlinearity == "relu" else "rnn_tanh"


def _step(mode: str, gates_x: torch.Tensor, hh: nn.Linear, h: torch.Tensor, c: torch.Tensor | None, zero_state: bool = False):
    """One time step: (h', c') from the input projection `gates_x` of this step and the previous state. Written
    with few ops: an unrolled graph repeats them per step, and each op carries its converter's metadata.
    `zero_state`: h is the default zero state, so hh(h) is hh's bias (exactly), and no matmul is emitted for it."""
    if zero_state:
        gates_h = hh.bias.expand_as(gates_x) if hh.bias is not None else torch.zeros_like(gates_x)
    else:
        gates_h = hh(h)
    if mode == "gru":
        size = h.shape[-1]
        x_rz, x_n = gates_x.split([2 * size, size], -1)
        h_rz, h_n = gates_h.split([2 * size, size], -1)
        r, z = torch.sigmoid(x_rz + h_rz).chunk(2, -1)
        n = torch.tanh(x_n + r * h_n)
        return n + z * (h - n), None  # = (1 - z) * n + z * h
    if mode == "lstm":
        i, f, g, o = (gates_x + gates_h).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    total = gates_x + gates_h
    return (torch.relu(total) if mode == "rnn_relu" else torch.tanh(total)), None


class LinearDirection(nn.Module):
    """One layer, one direction: `ih` and `hh` (LSTM with proj_size: also `proj`, no bias). It is called as a module
    (not just a holder) so converters that name tensors by the modules on the call stack (litert-torch) tell
    `l0.ih` from `l1.ih`."""

    def __init__(self, module: nn.Module, suffix: str, mode: str, reverse: bool):
        super().__init__()
        self.mode, self.reverse = mode, reverse
        self.ih, self.hh = _projections(mode, *(getattr(module, f"{kind}_{suffix}", None) for kind in
                                                ("weight_ih", "bias_ih", "weight_hh", "bias_hh")))
        projection = getattr(module, f"weight_hr_{suffix}", None)
        self.proj = _linear(projection, None) if projection is not None else None

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, zero_state: bool = False):
        """x (batch, time, features) -> (outputs (batch, time, state), h_n, c_n), unrolled over `time`;
        `zero_state`: h and c are the default zeros."""
        gates_x = self.ih(x)  # the whole sequence in one matmul
        steps = range(x.shape[1] - 1, -1, -1) if self.reverse else range(x.shape[1])
        sequence = [None] * x.shape[1]
        for t in steps:
            h, c = _step(self.mode, gates_x[:, t], self.hh, h, c, zero_state)
            zero_state = False
            if self.proj is not None:
                h = self.proj(h)
            sequence[t] = h
        return torch.stack(sequence, 1), h, c


class LinearRecurrent(nn.Module):
    """nn.GRU / nn.LSTM / nn.RNN as `l{k}` (and `l{k}_reverse`) LinearDirection blocks, unrolled per step.

    Same call and results as the module it replaces: (input, hx) -> (output, h_n) or (output, (h_n, c_n)),
    batch_first or not, batched or not. PackedSequence input is not taken (the rewrite is not applied then).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.mode = _mode(module)
        self.num_layers, self.batch_first = module.num_layers, module.batch_first
        self.directions = 2 if module.bidirectional else 1
        self.hidden_size = module.hidden_size
        self.state_size = getattr(module, "proj_size", 0) or module.hidden_size  # what h holds
        for k in range(self.num_layers):
            for d, tail in enumerate(("", "_reverse")[: self.directions]):
                self.add_module(f"l{k}{tail}", LinearDirection(module, f"l{k}{tail}", self.mode, reverse=d == 1))

    def forward(self, input: torch.Tensor, hx=None):
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (batch, time, features) from here on
        batch = x.shape[0]
        h0, c0 = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
        if h0 is not None and not batched:
            h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
        finals_h, finals_c = [], []
        for k in range(self.num_layers):
            outputs = []
            for d in range(self.directions):
                index = k * self.directions + d
                h = h0[index] if h0 is not None else x.new_zeros(batch, self.state_size)
                c = None
                if self.mode == "lstm":
                    c = c0[index] if c0 is not None else x.new_zeros(batch, self.hidden_size)
                sequence, h, c = getattr(self, f"l{k}{'_reverse' if d else ''}")(x, h, c, zero_state=h0 is None)
                outputs.append(sequence)
                finals_h.append(h)
                finals_c.append(c)
            x = torch.cat(outputs, -1) if self.directions == 2 else outputs[0]
        output = x if self.batch_first else x.transpose(0, 1)
        h_n = torch.stack(finals_h, 0)
        c_n = torch.stack(finals_c, 0) if self.mode == "lstm" else None
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        return output, ((h_n, c_n) if self.mode == "lstm" else h_n)


class LinearCell(nn.Module):
    """nn.GRUCell / nn.LSTMCell / nn.RNNCell as `ih` and `hh`: one step per call, as the cell is called."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.mode = _mode(cell)
        self.hidden_size = cell.hidden_size
        self.ih, self.hh = _projections(self.mode, cell.weight_ih, cell.bias_ih, cell.weight_hh, cell.bias_hh)

    def forward(self, input: torch.Tensor, hx=None):
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        h, c = (hx if isinstance(hx, tuple) else (hx, None)) if hx is not None else (None, None)
        zero_state = h is None
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        elif not batched:
            h = h.unsqueeze(0)
        if self.mode == "lstm":
            c = x.new_zeros(x.shape[0], self.hidden_size) if c is None else (c if batched else c.unsqueeze(0))
        h, c = _step(self.mode, self.ih(x), self.hh, h, c, zero_state)
        if not batched:
            h, c = h.squeeze(0), (c.squeeze(0) if c is not None else None)
        return (h, c) if self.mode == "lstm" else h
