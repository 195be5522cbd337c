"""Model factories for the `package.module:callable` source tests (imported as tests.load.factories:NAME)."""

from __future__ import annotations

import torch
from torch import nn

from edgeq.examples import TinyMLP, _seeded


class Difference(nn.Module):
    """Two named inputs, so a dict of examples can be checked to reach the right parameters."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * 2.0 - b


def mlp_alone():
    """A module with no example inputs: the caller must declare them."""
    return _seeded(TinyMLP())


def mlp_with_tuple():
    return _seeded(TinyMLP()), (torch.randn(1, 16, generator=torch.Generator().manual_seed(2)),)


def difference_with_dict():
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(1, 8, generator=generator)
    b = torch.randn(1, 8, generator=generator)
    # Keys in the opposite order to forward's parameters: the names, not the positions, must decide.
    return Difference(), {"b": b, "a": a}


def transposed_examples():
    """Example inputs that are a non-contiguous view (2x16 with strides (1, 2))."""
    return _seeded(TinyMLP()), (torch.randn(16, 2, generator=torch.Generator().manual_seed(4)).t(),)


def broken():
    raise RuntimeError("factory exploded on purpose")
