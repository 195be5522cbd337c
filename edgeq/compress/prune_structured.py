"""Structured channel/filter pruning that physically shrinks the model (`--prune structured:0.5`).

Removing output channel i of a conv also removes input channel i of every layer that reads it, and of every
layer tied to it through residual adds, concatenations, BatchNorm/LayerNorm and depthwise convolutions. These
coupled channels form a dependency group (DepGraph, Fang et al., CVPR 2023); Torch-Pruning (the optional
[prune] extra, pinned) traces the groups and edits the weights. edgeq decides which groups may be touched and
which channels go, and checks the result:

- the model's outputs keep their width (a group that reaches an output is left whole), the inputs' channels
  are never pruned (only channels a layer produces are), and attention projections are left to
  `heads:RATIO` (their width is tied to the head count that the forward reads);
- each group loses `spec.ratio` of its channels, or with prune_layers (edgeq/compress/prune_layers.py) the
  smallest ratio given to any of the layers whose output channels it removes (root first): coupled channels go
  together, so no named layer loses more than asked, and 0 keeps the group whole. Scope "global" ranks the
  unnamed groups together (spec.ratio of their channels) and pins the named ones at their own ratio;
- channels are ranked by importance within each group (L1/L2 of the group's weights, mean |activation| on the
  calibration samples, or a first-order Taylor score |w * dL/dw| of a label-free loss), and counts stay multiples
  of 8 where a layer has 16 or more (the tile width of the CPU conv/GEMM kernels);
- after every group the forward must still give the same output shapes and finite values, and at the end the
  module must still export with torch.export. A group whose edit breaks this (its channels feed a view with
  literal sizes, a custom op or code outside autograd that Torch-Pruning cannot follow) is refused with a
  ConversionError naming the layer: nothing is exported broken.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from edgeq.compress.prune_check import (
    as_example_tuple,
    export_problem,
    forward_problem,
    gradients_on,
    keep_requires_grad,
    module_names,
    output_shapes,
    output_tensors,
    parameter_count,
)
from edgeq.compress.prune_importance import channel_scorer
from edgeq.compress.prune_layers import entry, group_ratio, left_whole, note
from edgeq.compress.stage import StageResult
from edgeq.errors import ConversionError, UsageError

ROUND_TO = 8  # channel counts stay multiples of 8: the width XNNPACK / MLAS conv and GEMM kernels tile by
ROUND_FROM = 16  # ... in layers of at least 16 channels (a smaller layer keeps its exact share)
MIN_KEPT_SHARE = 0.1  # global ranking: a layer keeps at least a tenth of its channels
ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Self-attention projections by the names Hugging Face and PyTorch models give them: heads:RATIO prunes these.
ATTENTION_PROJECTIONS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))
REFUSAL_HINT = (
    "Its channels reach an operation Torch-Pruning cannot follow (a view/reshape with literal sizes, a custom op, "
    "or code outside autograd), so removing them would change what the model computes. Write the reshape with -1 "
    "or x.shape[...], or prune weights instead (--prune unstructured:0.5)"
)

EDIT_HINT = (
    "The group's layers cannot shrink consistently (e.g. a grouped conv reading a concatenation); "
    "prune weights instead (--prune unstructured:0.5)"
)


@dataclass
class _Choice:
    """One dependency group to shrink: its root layer, the pruning function and the channels to remove."""

    root: nn.Module
    handler: object
    name: str
    idxs: list[int]
    channels: int
    ratio: float = 0.0  # the group's asked ratio (prune_layers or the spec's)
    pattern: str | None = None  # the prune_layers pattern that set it


def prune_structured(module: nn.Module, spec, calibration, input_names, example_inputs) -> StageResult:
    """Remove `spec.ratio` of each prunable dependency group's channels from a copy of `module`.

    `spec`: a PruneSpec with kind "channels" (importance l1 | l2 | activation | taylor; scope "layer", or
    "global" for one ranking across the model). `calibration`: samples (input name -> array) for the activation
    and Taylor scores (the example inputs stand in when there are none). Returns the pruned copy, per layer
    {"out_channels": [before, after]} / {"in_features": [before, after]}, ...; raises ConversionError naming the
    layer when a group cannot be pruned safely.
    """
    if spec.kind != "channels":
        raise UsageError(f"prune_structured removes channels (kind 'channels', e.g. structured:0.5), not {spec.kind!r}")
    tp = _torch_pruning()
    started = time.perf_counter()
    examples = as_example_tuple(example_inputs, input_names)
    model = copy.deepcopy(module).eval()
    expected = output_shapes(model, examples)
    names = module_names(model)
    skipped: dict[str, str] = {}
    protected = _output_layers(model, examples, names) | _attention_layers(model, names)
    try:
        with gradients_on(model):
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=examples)
    except Exception as exc:
        raise ConversionError(
            f"structured pruning: Torch-Pruning cannot trace the model ({type(exc).__name__}: {exc}); "
            "prune weights instead (--prune unstructured:0.5)"
        ) from exc
    groups = _prunable_groups(tp, graph, names, protected, skipped)
    score = channel_scorer(tp, graph, spec, model, calibration, input_names, examples)
    choices = _choose(graph, groups, score, spec, names, skipped)
    before = _widths(model, names)
    parameters_before = parameter_count(model)
    pruned = []
    for choice in choices:
        group = graph.get_pruning_group(choice.root, choice.handler, choice.idxs)
        if not graph.check_pruning_group(group):
            skipped[choice.name] = "Torch-Pruning's check refused the group (it would empty a layer)"
            continue
        try:
            group.prune()
        except Exception as exc:  # Torch-Pruning could not edit a layer of the group (e.g. a grouped conv behind a concat)
            problem = f"Torch-Pruning cannot edit the group ({type(exc).__name__}: {exc})"
            raise ConversionError(_refusal(choice, group, problem, names, EDIT_HINT)) from exc
        pruned.append(choice)
        problem = forward_problem(model, examples, expected)
        if problem is not None:
            raise ConversionError(_refusal(choice, group, problem, names))
    _check_export(tp, module, model, pruned, examples, expected)
    _drop_gradients(model)
    keep_requires_grad(module, model)
    layers = _changes(before, _widths(model, names))
    for choice in pruned:  # with prune_layers, each group root's ratio and the pattern that set it
        layers.setdefault(choice.name, {}).update(entry(spec, choice.ratio, choice.pattern))
    parameters_after = parameter_count(model)
    scope = "one ranking across the model" if spec.scope == "global" else "per layer"
    notes = [
        f"structured channel pruning {spec.ratio:g} ({spec.importance} importance, {scope}): parameters "
        f"{parameters_before:,} -> {parameters_after:,} ({parameters_after / max(parameters_before, 1):.1%} kept)",
        f"{len(pruned)} dependency groups shrunk (Torch-Pruning {_version()}); channel counts "
        f"are multiples of {ROUND_TO} in layers of >= {ROUND_FROM} channels",
        "verified: the pruned module exports with torch.export, its output shapes are unchanged and its outputs finite",
        *note(spec),
    ]
    return StageResult(module=model.eval(), stage="prune", spec=spec.text or f"structured:{spec.ratio:g}", layers=layers,
                       notes=notes, skipped=skipped, seconds=time.perf_counter() - started)


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as exc:
        raise UsageError(
            "structured pruning needs Torch-Pruning, the optional [prune] extra: pip install 'edgeq[prune]'"
        ) from exc
    return torch_pruning


def _output_layers(model: nn.Module, examples, names) -> dict[nn.Module, str]:
    """Layers whose output tensor is a model output: their width is the model's interface."""
    produced: dict[int, tuple[torch.Tensor, nn.Module]] = {}  # the tensor is held so that its id is not reused

    def record(layer, _inputs, output):
        for tensor in output_tensors(output):
            produced.setdefault(id(tensor), (tensor, layer))  # the first producer: a Dropout/Identity after it passes it on

    hooks = [child.register_forward_hook(record) for child in model.modules() if not list(child.children())]
    try:
        with torch.no_grad():
            outputs = output_tensors(model(*examples))
    finally:
        for hook in hooks:
            hook.remove()
    layers = {produced[id(t)][1] for t in outputs if id(t) in produced}
    produced.clear()
    return {layer: f"'{names[layer]}' produces a model output: its width is part of the model's interface" for layer in layers}


