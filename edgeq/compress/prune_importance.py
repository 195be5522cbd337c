"""How structured pruning ranks a dependency group's channels (edgeq/compress/prune_structured.py): L1/L2 of
the group's weights (Torch-Pruning's GroupMagnitudeImportance), mean |activation| the group's consumers read on the
calibration samples, or a first-order Taylor score |w * dL/dw| of a label-free loss."""

from __future__ import annotations

import torch
from torch import nn

from edgeq.compress.prune_check import gradients_on, output_tensors, sample_tensors
from edgeq.compress.prune_layers import LAYER_TYPES
from edgeq.errors import UsageError


def channel_scorer(tp, graph, spec, model, calibration, input_names, examples):
    """group -> importance per channel of the group's root (higher: keep), or None when nothing ranks it."""
    if spec.importance in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=1 if spec.importance == "l1" else 2)
    samples = sample_tensors(calibration, input_names, examples)
    if spec.importance == "taylor":
        _label_free_gradients(model, samples)
        return tp.importance.GroupTaylorImportance()
    if spec.importance == "activation":
        return _activation_importance(graph, _mean_abs_inputs(model, samples))
    raise UsageError(f"structured pruning ranks channels by l1, l2, activation or taylor, not {spec.importance!r}")


def _label_free_gradients(model: nn.Module, samples) -> None:
    """Accumulate dL/dw for L = mean squared output over the samples: a first-order Taylor score |w * dL/dw|
    then says how much each channel moves the outputs, with no labels (Molchanov et al., CVPR 2019)."""
    model.zero_grad(set_to_none=True)
    with gradients_on(model):
        for sample in samples:
            outputs = [t for t in output_tensors(model(*sample)) if t.is_floating_point()]
            loss = sum(t.float().pow(2).mean() for t in outputs) / len(samples)
            loss.backward()


def _mean_abs_inputs(model: nn.Module, samples) -> dict[nn.Module, torch.Tensor]:
    """Mean |input| per input channel of every conv and linear layer over the samples."""
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def record(layer, inputs, _output):
        x = inputs[0].detach().float().abs()
        per_channel = x.reshape(-1, x.shape[-1]).mean(0) if isinstance(layer, nn.Linear) else x.transpose(0, 1).reshape(x.shape[1], -1).mean(1)
        sums[layer] = sums.get(layer, 0) + per_channel
        counts[layer] = counts.get(layer, 0) + 1

    hooks = [layer.register_forward_hook(record) for layer in model.modules() if isinstance(layer, LAYER_TYPES)]
    try:
        with torch.no_grad():
            for sample in samples:
                model(*sample)
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: total / counts[layer] for layer, total in sums.items()}


def _activation_importance(graph, mean_abs: dict[nn.Module, torch.Tensor]):
    """A channel's importance: the mean |activation| its consumers read, averaged over the group's consumers."""

    def score(group):
        total, seen = None, 0
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if layer not in mean_abs or not graph.is_in_channel_pruning_fn(dep.handler):
                continue
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            local = mean_abs[layer][list(idxs)]
            total = torch.zeros(max(root_idxs) + 1) if total is None else total
            if len(total) <= max(root_idxs):
                total = torch.cat([total, torch.zeros(max(root_idxs) + 1 - len(total))])
            total.index_add_(0, torch.tensor(root_idxs), local)
            seen += 1
        if total is None:
            return None
        total = total / seen
        return total / total.mean().clamp_min(1e-12)

    return score
