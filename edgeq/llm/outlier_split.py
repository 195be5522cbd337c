"""Outlier input channels in float beside a 4-bit kernel that quantizes its input rows to int8 (LiteRT).

LiteRT runs a 4-bit FULLY_CONNECTED only as XNNPACK's qd8-f32-qb4w: each input row is quantized to int8 at run
time with one scale for the whole row. A decoder's linear inputs hold a few channels far larger than the rest
(SmolLM2-135M, calibration prompts: the last block's down_proj input peaks at 507 with a median channel peak of
4.3), so one row scale leaves the other channels a few levels each. Simulated in PyTorch on 24 STS-B dev
sentences, SmolLM2's linears on their source grid agree with FP32 on 0.890 of next tokens with int8 rows; with
the 16 largest input channels of every linear computed in float beside the kernel, 0.983 (k = 4: 0.959, 8: 0.971).

The split is exact in float, so the plan's codes stay those of the original weight:

    y = W x = W (x * keep) + W[:, idx] (P x)      keep: 1, but 0 on the channels idx;  P: one-hot rows picking idx

`OutlierSplitLinear` wraps the layer that gets the low-bit codes (`.linear`, unchanged) and adds two small float
linears (`.pick` k x K, one-hot, exact; `.outliers` N x k, the columns idx of the weight), which the low-bit
resolver keeps float by their `edgeq_float_reason`. Why one-hot linears rather than a gather: XNNPACK takes a
FULLY_CONNECTED and a MUL, so the whole split stays in the delegate (a GATHER would split its partitions).
Channels are chosen per layer by their largest magnitude over the calibration samples.
"""

from __future__ import annotations

DEFAULT_CHANNELS = 16  # per linear: measured above (0.983 top-1 in simulation); 1 + 2 small float FCs per layer
INNER = ".linear"  # the planned layer's name inside the wrapper: NAME becomes NAME.linear


def split_outlier_inputs(model, samples, channels: int = DEFAULT_CHANNELS) -> list[str]:
    """Wrap, in place, every linear layer of `model` that a low-bit plan would quantize (an nn.Linear without an
    `edgeq_float_reason`, with more input features than `channels`) in an OutlierSplitLinear over the `channels`
    input channels of largest magnitude while `model` runs `samples` (int64 token-id arrays). Returns the names."""
    import numpy as np
    import torch
    from torch import nn

    if channels <= 0:
        return []
    targets = {name: module for name, module in model.named_modules()
               if type(module) is nn.Linear and not getattr(module, "edgeq_float_reason", None)
               and module.in_features > channels and name}
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
    wrapped = []
    owners = {name: module for name, module in model.named_modules()}
    for name, linear in targets.items():
        if name not in peaks:  # not run by the samples (e.g. a head of another task): nothing to measure
            continue
        parent_name, _, attribute = name.rpartition(".")
        index = torch.topk(peaks[name], channels).indices.sort().values
        setattr(owners[parent_name] if parent_name else model, attribute, outlier_split_class()(linear, index))
        wrapped.append(name)
    return wrapped


def describe(names: list[str], channels: int = DEFAULT_CHANNELS) -> str:
    return (f"{len(names)} linears: the {channels} input channels of largest calibration magnitude in float beside the "
            f"4-bit kernel, exact (LiteRT quantizes each input row to int8 with one scale: a few large channels "
            f"would leave the others a few levels; edgeq/llm/outlier_split.py)")


def planned_layer(module):
    """The layer a plan quantizes: an OutlierSplitLinear's `.linear`, any other module itself."""
    return module.linear if _CLASS and isinstance(module, _CLASS[0]) else module


_CLASS = []


def outlier_split_class():
    """OutlierSplitLinear (defined on first use: importing this module stays torch-free)."""
    if not _CLASS:
        _CLASS.append(_module_class())
    return _CLASS[0]


def _module_class():
    import torch
    from torch import nn

    class OutlierSplitLinear(nn.Module):
        """y = linear(x * keep) + outliers(pick(x)): `linear` unchanged, the picked channels' share in float."""

        def __init__(self, linear: nn.Linear, index: torch.Tensor):
            super().__init__()
            self.linear = linear
            self.in_features, self.out_features = linear.in_features, linear.out_features
            keep = torch.ones(linear.in_features)
            keep[index] = 0
            self.register_buffer("keep", keep)
            self.pick = nn.Linear(linear.in_features, len(index), bias=False)
            self.outliers = nn.Linear(len(index), linear.out_features, bias=False)
            with torch.no_grad():
                self.pick.weight.copy_(torch.nn.functional.one_hot(index, linear.in_features).float())
                self.outliers.weight.copy_(linear.weight.detach().float()[:, index])
            k = len(index)
            self.pick.edgeq_float_reason = f"float: picks the {k} outlier input channels of the layer beside it (one-hot, exact)"
            self.outliers.edgeq_float_reason = (f"float: those {k} channels' weight columns (their share of the layer, "
                                                f"kept off the kernel's int8 input rows)")

        @property
        def weight(self):  # code reading a projection's `.weight` sees the layer's real weight
            return self.linear.weight

        @property
        def bias(self):
            return self.linear.bias

        def forward(self, x):
            return self.linear(x * self.keep) + self.outliers(self.pick(x))

    return OutlierSplitLinear
