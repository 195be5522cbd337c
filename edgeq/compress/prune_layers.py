"""Per-layer pruning ratios (`--prune-layers PATTERN=RATIO`, the `prune_layers` table in edgeq.toml) as every
pruning kind reads them, and the check that each pattern names a real layer (exit 2, as soon as the model is
loaded, before any data or conversion work).

    [defaults]
    prune = "structured:0.5"
    [defaults.prune_layers]            # or [models.prune_layers] after a [[models]] entry
    "*" = 0.3                          # general patterns first ...
    "features.0" = 0.25                # ... exceptions after: the LAST matching entry wins (as per_layer)
    "re:classifier\\..*" = 0           # 0 leaves the layer whole (dense)

What a pattern names, per kind (edgeq/compress/spec.py layer_ratio does the matching):
- structured (channels): a conv or linear layer; its ratio is the share of its *output* channels removed
  (consumers' inputs follow their producers). Coupled layers lose the same channels, so a dependency group takes
  the smallest ratio given to any of its layers whose outputs it prunes (root first), and the spec's ratio when
  none is named: a layer never loses more than asked, and 0 on any of them keeps the whole group.
- heads: an attention module, by the FQN of the module holding q/k/v or of any module above it, the nearest
  decides (BERT: `*.attention.self` or `*.attention`; DistilBERT: `*.attention`).
- unstructured: a linear or conv layer's share of zeroed weights. N:M: the pattern is the spec's, so a layer
  can only be left dense (0); other values are refused when the spec is read.
- `:global` scope: the named layers are pinned at their ratio (outside the one ranking), and the spec's ratio is
  the share the ranking removes from the others.
Layers a kind leaves alone anyway (the output layer, embeddings, attention projections under structured) stay
so, whatever their ratio; the stage's `skipped` says why.
"""

from __future__ import annotations

import difflib

from torch import nn

from edgeq.compress.apply import user_fqn
from edgeq.compress.spec import layer_ratio
from edgeq.errors import UsageError

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_prune_layers(module: nn.Module, spec) -> None:
    """Every prune_layers pattern of `spec` (a PruneSpec) names at least one layer that spec's kind prunes by
    name, or a UsageError names the pattern, where it was written and a few real layer names."""
    if spec is None or not spec.layers:
        return
    from edgeq.layer_overrides import pattern_matches

    names = layer_names(module, spec.kind)
    for pattern, _ in spec.layers:
        if any(pattern_matches(pattern, name) for name in names):
            continue
        what = "attention modules" if spec.kind == "heads" else "linear or conv layers"
        close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=5, cutoff=0.5) or names[:5]
        raise UsageError(
            f"{spec.layers_origin} {pattern!r}: names none of the model's {what} ({len(names)}); they are e.g. "
            f"{', '.join(close) or 'none'} (patterns: an FQN, a glob such as '*.attention', or 're:REGEX')"
        )


def layer_names(module: nn.Module, kind: str) -> list[str]:
    """The user FQNs a prune_layers pattern may name for `kind`, in model order."""
    if kind != "heads":
        return [user_fqn(name) for name, child in module.named_modules() if isinstance(child, LAYER_TYPES)]
    holders = attention_holders(module)
    names = list(holders)  # the attention modules first (what the error message lists), then the modules above
    for name in holders:
        names += [scope for scope in _with_ancestors(name)[1:] if scope not in names]
    return names


def attention_holders(module: nn.Module) -> list[str]:
    """User FQNs of the modules holding a q/k/v trio of linear layers (what prune_heads prunes)."""
    from edgeq.compress.prune_heads import PROJECTIONS

    return [user_fqn(name) for name, child in module.named_modules()
            if any(all(isinstance(getattr(child, a, None), nn.Linear) for a in trio) for trio in PROJECTIONS)]


def heads_ratio(spec, name: str) -> tuple[float, str | None]:
    """An attention module's (ratio, pattern): its own FQN first, then the modules above it, nearest first."""
    return layer_ratio(spec, *_with_ancestors(name))


def group_ratio(spec, producers: list[str]) -> tuple[float, str | None]:
    """A dependency group's (ratio, pattern): the smallest ratio prune_layers gives any of the layers whose
    output channels it prunes (`producers`, root first; the first of equals decides), else the spec's."""
    named = [layer_ratio(spec, name) for name in producers]
    named = [(ratio, pattern) for ratio, pattern in named if pattern is not None]
    return min(named, key=lambda entry: entry[0]) if named else (spec.ratio, None)


def entry(spec, ratio: float, pattern: str | None) -> dict:
    """What a pruned layer's StageResult entry adds when prune_layers is given: its ratio, and the pattern that
    set it. Without prune_layers every layer has the spec's ratio, and entries stay as they were."""
    if not getattr(spec, "layers", ()):
        return {}
    return {"ratio": round(float(ratio), 6)} | ({"override": pattern} if pattern is not None else {})


def left_whole(spec, pattern: str) -> str:
    """The `skipped` reason of a layer prune_layers sets to 0."""
    return f"{spec.layers_origin} {pattern!r} = 0: left whole"


def note(spec) -> list[str]:
    """One line for the stage's notes (plan.json, report): the per-layer ratios as given, or none."""
    if not getattr(spec, "layers", ()):
        return []
    table = ", ".join(f"{pattern!r} = {ratio:g}" for pattern, ratio in spec.layers)
    pinned = "; with :global these layers are pinned, the rest ranked together" if spec.scope == "global" else ""
    return [f"per-layer ratios ({spec.layers_origin}, the last matching entry wins; others {spec.ratio:g}{pinned}): {table}"]


def _with_ancestors(name: str) -> list[str]:
    """'a.b.c' -> ['a.b.c', 'a.b', 'a']."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1) if parts[:i] != [""]]