def _attention_layers(model: nn.Module, names) -> dict[nn.Module, str]:
    """Self-attention projections (q/k/v and nn.MultiheadAttention): their width is tied to the head count."""
    found: dict[nn.Module, str] = {}
    for parent in model.modules():
        if isinstance(parent, nn.MultiheadAttention):
            found[parent] = f"'{names[parent]}' is multi-head attention: use heads:RATIO to remove whole heads"
        for trio in ATTENTION_PROJECTIONS:
            layers = [getattr(parent, attr, None) for attr in trio]
            if all(isinstance(layer, nn.Linear) for layer in layers):
                for layer in layers:
                    found[layer] = f"'{names[layer]}' projects attention heads: use heads:RATIO to remove whole heads"
    return found


def _prunable_groups(tp, graph, names, protected: dict[nn.Module, str], skipped: dict[str, str]) -> list:
    """Every dependency group rooted at a conv or linear layer that may shrink; the others go to `skipped`."""
    groups = []
    for group in graph.get_all_groups(root_module_types=ROOT_TYPES):
        root = group[0].dep.target.module
        reason = None
        for dep, _ in group:
            target = dep.target.module
            if isinstance(target, tp.ops._OutputOp):
                reason = "its channels reach a model output, whose width is part of the model's interface"
            elif target in protected and graph.is_out_channel_pruning_fn(dep.handler):
                reason = protected[target]
            if reason:
                break
        if reason:
            skipped[names.get(root, str(root))] = reason
        else:
            groups.append(group)
    return groups


