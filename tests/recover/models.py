"""Tiny seeded models and data for the recovery tests."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from edgeq.load.wrap import FlatModel


class Blocks(nn.Module):
    """A 3-block residual MLP classifier (its blocks in an nn.ModuleList: what the feature loss taps)."""

    def __init__(self, features=32, hidden=64, classes=6):
        super().__init__()
        self.embed = nn.Linear(12, features)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, features)) for _ in range(3))
        self.norm = nn.LayerNorm(features)
        self.head = nn.Linear(features, classes)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def teacher(seed=0) -> FlatModel:
    torch.manual_seed(seed)
    return FlatModel(Blocks()).eval()


def noised(model: nn.Module, amount=0.3, seed=1) -> nn.Module:
    """A copy whose weights carry relative Gaussian noise (a stand-in for a damaged, compressed student)."""
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.add_(amount * p.std() * torch.randn(p.shape, generator=generator))
    return student


def samples(count=32, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 12)).astype(np.float32)} for _ in range(count)]


def outputs(model, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.from_numpy(s["x"]))[0] for s in data])


def relative_error(student, reference, data) -> float:
    s, t = outputs(student, data), outputs(reference, data)
    return float((s - t).norm() / t.norm())


def rtn_plan(model: nn.Module, bits=4, group_size=16, symmetric=True, scale_dtype="float32"):
    """A round-to-nearest plan (MSE clipping, as edgeq's RTN) of every linear layer whose input width the group
    divides (`group_size` None: per output channel, every linear layer); the others stay float with a reason."""
    from edgeq.calibration.lowbit.grid import Grid
    from edgeq.calibration.lowbit.rtn import rtn
    from edgeq.calibration.lowbit.to_plan import layer_plan
    from edgeq.compress.apply import user_fqn
    from edgeq.plan import LayerPlan, OpKind, QuantPlan

    grid = Grid(bits, group_size, symmetric, scale_dtype)
    plan = QuantPlan(f"int{bits}-weight", "test")
    for name, child in model.named_modules():
        if isinstance(child, nn.Linear):
            fqn = user_fqn(name)
            if group_size and child.in_features % group_size:
                plan.layers[fqn] = LayerPlan(fqn, OpKind.LINEAR, reason="input width not a multiple of the group")
            else:
                plan.layers[fqn] = layer_plan(fqn, OpKind.LINEAR, rtn(child.weight, grid, "mse"))
    return plan


def simulated(model: nn.Module, plan) -> nn.Module:
    """A copy of `model` whose planned layers hold the plan's dequantized weights: the PyTorch simulation of a
    weight-only plan (what calibration/lowbit_fallback.py simulates and the converters lower)."""
    from edgeq.calibration.lowbit_fallback import dequantized
    from edgeq.compress.apply import user_fqn

    result = copy.deepcopy(model)
    with torch.no_grad():
        for name, child in result.named_modules():
            entry = plan.layers.get(user_fqn(name))
            if entry is not None and entry.weight_codes is not None:
                child.weight.copy_(dequantized(entry, child.weight.shape))
    return result


def blocks_source():
    """`edgeq.load.load_model("tests.recover.models:blocks_source")`: the teacher's network and an example input."""
    torch.manual_seed(0)
    return Blocks().eval(), (torch.randn(1, 12),)
