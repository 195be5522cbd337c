"""Fold eval-mode BatchNorm into the convolution before it, so the plan quantizes the weights the runtime
multiplies with. Left unfolded, the int8 codes would be of the pre-BN weight and every runtime would run
a float BatchNormalization after an integer conv: slower, and the fused conv+BN weight would not be the
one the plan's scales were chosen for.

Only pairs that are adjacent children of an nn.Sequential are folded: that order is the call order. Other
layouts keep their BatchNorm (correct, just not folded); the manifest lists what was folded.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_PAIRS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d))


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of `module` with Sequential conv -> batchnorm pairs folded; returns it and the folded conv FQNs."""
    pairs = []
    for name, parent in module.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if any(isinstance(conv, c) and isinstance(bn, b) for c, b in _PAIRS) and bn.track_running_stats:
                pairs.append((name, conv_name, bn_name))
    if not pairs:
        return module, []
    result = copy.deepcopy(module).eval()
    folded = []
    for parent_name, conv_name, bn_name in pairs:
        parent = result.get_submodule(parent_name) if parent_name else result
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, nn.Identity())
        folded.append(f"{parent_name}.{conv_name}" if parent_name else conv_name)
    return result, folded
