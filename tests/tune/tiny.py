"""A tiny seeded MLP for the tune tests: four linear layers whose input widths (64, 128) take groups of 32 and
64 (TFLite's blocks are multiples of 32), one of them made sensitive on purpose (a few large input weights, as
outlier channels make real layers sensitive) so the search has a reason to spend bytes unevenly."""

from __future__ import annotations

import torch
from torch import nn


class TinyTuneMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.mid = nn.Linear(128, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.gelu(self.up(x))
        x = torch.nn.functional.gelu(self.mid(x))
        return self.head(torch.tanh(self.down(x)))


def build():
    """`edgeq tune tests.tune.tiny:build`: (model, example input 1x64)."""
    generator = torch.Generator().manual_seed(0)
    model = TinyTuneMLP().eval()
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)
        model.mid.weight[:, :4] *= 12.0  # outlier input channels: 4-bit groups around them lose the small weights
    example = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    return model, (example,)
