"""Models for converter tests, importable as `tests.converters.models:NAME` callables."""

from __future__ import annotations

import torch
from torch import nn


class Recurrent(nn.Module):
    """Unrolled LSTMCell over 4 steps: Core ML rejects the fused cell; edgeq rewrites it."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, 4, 8)
        h = c = torch.zeros(x.shape[0], 16)
        for step in range(x.shape[1]):
            h, c = self.cell(x[:, step], (h, c))
        return self.head(h)


class PerChannelPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 12)
        self.act = nn.PReLU(12, init=0.1)
        self.conv = nn.Conv1d(12, 12, 1)
        self.act2 = nn.PReLU(12, init=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, 5, 6)
        h = self.act(self.proj(x).transpose(1, 2))  # rank-3 PReLU over channels
        return self.act2(self.conv(h))


class CollidingNames(nn.Module):
    """Returns a dict whose key matches a name the exporter gives an internal value."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor):
        y = self.linear(x)
        return {"linear": y + 1, "add": y * 2}


class Unconvertible(nn.Module):
    """An op none of the converters take (a determinant) inside a named submodule."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 16)
        self.block = Determinant()

    def forward(self, x):
        return self.block(self.pre(x).reshape(1, 4, 4))


class Determinant(nn.Module):
    def forward(self, x):
        return torch.linalg.det(x)


def _seed(module):
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    return module.eval()


def recurrent():
    torch.manual_seed(0)
    return _seed(Recurrent()), (torch.randn(1, 4, 8),)


def prelu():
    torch.manual_seed(0)
    return _seed(PerChannelPReLU()), (torch.randn(1, 5, 6),)


def colliding_names():
    torch.manual_seed(0)
    return _seed(CollidingNames()), (torch.randn(1, 4),)


def unconvertible():
    torch.manual_seed(0)
    return _seed(Unconvertible()), (torch.randn(1, 4),)


class StatelessCell(nn.Module):
    """LSTMCell called without a state, the form Core ML's frontend rejects."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(8, 16)

    def forward(self, x):
        h, c = self.cell(x)
        return h + c


def stateless_cell():
    torch.manual_seed(0)
    return _seed(StatelessCell()), (torch.randn(2, 8),)


class SequenceLSTM(nn.Module):
    """A 1-layer nn.LSTM over a sequence and a linear head on the last step."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def sequence_lstm():
    torch.manual_seed(0)
    return _seed(SequenceLSTM()), (torch.randn(1, 6, 8),)


class NewOnes(nn.Module):
    """Uses Tensor.new_ones, which Core ML's frontend lacks under the empty decomposition table."""

    def forward(self, x):
        return x * 2 + x.new_ones(x.shape)


def new_ones():
    return NewOnes().eval(), (torch.randn(1, 4),)


class EdgeConvNet(nn.Module):
    """An Edge-TPU-friendly CNN, every op a module: conv-bn-relu, max pool, grouped conv-bn-relu6, depthwise
    conv-hardswish, adaptive average pool, flatten, linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2),
            nn.BatchNorm2d(32),
            nn.ReLU6(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise
            nn.Hardswish(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(32, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(image))))


def edge_convnet():
    """(model, example image 1x3x32x32): default initialisation, BatchNorm statistics drawn at random."""
    torch.manual_seed(0)
    model = EdgeConvNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model.eval(), (torch.randn(1, 3, 32, 32),)


class MaskedMeanPool(nn.Module):
    """Sentence-embedding pooling: masked mean over tokens, then L2 normalization (expand_dims, tile,
    reduce_sum, real_div and reduce_l2_norm in Core ML)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x: (1, 5, 8), mask: (1, 5) int64
        hidden = self.proj(x)
        weights = mask.unsqueeze(-1).expand(hidden.shape).float()
        mean = (hidden * weights).sum(1) / torch.clamp(weights.sum(1), min=1e-9)
        return torch.nn.functional.normalize(mean, p=2, dim=1)


def masked_mean_pool():
    torch.manual_seed(0)
    return _seed(MaskedMeanPool()), {"x": torch.randn(1, 5, 8), "mask": torch.tensor([[1, 1, 1, 0, 0]])}


class Tokens(nn.Module):
    """A BERT-style embedding block (word, position through a buffer of positions, token type) and a stack."""

    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(100, 64, padding_idx=0)
        self.position = nn.Embedding(16, 64)
        self.kind = nn.Embedding(2, 64)
        self.register_buffer("positions", torch.arange(16).unsqueeze(0), persistent=False)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.mid = nn.Linear(64, 64)
        self.head = nn.Linear(64, 8)

    def forward(self, input_ids, token_type_ids):
        x = self.word(input_ids) + self.position(self.positions[:, : input_ids.shape[1]]) + self.kind(token_type_ids)
        return self.head(self.mid(self.down(torch.relu(self.up(x)))))


def tokens():
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (1, 8))
    return Tokens().eval(), {"input_ids": ids, "token_type_ids": ids % 2}
