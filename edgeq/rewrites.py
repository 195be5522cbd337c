"""Exact PyTorch rewrites applied before a converter that rejects a common construct.

Each rewrite replaces a module with one built from ops the converter takes, computing the same function
with the same weights (same state-dict names); validation then proves it on the artifact.

Measured with coremltools 9.0 through torch.export: LSTMCell (with or without a state) and nn.LSTM convert
as they are, so no recurrent rewrite is needed; per-channel PReLU on rank-3 inputs is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class ChannelPReLU(nn.Module):
    """Per-channel PReLU as relu(x) - w * relu(-x), with w broadcast on axis 1 (Core ML rejects rank-2/3 inputs)."""

    def __init__(self, prelu: nn.PReLU):
        super().__init__()
        self.weight = prelu.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.reshape([1, -1] + [1] * (x.dim() - 2)) if x.dim() >= 2 else self.weight
        return torch.relu(x) - weight * torch.relu(-x)


@dataclass(frozen=True)
class Rewrite:
    name: str
    runtimes: frozenset[str]  # the converters that need it
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], nn.Module]


REWRITES = (
    Rewrite(
        "prelu-per-channel-to-relu",
        frozenset({"coreml"}),
        lambda m: type(m) is nn.PReLU and m.num_parameters > 1,
        ChannelPReLU,
    ),
)


def apply_rewrites(module: nn.Module, runtime: str) -> tuple[nn.Module, list[str]]:
    """A copy of `module` with every rewrite the runtime needs; returns (module, ['name: fqn', ...]).

    The original module is untouched (it stays the FP32 reference); no copy is made when nothing matches.
    """
    wanted = [r for r in REWRITES if runtime in r.runtimes]
    hits = [(fqn, r) for fqn, m in module.named_modules() for r in wanted if fqn and r.matches(m)]
    if not hits:
        return module, []
    module = copy.deepcopy(module)
    applied = []
    for fqn, rewrite in hits:
        parent_name, _, child = fqn.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, rewrite.build(getattr(parent, child)))
        applied.append(f"{rewrite.name}: {fqn.removeprefix('inner.')}")
    return module, applied
