"""Attention-head pruning for Hugging Face style encoders (`--prune heads:0.33`): edgeq's own surgery.

A self-attention layer with query/key/value projections and an output projection (BERT, RoBERTa, MiniLM,
DistilBERT, ...) computes each head from its own rows of q/k/v and its own columns of the output projection.
Removing a head removes those rows and columns: the four linear layers shrink, the attributes the forward
reads (num_attention_heads / n_heads / num_heads, all_head_size) follow, and the model stays a plain module
that every exporter takes. Transformers' own `prune_heads` helpers are gone from 5.x, so edgeq does not lean on
them. nn.MultiheadAttention ties its inner width to embed_dim and is refused with the layer named.

Each attention layer loses `spec.ratio` of its heads, or its own ratio from prune_layers (edgeq/compress/
prune_layers.py: the FQN of the module holding q/k/v or of a module above it, e.g. `*.attention` = 0.5; 0 keeps
every head). Heads are ranked per layer (or across the model with scope "global") by
- l1 / l2: the norm of the head's q/k/v rows and output-projection columns;
- activation: the mean size of the head's contribution to the output projection on the calibration samples;
- taylor: |sum(context_h * dL/dcontext_h)|, the first-order change of a label-free loss (mean squared output)
  when the head is masked (Michel et al., "Are Sixteen Heads Really Better than One?", NeurIPS 2019).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from edgeq.compress.prune_check import (
    as_example_tuple,
    gradients_on,
    keep_requires_grad,
    module_names,
    output_shapes,
    output_tensors,
    parameter_count,
    sample_tensors,
    verify_pruned,
)
from edgeq.compress.prune_layers import entry, heads_ratio, left_whole, note
from edgeq.compress.stage import StageResult
from edgeq.errors import ConversionError, UsageError

PROJECTIONS = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))
OUTPUT_PROJECTIONS = ("out_lin", "o_proj", "out_proj")  # a sibling of q/k/v (DistilBERT, most decoders)
HEAD_COUNTS = ("num_attention_heads", "n_heads", "num_heads")  # the attribute the forward reads, by family


@dataclass
class Attention:
    """One self-attention layer: where its projections live and its head geometry."""

    name: str  # user FQN of the module holding q/k/v
    module: nn.Module
    projections: tuple[str, str, str]  # attribute names of q, k, v on `module`
    out_owner: nn.Module  # the module holding the output projection
    out_attr: str
    heads: int
    head_size: int

    @property
    def qkv(self) -> list[nn.Linear]:
        return [getattr(self.module, attr) for attr in self.projections]

    @property
    def out(self) -> nn.Linear:
        return getattr(self.out_owner, self.out_attr)


def prune_heads(module: nn.Module, spec, calibration, input_names, example_inputs) -> StageResult:
    """Remove `spec.ratio` of the attention heads (rounded, at least one head kept per layer) from a copy.

    Returns the pruned copy and, per attention layer, {"heads": [before, after], "removed": [...], "head_size": d}.
    Raises ConversionError naming the layer for attention edgeq cannot prune (nn.MultiheadAttention, grouped
    key/value heads, no output projection found) or when the pruned model no longer runs or exports."""
    if spec.kind != "heads":
        raise UsageError(f"prune_heads removes attention heads (kind 'heads', e.g. heads:0.33), not {spec.kind!r}")
    started = time.perf_counter()
    examples = as_example_tuple(example_inputs, input_names)
    model = copy.deepcopy(module).eval()
    expected = output_shapes(model, examples)
    names = module_names(model)
    layers = find_attention(model, names)
    if not layers:
        raise ConversionError(
            "head pruning found no self-attention layer with query/key/value and output projections "
            "(BERT, RoBERTa, DistilBERT, MiniLM style); use structured:RATIO to remove channels instead"
        )
    ratios = {a.name: heads_ratio(spec, a.name) for a in layers}
    scores = _scores(spec, model, layers, calibration, input_names, examples)
    removals = _choose(layers, scores, spec, ratios)
    parameters_before = parameter_count(model)
    result_layers = {}
    for attention in layers:
        removed = removals[attention.name]
        result_layers[attention.name] = {"heads": [attention.heads, attention.heads - len(removed)], "removed": removed,
                                         "head_size": attention.head_size, **entry(spec, *ratios[attention.name])}
        if removed:
            _remove_heads(attention, removed)
    _drop_gradients(model)
    keep_requires_grad(module, model)
    verify_pruned(model, module, examples, expected, f"head pruning of {', '.join(a.name for a in layers if removals[a.name])}")
    before = sum(a.heads for a in layers)
    after = sum(r["heads"][1] for r in result_layers.values())
    parameters_after = parameter_count(model)
    scope = "one ranking across the model" if spec.scope == "global" else "per layer"
    notes = [
        f"head pruning {spec.ratio:g} ({spec.importance} importance, {scope}): {before} -> {after} heads in "
        f"{len(layers)} attention layers; parameters {parameters_before:,} -> {parameters_after:,}",
        "verified: the pruned module exports with torch.export, its output shapes are unchanged and its outputs finite",
        *note(spec),
    ]
    skipped = {name: left_whole(spec, pattern) for name, (ratio, pattern) in ratios.items() if pattern is not None and ratio == 0}
    return StageResult(module=model.eval(), stage="prune", spec=spec.text or f"heads:{spec.ratio:g}", layers=result_layers,
                       notes=notes, skipped=skipped, seconds=time.perf_counter() - started)


def find_attention(model: nn.Module, names: dict[nn.Module, str]) -> list[Attention]:
    """Every self-attention layer of `model` edgeq can prune, in model order; refuses the ones it cannot."""
    parents = {child: parent for parent in model.modules() for child in parent.children()}
    found = []
    for layer, name in names.items():
        if isinstance(layer, nn.MultiheadAttention):
            raise ConversionError(
                f"head pruning refused at layer '{name}': nn.MultiheadAttention ties its inner width to embed_dim, so "
                "its heads cannot be removed in place; prune its projections' weights instead (--prune unstructured:0.5)"
            )
        trio = next((t for t in PROJECTIONS if all(isinstance(getattr(layer, a, None), nn.Linear) for a in t)), None)
        if trio is None:
            continue
        q, k, v = (getattr(layer, a) for a in trio)
        count_attr = next((a for a in HEAD_COUNTS if isinstance(getattr(layer, a, None), int)), None)
        if count_attr is None:
            raise ConversionError(f"head pruning refused at layer '{name}': it has no {' / '.join(HEAD_COUNTS)} attribute saying how many heads it has")
        heads = getattr(layer, count_attr)
        if heads < 2:
            continue
        head_size = q.out_features // heads
        if not (q.out_features == k.out_features == v.out_features == heads * head_size):
            raise ConversionError(
                f"head pruning refused at layer '{name}': its query/key/value widths ({q.out_features}, {k.out_features}, "
                f"{v.out_features}) are not {heads} heads of one size (grouped key/value heads are not pruned)"
            )
        owner, attr = _output_projection(layer, parents)
        if owner is None or getattr(owner, attr).in_features != q.out_features:
            raise ConversionError(f"head pruning refused at layer '{name}': no output projection reading its {q.out_features} head features was found")
        found.append(Attention(name, layer, trio, owner, attr, heads, head_size))
    return found


def _output_projection(layer: nn.Module, parents) -> tuple[nn.Module | None, str]:
    for attr in OUTPUT_PROJECTIONS:
        if isinstance(getattr(layer, attr, None), nn.Linear):
            return layer, attr
    parent = parents.get(layer)  # BERT/RoBERTa: BertAttention.self is the layer, BertAttention.output.dense projects
    output = getattr(parent, "output", None) if parent is not None else None
    if output is not None and isinstance(getattr(output, "dense", None), nn.Linear):
        return output, "dense"
    return None, ""


def _scores(spec, model, layers: list[Attention], calibration, input_names, examples) -> dict[str, torch.Tensor]:
    """Per attention layer, one importance per head (higher: keep)."""
    if spec.importance in ("l1", "l2"):
        p = 1 if spec.importance == "l1" else 2
        return {a.name: _weight_norms(a, p) for a in layers}
    if spec.importance not in ("activation", "taylor"):
        raise UsageError(f"head pruning ranks heads by l1, l2, activation or taylor, not {spec.importance!r}")
    samples = sample_tensors(calibration, input_names, examples)
    totals = {a.name: torch.zeros(a.heads) for a in layers}
    contexts: dict[str, torch.Tensor] = {}

    def keep_context(name):
        def hook(_layer, inputs):
            context = inputs[0]
            if spec.importance == "taylor":
                context.retain_grad()
            contexts[name] = context
        return hook

    hooks = [a.out.register_forward_pre_hook(keep_context(a.name)) for a in layers]
    try:
        for sample in samples:
            if spec.importance == "activation":
                with torch.no_grad():
                    model(*sample)
                for a in layers:
                    totals[a.name] += _contribution(a, contexts[a.name])
            else:
                model.zero_grad(set_to_none=True)
                with gradients_on(model):
                    outputs = [t for t in output_tensors(model(*sample)) if t.is_floating_point()]
                    sum(t.float().pow(2).mean() for t in outputs).backward()
                for a in layers:
                    context = contexts[a.name]
                    per_head = (context * context.grad).reshape(-1, a.heads, a.head_size).sum((0, 2))
                    totals[a.name] += per_head.abs().detach()
    finally:
        for hook in hooks:
            hook.remove()
        contexts.clear()
    return totals


def _weight_norms(attention: Attention, p: int) -> torch.Tensor:
    d, heads = attention.head_size, attention.heads
    with torch.no_grad():
        rows = sum(layer.weight.abs().pow(p).reshape(heads, d, -1).sum((1, 2)) for layer in attention.qkv)
        columns = attention.out.weight.abs().pow(p).reshape(-1, heads, d).sum((0, 2))
    return rows + columns


def _contribution(attention: Attention, context: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of |context_h @ W_out[:, h]^T|, per head: how much each head moves the layer's output."""
    d, heads = attention.head_size, attention.heads
    with torch.no_grad():
        x = context.reshape(-1, heads, d).float()
        w = attention.out.weight.float().reshape(-1, heads, d)
        return torch.einsum("nhd,ohd->nho", x, w).norm(dim=-1).mean(0)


