"""Small models whose every weight matrix an int8 plan must quantize (tests/test_layer_coverage.py), importable as
`tests.coverage_models:NAME` callables returning (model, example inputs).

Sized so int8 weights are most of the artifact and still convert in seconds: an unrolled recurrence repeats its
ops per step, and the ONNX exporter stores about 1 kB of debug metadata (stack trace, FX node) on every op, so
few steps (3) and wide layers keep that graph overhead under a tenth of the int8 weights.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES, HIDDEN, STEPS, CLASSES = 40, 320, 3, 12
LSTM_HIDDEN = 384  # bidirectional: twice the ops per step of the GRU's layers


class KeywordGRU(nn.Module):
    """A two-layer GRU keyword spotter over (batch, time, features) frames, classifying its last state."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(FEATURES, HIDDEN, num_layers=2, batch_first=True)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        sequence, _ = self.gru(frames)
        return self.head(sequence[:, -1])


class KeywordLSTM(nn.Module):
    """A bidirectional LSTM over (time, batch, features) frames (batch_first False), mean-pooled."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(FEATURES, LSTM_HIDDEN, bidirectional=True)
        self.head = nn.Linear(2 * LSTM_HIDDEN, CLASSES)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        sequence, (hidden, cell) = self.lstm(frames)
        return self.head(sequence.mean(0))


class TinyEncoder(nn.Module):
    """nn.TransformerEncoderLayer (batch_first, the fast-path layout) between an input projection and a head."""

    def __init__(self, width: int = 256, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(FEATURES, width)
        self.encoder = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(frames)).mean(1))


def _build(module: nn.Module, shape: tuple[int, ...]):
    for index, parameter in enumerate(module.parameters()):  # deterministic, small enough that no gate saturates
        torch.nn.init.uniform_(parameter, -0.15, 0.15, generator=torch.Generator().manual_seed(index))
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return module.eval(), (example,)


def keyword_gru():
    return _build(KeywordGRU(), (1, STEPS, FEATURES))


def keyword_lstm():
    return _build(KeywordLSTM(), (STEPS, 1, FEATURES))


def tiny_encoder():
    return _build(TinyEncoder(), (1, STEPS, FEATURES))


class LayerKinds(nn.Module):
    """Grouped and depthwise convolutions (1-D and 2-D), an embedding tied to the output head, and a transposed
    convolution (which edgeq keeps float, with its reason in the plan)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.grouped = nn.Conv1d(32, 32, 3, padding=1, groups=4)
        self.depthwise = nn.Conv1d(32, 32, 3, padding=1, groups=32)
        self.grouped2d = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.depthwise2d = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose1d(32, 32, 2, stride=2)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight  # tied: one tensor, two uses

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens).transpose(1, 2)
        x = self.up(self.depthwise(torch.relu(self.grouped(x)))).mean(-1)
        y = self.depthwise2d(self.grouped2d(image)).mean((2, 3))
        return self.head(x) + y.sum(-1, keepdim=True)


def layer_kinds():
    module, _ = _build(LayerKinds(), (1,))
    tokens = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    return module, (tokens, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)))