def _channel_groups(graph, group) -> int:
    """How many equal blocks the group's channels form (grouped convs, GroupNorm); 1 for plain layers.
    Depthwise convs shrink with their input and count as plain, as in Torch-Pruning's own pruner."""
    counts = [1]
    for dep, _ in group:
        layer = dep.target.module
        if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == layer.out_channels:
            continue
        pruner = graph.get_pruner_of_module(layer)
        if pruner is None:
            continue
        if graph.is_out_channel_pruning_fn(dep.handler) and hasattr(pruner, "get_out_channel_groups"):
            counts.append(pruner.get_out_channel_groups(layer) or 1)
        elif graph.is_in_channel_pruning_fn(dep.handler) and hasattr(pruner, "get_in_channel_groups"):
            counts.append(pruner.get_in_channel_groups(layer) or 1)
    return max(counts)


def kept_channels(channels: int, ratio: float) -> int:
    """Channels a layer of `channels` keeps when `ratio` of them go: a multiple of ROUND_TO from ROUND_FROM up."""
    keep = channels * (1.0 - ratio)
    if channels >= ROUND_FROM:
        keep = max(ROUND_TO, ROUND_TO * round(keep / ROUND_TO))
    return int(min(channels, max(1, round(keep))))


def _choose(graph, groups, score, spec, names, skipped) -> list[_Choice]:
    """The channels each group loses: the least important, per group (scope layer) or below one threshold
    across the model (scope global), rounded as kept_channels says; the same positions in every block of a
    grouped conv. A group named by prune_layers takes its own ratio (prune_layers.group_ratio; with scope
    global it is pinned there, outside the ranking); 0 leaves it whole."""
    ranked = []
    for group in groups:
        root, handler = group[0].dep.target.module, group[0].dep.handler
        name = names.get(root, str(root))
        ratio, pattern = group_ratio(spec, _producers(graph, group, names))
        if pattern is not None and ratio == 0:
            skipped[name] = left_whole(spec, pattern)
            continue
        importance = score(group)
        if importance is None:
            skipped[name] = "no weight in the group to rank its channels by"
            continue
        blocks = _channel_groups(graph, group)
        if len(importance) % blocks:
            skipped[name] = f"{len(importance)} channels do not split into its {blocks} channel groups"
            continue
        per_block = importance.float().view(blocks, -1).mean(0)
        ranked.append((root, handler, name, blocks, per_block, ratio, pattern))
    together = [imp for *_, imp, _, pattern in ranked if pattern is None]
    if spec.scope == "global" and together:
        everything = torch.cat(together)
        removed = int(len(everything) * spec.ratio)
        threshold = torch.kthvalue(everything, removed).values if removed else -math.inf
    choices = []
    for root, handler, name, blocks, imp, ratio, pattern in ranked:
        width = len(imp)
        if spec.scope == "global" and pattern is None:
            share = float((imp <= threshold).sum()) / width
            keep = max(kept_channels(width, min(share, 1.0 - MIN_KEPT_SHARE)), math.ceil(width * MIN_KEPT_SHARE))
        else:
            keep = kept_channels(width, ratio)
        if keep >= width:
            continue
        drop = torch.argsort(imp)[: width - keep]
        idxs = sorted(int(i) + block * width for block in range(blocks) for i in drop)
        choices.append(_Choice(root, handler, name, idxs, width * blocks, ratio, pattern))
    return choices


