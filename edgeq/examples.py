"""Small built-in models for the quick start and the tests (seeded: same weights on every machine)."""

from __future__ import annotations

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A CIFAR-sized classifier: conv-bn-relu blocks, global pooling, a linear head returning `logits`."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, groups=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise, as in mobile networks
            nn.Hardswish(),
        )
        self.head = nn.Linear(32, classes)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(pixels).mean(dim=(2, 3))
        return {"logits": self.head(features)}


class TinyMLP(nn.Module):
    def __init__(self, features: int = 16, hidden: int = 64, outputs: int = 4):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            if tensor.is_floating_point():
                if name.endswith("running_var"):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return module.eval()


def tiny_convnet():
    """`edgeq convert edgeq.examples:tiny_convnet`: (model, example input 1x3x32x32)."""
    example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return _seeded(TinyConvNet()), (example,)


def tiny_mlp():
    """`edgeq convert edgeq.examples:tiny_mlp`: (model, example input 1x16)."""
    example = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    return _seeded(TinyMLP()), (example,)
