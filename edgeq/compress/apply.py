"""Swap a model's layers for their quantized forms, by torch FQN, on a copy (the FP32 model stays the reference)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

from torch import nn

from edgeq.compress.qdq import ActivationQuant, OutputQuant, WeightForm, quantized_module
from edgeq.load.wrap import FlatModel
from edgeq.plan import INPUT_PREFIX, QuantPlan

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
    The plan's tensor points quantize the outputs of the leaf modules they name and, at the FlatModel
    boundary, the model inputs.
    """
    wanted = {fqn: layer for fqn, layer in plan.layers.items() if layer.weight is not None}
    outputs = {key: quant for key, quant in plan.tensors.items() if not key.startswith(INPUT_PREFIX)}
    inputs = {key.removeprefix(INPUT_PREFIX): quant for key, quant in plan.tensors.items() if key.startswith(INPUT_PREFIX)}
    if not wanted and not plan.tensors:
        return module
    result = copy.deepcopy(module)
    found = set()
    for fqn, child in list(result.named_modules()):
        name = user_fqn(fqn)
        if name not in wanted and name not in outputs:
            continue
        parent_name, _, attribute = fqn.rpartition(".")
        parent = result.get_submodule(parent_name) if parent_name else result
        if name in wanted:
            setattr(parent, attribute, quantized_module(child, wanted[name], form, simulate_dynamic))
        else:
            setattr(parent, attribute, OutputQuant(child, outputs[name]))
        found.add(name)
    missing = sorted((set(wanted) | set(outputs)) - found)
    if missing:
        raise KeyError(f"the plan names layers the model does not have: {', '.join(missing[:5])}")
    if inputs:
        unknown = sorted(set(inputs) - set(plan.inputs))
        if unknown or not isinstance(result, FlatModel):
            raise KeyError(f"the plan quantizes input(s) {', '.join(unknown or sorted(inputs))} it cannot place on this model")
        result.input_quant = nn.ModuleList(ActivationQuant(inputs[n]) if n in inputs else nn.Identity() for n in plan.inputs)
    return result.eval()
