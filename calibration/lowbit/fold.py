"""Fold per-input-channel scales (AWQ's s, SmoothQuant's) into the op that produces the input, so the runtime
needs no Mul: the consumers hold W s and the producer's output comes out already divided by s.

    LayerNorm / RMSNorm -> Linear(s):  norm.weight /= s, norm.bias /= s
    Linear -> [act] -> Linear(s):      producer.weight rows /= s, producer.bias /= s, provided act(x / s) =
                                       act(x) / s: nothing, Dropout, or ReLU / LeakyReLU with s > 0 (positively
                                       homogeneous); GELU, SiLU, tanh, ... are not, and are refused.

Exact only if the consumers given are ALL the readers of the producer's output: these functions see modules,
not the graph, so the graph rules are the caller's (`bert_scale_groups` states them for BERT). In a BERT
block (post-LayerNorm, huggingface BertLayer) that rules out every LayerNorm: each one's output is also the
residual added before the next LayerNorm (BertSelfOutput/BertOutput: LayerNorm(dense(h) + input)), and
LayerNorm normalizes across channels, so an input divided per channel by s is not compensated by anything.
What folds there:
  - attention.self.value -> attention.output.dense: the context is softmax(Q K^T) V per head, which mixes
    tokens but never channels, so V's channel c divided by s_c reaches output.dense's column c divided by s_c;
  - intermediate.dense -> output.dense only when hidden_act is ReLU-like (MiniLM's GELU is not).
Pre-LN transformers (OPT, LLaMA: the residual is taken before the norm) fold their norms into q/k/v and fc1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Activations f with f(x / s) = f(x) / s for every s > 0 (positively homogeneous, per element).
POSITIVELY_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)
# Ops that are linear per element (a Dropout in training multiplies by a mask / (1 - p)): any nonzero s passes.
LINEAR_PASSTHROUGH = (nn.Identity, nn.Dropout)
NORMS = (nn.LayerNorm, nn.RMSNorm)


@dataclass(frozen=True)
class Fold:
    """A fold that was made: `producer`'s output is divided by `scales` [K], which `consumers` absorbed."""

    producer: nn.Module
    consumers: tuple[nn.Linear, ...]
    scales: torch.Tensor
    between: nn.Module | None = None


def fold_reason(
    producer: nn.Module, consumers: list[nn.Linear] | tuple[nn.Linear, ...], scales: torch.Tensor, between: nn.Module | None = None
) -> str | None:
    """Why `scales` [K] cannot be folded from `consumers`' inputs into `producer` (through `between`, the op
    applied to the producer's output before the consumers read it), or None when it can."""
    channels = scales.numel()
    if scales.dim() != 1:
        return f"scales have shape {tuple(scales.shape)}; expected one per input channel, [K]"
    if not torch.isfinite(scales).all() or (scales == 0).any():
        return "scales must be finite and nonzero"
    if not consumers:
        return "no consumers given"
    for consumer in consumers:
        if not isinstance(consumer, nn.Linear):
            return f"consumer {type(consumer).__name__} is not an nn.Linear"
        if consumer.in_features != channels:
            return f"a consumer has {consumer.in_features} input features; the scales have {channels}"
    if isinstance(producer, NORMS):
        return _norm_reason(producer, channels, between)
    if isinstance(producer, nn.Linear):
        if producer.out_features != channels:
            return f"the producing Linear has {producer.out_features} outputs; the scales have {channels}"
        return _between_reason(between, scales)
    return f"{type(producer).__name__} cannot absorb a per-channel scale (LayerNorm, RMSNorm or Linear can)"


def _norm_reason(norm: nn.Module, channels: int, between: nn.Module | None) -> str | None:
    if between is not None and not isinstance(between, LINEAR_PASSTHROUGH):
        return f"{type(between).__name__} between the norm and its consumers; fold a norm only into its direct readers"
    if norm.weight is None:
        return f"{type(norm).__name__} without elementwise affine has no weight to absorb the scales (elementwise_affine=False)"
    if tuple(norm.normalized_shape) != (channels,):
        return f"{type(norm).__name__} normalizes over {tuple(norm.normalized_shape)}; a fold needs the last dim only, of the scales' {channels}"
    return None


def _between_reason(between: nn.Module | None, scales: torch.Tensor) -> str | None:
    if between is None or isinstance(between, LINEAR_PASSTHROUGH):
        return None
    if isinstance(between, POSITIVELY_HOMOGENEOUS):
        if (scales <= 0).any():
            return f"{type(between).__name__} commutes with a division by s only for s > 0; some scales are <= 0"
        return None
    name = type(between).__name__
    return f"{name} between the linears is not scale-equivariant ({name}(x / s) != {name}(x) / s)"


