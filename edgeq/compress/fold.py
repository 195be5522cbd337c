"""Fold eval-mode BatchNorm into the convolution before it, so the plan quantizes the weights the runtime
multiplies with. Left unfolded, the int8 codes would be of the pre-BN weight and every runtime would run
a float BatchNormalization after an integer conv: slower, and the fused conv+BN weight would not be the
one the plan's scales were chosen for.

Pairs that are adjacent children of an nn.Sequential are folded: that order is the call order. Given example
inputs, a BatchNorm left over (a module calling `self.convolution` then `self.normalization`, as Hugging Face's
MobileViT and ResNet do) is folded when the exported graph shows its input is a convolution's output that
nothing else reads, each module called once. Other layouts keep their BatchNorm (correct, just not folded; TFLite's
converter then folds it into the int8 weights itself and weight parity fails); the manifest lists what was folded.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d))


def fold_batchnorm(module: nn.Module, example_inputs: tuple | None = None) -> tuple[nn.Module, list[str]]:
    """A copy of `module` with conv -> batchnorm pairs folded; returns it and the folded conv FQNs.

    Sequential pairs always; with `example_inputs`, also pairs the exported graph proves (see the module doc)."""
    pairs = []
    for name, parent in module.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if any(isinstance(conv, c) and isinstance(bn, b) for c, b in _PAIRS) and bn.track_running_stats:
                pairs.append((_join(name, conv_name), _join(name, bn_name)))
    if example_inputs is not None:
        paired = {bn for _, bn in pairs}
        left = [n for n, m in module.named_modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats and n not in paired]
        if left:
            pairs += [pair for pair in _graph_pairs(module, example_inputs) if pair[1] in left]
    if not pairs:
        return module, []
    result = copy.deepcopy(module).eval()
    folded = []
    for conv_fqn, bn_fqn in pairs:
        conv, bn = result.get_submodule(conv_fqn), result.get_submodule(bn_fqn)
        _replace(result, conv_fqn, fuse_conv_bn_eval(conv, bn))
        _replace(result, bn_fqn, nn.Identity())
        folded.append(conv_fqn)
    return result, folded


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV_OPS = ("conv1d", "conv2d", "convolution")
_BN_OPS = ("batch_norm", "_native_batch_norm_legit_no_training")


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _replace(root: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, name = fqn.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _graph_pairs(module: nn.Module, example_inputs: tuple) -> list[tuple[str, str]]:
    """(conv FQN, batchnorm FQN) pairs where the exported graph feeds a conv's output to a batch norm and to
    nothing else, both modules called exactly once. None when the model does not export."""
    import re

    import torch

    try:
        program = torch.export.export(module, tuple(example_inputs), strict=False)
    except Exception:  # a model that does not export keeps its BatchNorm: correct, just not folded
        return []
    calls: dict[str, int] = {}
    owner = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        stack = node.meta.get("nn_module_stack") or {}
        if name in _CONV_OPS + _BN_OPS and stack:
            fqn = re.sub(r"^L\['self'\]\.?", "", str(list(stack.values())[-1][0]))
            fqn = re.sub(r"\[(\d+)\]", r".\1", re.sub(r"\._modules\['([^']+)'\]", r".\1", fqn))
            owner[node] = fqn
            calls[fqn] = calls.get(fqn, 0) + 1
    modules = dict(module.named_modules())
    pairs = []
    for node, bn_fqn in owner.items():
        name = getattr(node.target, "__name__", "").split(".")[0]
        source = node.args[0] if node.args else None
        if name not in _BN_OPS or source not in owner or len(source.users) != 1:
            continue
        conv_fqn = owner[source]
        conv, bn = modules.get(conv_fqn), modules.get(bn_fqn)
        if calls[conv_fqn] == calls[bn_fqn] == 1 and any(isinstance(conv, c) and isinstance(bn, b) for c, b in _PAIRS):
            pairs.append((conv_fqn, bn_fqn))
    return pairs