def _choose(layers: list[Attention], scores: dict[str, torch.Tensor], spec, ratios: dict[str, tuple[float, str | None]]) -> dict[str, list[int]]:
    """Heads to remove per layer: round(ratio * heads) of the least important (at least one head stays), the
    ratio the layer's own (prune_layers) or the spec's; or with scope "global" the least important across the
    model (scores normalized by their layer's mean), the layers prune_layers names pinned at their own ratio."""
    def own(a: Attention) -> list[int]:
        return sorted(int(h) for h in torch.argsort(scores[a.name])[: min(round(ratios[a.name][0] * a.heads), a.heads - 1)])

    if spec.scope != "global":
        return {a.name: own(a) for a in layers}
    pinned = {a.name: own(a) for a in layers if ratios[a.name][1] is not None}
    layers = [a for a in layers if a.name not in pinned]
    ranked = sorted((float(scores[a.name][h] / scores[a.name].mean().clamp_min(1e-12)), a.name, h)
                    for a in layers for h in range(a.heads))
    budget = round(spec.ratio * sum(a.heads for a in layers))
    left = {a.name: a.heads for a in layers}
    removed: dict[str, list[int]] = {a.name: [] for a in layers}
    for _, name, head in ranked:
        if budget == 0:
            break
        if left[name] > 1:
            removed[name].append(head)
            left[name] -= 1
            budget -= 1
    return {name: sorted(heads) for name, heads in removed.items()} | pinned


