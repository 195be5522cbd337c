"""Outlier input channels in float beside a 4-bit kernel that quantizes its input rows to int8 (LiteRT).

LiteRT runs a 4-bit FULLY_CONNECTED only as XNNPACK's qd8-f32-qb4w: each input row is quantized to int8 at run
time with one scale for the whole row. A decoder's linear inputs hold a few channels far larger than the rest
(SmolLM2-135M, calibration prompts: the last block's down_proj input peaks at 507 with a median channel peak of
4.3), so one row scale leaves the other channels a few levels each. Simulated in PyTorch on 24 STS-B dev
sentences, SmolLM2's linears on their source grid agree with FP32 on 0.890 of next tokens with int8 rows; with
the 16 largest input channels of every linear computed in float beside the kernel, 0.983 (k = 4: 0.959, 8: 0.971).

The split is exact in float, so the plan's codes stay those of the original weight:

    y = W x = W (x * keep) + W[:, idx] (P x)      keep: 1, but 0 on the channels idx;  P: one-hot rows picking idx

`OutlierSplitLinear` holds the layer that gets the low-bit codes unchanged and a float side path: `.side_in`
(one-hot rows P, exact) and `.side_out` (the columns idx of the weight). A SourceGridLinear (edgeq/llm/
source_grid.py) already has a float side path, its offsets C over group sums s(x); its wrapper feeds both through
one linear, side_out = [C | W_sym[:, idx]] over [s(x), P x], so the split costs a MUL, the pick and a
CONCATENATION per input over what the offsets cost already (the q/k/v and gate/up inputs are shared by LiteRT's
converter). SmolLM2-135M decode, one thread, interleaved rounds (fp32 = 1.00x; the figures move by ~10% between
runs): the int4 decoder without the split 2.38-2.50x; pick and outliers as separate linears (+694 LiteRT ops)
2.03-2.15x; the group sums as a float ones-matrix in the one-hot linear (no extra op, but 19 MB more float weights
read per token) 1.94x; this form (+364 ops, 20 MB more in the file) 2.00-2.24x.
The planned layer keeps its name: a grid's `.grid`, a plain linear's `NAME.linear` (INNER). The low-bit
resolver keeps the side linears float by their `edgeq_float_reason`. Why a one-hot linear rather than a gather:
XNNPACK takes FULLY_CONNECTED, MUL and CONCATENATION, so the split stays in the delegate.
Channels are chosen per layer by their largest magnitude over the calibration samples.
"""

from __future__ import annotations

import functools

DEFAULT_CHANNELS = 16  # per linear: measured above (0.983 top-1 in simulation)
INNER = ".linear"  # the planned layer's name inside the wrapper: NAME becomes NAME.linear


def split_outlier_inputs(model, samples, channels: int = DEFAULT_CHANNELS) -> dict[str, str]:
    """Wrap, in place, every layer of `model` that a low-bit plan would quantize (a SourceGridLinear, or an
    nn.Linear without an `edgeq_float_reason`, with more input features than `channels`) in an OutlierSplitLinear
    over the `channels` input channels of largest magnitude while `model` runs `samples` (int64 token-id arrays).
    Every such layer: splitting only where that at least halves its int8 rows' error (SmolLM2: o_proj and most
    down_proj inputs gain 1.1-1.6x) lowered the TFLite artifact to top-1 0.934, worst logit cosine 0.981.
    Returns {the planned layer's name before: its name now} for each (a grid's `X.grid` stays, a plain `X` becomes
    `X.linear`)."""
    import numpy as np
    import torch
    from torch import nn

    from edgeq.llm.source_grid import source_grid_class

    if channels <= 0:
        return {}
    grid_class = source_grid_class()
    inside_grids = {id(module.grid) for module in model.modules() if isinstance(module, grid_class)}
    targets = {name: module for name, module in model.named_modules()
               if name and (isinstance(module, grid_class) or (type(module) is nn.Linear and id(module) not in inside_grids
                                                                and not getattr(module, "edgeq_float_reason", None)))
               and module.in_features > channels}
    peaks: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            peaks[name] = torch.maximum(peaks[name], seen) if name in peaks else seen
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in targets.items()]
    try:
        with torch.no_grad():
            for ids in samples:
                model(input_ids=torch.as_tensor(np.asarray(ids, dtype=np.int64))[None])
    finally:
        for handle in handles:
            handle.remove()
    wrapped = {}
    owners = dict(model.named_modules())
    for name, layer in targets.items():
        if name not in peaks:  # not run by the samples (e.g. a head of another task): nothing to measure
            continue
        index = torch.topk(peaks[name], channels).indices.sort().values
        parent_name, _, attribute = name.rpartition(".")
        split = outlier_split_class()(layer, index)
        setattr(owners[parent_name] if parent_name else model, attribute, split)
        wrapped[f"{name}.grid" if split.group else name] = f"{name}.{split.planned_name}"
    return wrapped


