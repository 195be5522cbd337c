"""Models for per-layer drift tests, importable as `tests.validate.layer_models:NAME` callables."""

from __future__ import annotations

import torch
from torch import nn

DEAD = 5  # the hidden channel that body.0's bias keeps at zero after the ReLU
BAD = "body.2"  # the layer int8 quantizes badly


def one_bad_layer():
    """An MLP whose third layer (`body.2`) loses almost everything to per-channel int8 weights, deliberately.

    Every output row of `body.2` has one huge weight on a hidden channel that is always zero (body.0's bias
    kills it), so the huge weight never matters in FP32 but sets the row's int8 scale: the ordinary weights
    round to 0 or +-1 step. The layers before and after quantize well. A per-layer report must name `body.2`.
    """
    generator = torch.Generator().manual_seed(0)
    body = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)
    )
    with torch.no_grad():
        for layer in body:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.3)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)
        body[0].bias[DEAD] = -100.0
        body[2].weight[:, DEAD] = 40.0
    model = OneBadLayer(body).eval()
    return model, (torch.randn(1, 16, generator=generator),)


class OneBadLayer(nn.Module):
    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
