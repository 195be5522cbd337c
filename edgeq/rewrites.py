"""Exact PyTorch rewrites applied before a converter that rejects a common construct.

Each rewrite replaces a module with one built from ops the converter takes, computing the same function
with the same weights (same state-dict names); validation then proves it on the artifact.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class ExplicitLSTMCell(nn.Module):
    """nn.LSTMCell written as two linears and gate math (Core ML rejects the fused cell)."""

    def __init__(self, cell: nn.LSTMCell):
        super().__init__()
        self.hidden_size = cell.hidden_size
        self.weight_ih = cell.weight_ih
        self.weight_hh = cell.weight_hh
        self.bias_ih = cell.bias_ih
        self.bias_hh = cell.bias_hh

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            state = (zeros, zeros)
        h, c = state
        gates = nn.functional.linear(x, self.weight_ih, self.bias_ih) + nn.functional.linear(h, self.weight_hh, self.bias_hh)
        i, f, g, o = gates.chunk(4, dim=1)  # PyTorch's gate order: input, forget, cell, output
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = torch.sigmoid(o) * torch.tanh(c_next)
        return h_next, c_next


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
    Rewrite("lstm-cell-to-gates", frozenset({"coreml"}), lambda m: type(m) is nn.LSTMCell, ExplicitLSTMCell),
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
