"""Seeded construction for zoo models: PyTorch's own initialisation (so activations keep a sane scale through
deep stacks, which N(0, 0.3) weights would not) drawn from a fixed seed, plus non-trivial norm statistics so
batch-norm folding and affine norms are exercised."""

from __future__ import annotations

import torch
from torch import nn


def seeded(cls, *args, seed: int = 0, **kwargs) -> nn.Module:
    """`cls(*args, **kwargs)` built under `seed` without touching the caller's RNG, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = cls(*args, **kwargs)
        randomize_norms(module)
    return module.eval()


def randomize_norms(module: nn.Module) -> None:
    """Give norm layers scales near 1 and small shifts (and batch-norm running statistics), as trained ones have."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                if getattr(layer, "weight", None) is not None:
                    layer.weight.uniform_(0.7, 1.3)
                if getattr(layer, "bias", None) is not None:
                    layer.bias.normal_(0.0, 0.1)
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.running_mean is not None:
                layer.running_mean.normal_(0.0, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