def fold_scales(
    producer: nn.Module, consumers: list[nn.Linear] | tuple[nn.Linear, ...], scales: torch.Tensor, between: nn.Module | None = None
) -> Fold:
    """Divide `producer`'s output channels by `scales` [K] and multiply the consumers' input columns by them,
    in place (pass modules of a copy to keep the original). The float model computes the same function
    afterwards, provided the consumers are all the readers of the producer's output. Raises ValueError naming
    the reason for what cannot be folded (see `fold_reason`); nothing is modified then."""
    reason = fold_reason(producer, consumers, scales, between)
    if reason is not None:
        raise ValueError(f"cannot fold scales into {type(producer).__name__}: {reason}")
    with torch.no_grad():
        s = scales.detach()
        if isinstance(producer, nn.Linear):
            producer.weight.div_(s.to(producer.weight).reshape(-1, 1))
        else:
            producer.weight.div_(s.to(producer.weight))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias))
        for consumer in consumers:
            consumer.weight.mul_(s.to(consumer.weight).reshape(1, -1))
    return Fold(producer, tuple(consumers), s.clone(), between)


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one producer's output (so they must share an input scale), with why a fold into the
    producer is not exact (None: it is). Names are FQNs as `model.named_modules()` gives them."""

    producer: str | None  # None: the layer's input comes from outside the block list (e.g. the first layer's)
    consumers: tuple[str, ...]
    between: str | None = None  # the module applied between producer and consumers, if any
    reason: str | None = None


def bert_scale_groups(model: nn.Module) -> list[ScaleGroup]:
    """Every group of linears sharing an input in the BERT-style layers of `model` (huggingface BertLayer and
    lookalikes: attention.self.query/key/value, attention.output.dense/LayerNorm, intermediate.dense with
    intermediate_act_fn, output.dense/LayerNorm), in model order, with whether their scale folds."""
    names = {module: name for name, module in model.named_modules()}
    groups: list[ScaleGroup] = []
    previous_norm: str | None = None
    for name, layer in model.named_modules():
        if not _is_bert_layer(layer):
            continue
        attention, intermediate, output = layer.attention, layer.intermediate, layer.output
        qkv = tuple(names[m] for m in (attention.self.query, attention.self.key, attention.self.value))
        attention_norm, output_norm = names[attention.output.LayerNorm], names[output.LayerNorm]
        input_producer = previous_norm or _embedding_norm(model, name, names)
        groups.append(ScaleGroup(input_producer, qkv, reason=(
            f"the layer input ({input_producer or 'from outside the block'}) is also the residual added before "
            f"{attention_norm} (post-LayerNorm block): a per-channel scale on it is not undone there"
        )))
        act = intermediate.intermediate_act_fn
        value, attention_dense = qkv[2], names[attention.output.dense]
        groups.append(ScaleGroup(value, (attention_dense,), reason=fold_reason(
            attention.self.value, [attention.output.dense], torch.ones(attention.output.dense.in_features)
        )))
        groups.append(ScaleGroup(attention_norm, (names[intermediate.dense],), reason=(
            f"{attention_norm}'s output is also the residual added before {output_norm} (post-LayerNorm block)"
        )))
        groups.append(ScaleGroup(names[intermediate.dense], (names[output.dense],), between=names.get(act, type(act).__name__),
                                 reason=fold_reason(intermediate.dense, [output.dense], torch.ones(output.dense.in_features), act)))
        previous_norm = output_norm
    return groups


def bert_fold_pairs(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(producer FQN, [consumer linear FQNs]) for every input scale that folds exactly in the BERT-style
    layers of `model`: attention.self.value -> attention.output.dense always; intermediate.dense ->
    output.dense when the activation is ReLU-like. Never a LayerNorm (see the module docstring)."""
    return [(group.producer, list(group.consumers)) for group in bert_scale_groups(model) if group.reason is None]


def _is_bert_layer(module: nn.Module) -> bool:
    try:
        parts = (
            module.attention.self.query, module.attention.self.key, module.attention.self.value,
            module.attention.output.dense, module.intermediate.dense, module.output.dense,
        )
        norms = (module.attention.output.LayerNorm, module.output.LayerNorm)
        module.intermediate.intermediate_act_fn  # noqa: B018 - part of the shape being checked
    except AttributeError:
        return False
    return all(isinstance(p, nn.Linear) for p in parts) and all(isinstance(n, nn.LayerNorm) for n in norms)


def _embedding_norm(model: nn.Module, layer_name: str, names: dict[nn.Module, str]) -> str | None:
    """The embeddings' LayerNorm feeding the first layer (huggingface: <base>.embeddings.LayerNorm beside
    <base>.encoder.layer.0), if the model has one."""
    base, found, _ = layer_name.rpartition("encoder.layer.")
    if not found:
        return None
    try:
        norm = model.get_submodule(f"{base}embeddings.LayerNorm")
    except AttributeError:
        return None
    return names.get(norm) if isinstance(norm, nn.LayerNorm) else None