def _remove_heads(attention: Attention, removed: list[int]) -> None:
    """Slice the removed heads out of q/k/v (rows) and the output projection (columns); update the attributes."""
    d = attention.head_size
    kept_heads = [h for h in range(attention.heads) if h not in set(removed)]
    keep = torch.tensor([h * d + i for h in kept_heads for i in range(d)])
    for attr, layer in zip(attention.projections, attention.qkv):
        setattr(attention.module, attr, _sliced(layer, keep, dim=0))
    setattr(attention.out_owner, attention.out_attr, _sliced(attention.out, keep, dim=1))
    for attr in HEAD_COUNTS:
        if isinstance(getattr(attention.module, attr, None), int):
            setattr(attention.module, attr, len(kept_heads))
    if isinstance(getattr(attention.module, "all_head_size", None), int):
        attention.module.all_head_size = len(kept_heads) * d


def _sliced(layer: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new linear layer holding `keep` of `layer`'s output rows (dim 0) or input columns (dim 1)."""
    weight = layer.weight.detach().index_select(dim, keep).clone()
    bias = layer.bias.detach().clone() if layer.bias is not None else None
    if bias is not None and dim == 0:
        bias = bias.index_select(0, keep)
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.train(layer.training)


def _drop_gradients(model: nn.Module) -> None:
    model.zero_grad(set_to_none=True)