def describe(names, channels: int = DEFAULT_CHANNELS) -> str:
    return (f"{len(names)} linears: the {channels} input channels of largest calibration magnitude in float beside the "
            f"4-bit kernel, exact (LiteRT quantizes each input row to int8 with one scale: a few large channels would "
            f"leave the others a few levels; edgeq/llm/outlier_split.py)")


def planned_layer(module):
    """The layer a plan quantizes: an OutlierSplitLinear's, any other module itself."""
    return module.planned if isinstance(module, outlier_split_class()) else module


@functools.cache
def outlier_split_class():
    """OutlierSplitLinear (defined on first use: importing this module stays torch-free)."""
    return _module_class()


def _module_class():
    import torch
    from torch import nn

    from edgeq.llm.source_grid import source_grid_class

    class OutlierSplitLinear(nn.Module):
        """y = planned(x * keep) + side_out(side_in(x)): the planned layer unchanged, in float the picked channels'
        share (and a source grid's offsets over group sums)."""

        def __init__(self, layer: nn.Module, index: torch.Tensor):
            super().__init__()
            grid = isinstance(layer, source_grid_class())
            planned = layer.grid if grid else layer
            self.planned_name = "grid" if grid else INNER.lstrip(".")
            self.add_module(self.planned_name, planned)
            self.in_features, self.out_features = planned.in_features, planned.out_features
            self.group = layer.group if grid else None
            keep = torch.ones(planned.in_features)
            keep[index] = 0
            self.register_buffer("keep", keep)
            pick = torch.nn.functional.one_hot(index, planned.in_features).float()
            outliers = planned.weight.detach().float()[:, index]
            k = len(index)
            if grid:  # the grid's offsets over group sums first, then the picked channels' columns
                outliers = torch.cat([layer.offset.weight.detach().float(), outliers], 1)
            self.side_in = nn.Linear(planned.in_features, k, bias=False)
            self.side_out = nn.Linear(outliers.shape[1], planned.out_features, bias=False)
            with torch.no_grad():
                self.side_in.weight.copy_(pick)
                self.side_out.weight.copy_(outliers)
            self.side_in.edgeq_float_reason = f"float: picks the {k} outlier input channels of the layer beside it (one-hot, exact)"
            self.side_out.edgeq_float_reason = (f"float: those {k} channels' weight columns" + (
                f", after the source grid's offsets m + 8 d over the sums of its groups of {layer.group}" if grid else "")
                + " (kept off the kernel's int8 input rows)")

        @property
        def planned(self):
            return getattr(self, self.planned_name)

        @property
        def weight(self):  # code reading a projection's `.weight` sees the layer's real weight
            weight = self.planned.weight
            if self.group is None:
                return weight
            groups = self.in_features // self.group
            return weight + self.side_out.weight[:, :groups].repeat_interleave(self.group, dim=1)

        @property
        def bias(self):
            return self.planned.bias

        def forward(self, x):
            side = self.side_in(x)
            if self.group is not None:
                sums = x.unflatten(-1, (self.in_features // self.group, self.group)).sum(-1)
                side = torch.cat([sums, side], dim=-1)
            return self.planned(x * self.keep) + self.side_out(side)

    return OutlierSplitLinear
