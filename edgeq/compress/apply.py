"""Swap a model's layers for their quantized forms, by torch FQN, on a copy (the FP32 model stays the reference)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

from torch import nn

from edgeq.compress.qdq import WeightForm, quantized_module
from edgeq.plan import QuantPlan

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
_WRAPPER_PREFIX = "inner."  # edgeq's FlatModel wrapper; plans use the user's own FQNs


def user_fqn(fqn: str) -> str:
    return fqn.removeprefix(_WRAPPER_PREFIX)


def quantizable_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(user FQN, module) of every layer a plan may quantize, in model order."""
    for fqn, child in module.named_modules():
        if isinstance(child, QUANTIZABLE):
            yield user_fqn(fqn), child


def apply_plan(module: nn.Module, plan: QuantPlan, form: WeightForm, simulate_dynamic: bool = False) -> nn.Module:
    """A copy of `module` with every quantized layer of `plan` replaced by its QDQ form.

    `simulate_dynamic` also simulates run-time activation quantization in PyTorch (accuracy estimates only).
    """
    wanted = {fqn: layer for fqn, layer in plan.layers.items() if layer.weight is not None}
    if not wanted:
        return module
    result = copy.deepcopy(module)
    found = set()
    for fqn, child in list(result.named_modules()):
        layer = wanted.get(user_fqn(fqn))
        if layer is None:
            continue
        parent_name, _, name = fqn.rpartition(".")
        parent = result.get_submodule(parent_name) if parent_name else result
        setattr(parent, name, quantized_module(child, layer, form, simulate_dynamic))
        found.add(layer.fqn)
    missing = sorted(set(wanted) - found)
    if missing:
        raise KeyError(f"the plan names layers the model does not have: {', '.join(missing[:5])}")
    return result.eval()