def _producers(graph, group, names) -> list[str]:
    """The conv and linear layers whose output channels the group removes, its root first."""
    found = []
    for dep, _ in group:
        layer = dep.target.module
        if isinstance(layer, ROOT_TYPES) and graph.is_out_channel_pruning_fn(dep.handler) and layer in names:
            if names[layer] not in found:
                found.append(names[layer])
    return found


def _drop_gradients(model: nn.Module) -> None:
    model.zero_grad(set_to_none=True)


def _widths(model: nn.Module, names) -> dict[str, dict[str, int]]:
    widths = {}
    for layer, name in names.items():
        if isinstance(layer, nn.Linear):
            widths[name] = {"in_features": layer.in_features, "out_features": layer.out_features}
        elif isinstance(layer, nn.modules.conv._ConvNd):
            widths[name] = {"in_channels": layer.in_channels, "out_channels": layer.out_channels}
    return widths


def _changes(before, after) -> dict[str, dict]:
    layers = {}
    for name, old in before.items():
        changed = {key: [old[key], after[name][key]] for key in old if after[name][key] != old[key]}
        if changed:
            layers[name] = changed
    return layers


def _refusal(choice: _Choice, group, problem: str, names, hint: str = REFUSAL_HINT) -> str:
    kept = choice.channels - len(choice.idxs)
    others = sorted({names.get(dep.target.module) for dep, _ in group if names.get(dep.target.module) not in (None, choice.name)})
    coupled = f" (with {', '.join(others[:6])}{', ...' if len(others) > 6 else ''})" if others else ""
    return (
        f"structured pruning refused at layer '{choice.name}'{coupled}: removing {len(choice.idxs)} of its "
        f"{choice.channels} output channels ({choice.channels} -> {kept}) breaks the model: {problem}. {hint}. "
        "Nothing was exported"
    )


def _check_export(tp, original, model, pruned: list[_Choice], examples, expected) -> None:
    """torch.export the pruned module; when it fails (and the original exports), replay the groups one by one on
    a fresh copy to name the first layer whose edit breaks the export."""
    problem = export_problem(model, examples)
    if problem is None or export_problem(original, examples) is not None:
        return  # exports, or the original does not export either: the pipeline's own export names that
    replay = copy.deepcopy(original).eval()
    names = {name: layer for layer, name in module_names(replay).items()}
    with gradients_on(replay):
        graph = tp.DependencyGraph().build_dependency(replay, example_inputs=examples)
    for choice in pruned:
        group = graph.get_pruning_group(names[choice.name], choice.handler, choice.idxs)
        group.prune()
        step_problem = forward_problem(replay, examples, expected) or export_problem(replay, examples)
        if step_problem is not None:
            raise ConversionError(_refusal(choice, group, step_problem, module_names(replay)))
    raise ConversionError(f"structured pruning: the pruned model no longer exports ({problem}); nothing was exported")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:
        return "?"
