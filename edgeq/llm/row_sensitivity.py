"""Keep float the few linears whose int8 input rows cost a decoder most on LiteRT.

LiteRT runs a 4-bit linear only with its input rows quantized to int8 at run time (XNNPACK qd8-f32-qb4w: one scale
and zero point per row). With the largest calibration channels computed beside the kernel (outlier_split.py) most
linears lose little, but not all: in SmolLM2-135M the down_proj inputs hold per-token peaks in ever other channels
(27-73 different largest channels over 247 tokens, peak / rms 10-20 after the split), and two layers stand out.
Each linear's rows alone on emulated qd8 (the rest exact), KL of the next-token distribution to the exact model on
160 STS-B dev sentences, 16 channels split: median 5e-5, the first block's down_proj 6e-4, the last one's 1.2e-3,
all linears together 5.4e-3. Keeping those two float (2 x 3.5 MB read per token, against ~100 MB for the decoder)
takes the total to 3.8e-3 and teacher-forced top-1 on those sentences from 0.966 to 0.973 (PyTorch emulation, which
matches LiteRT: 0.835 against 0.838 without the split). A layer's error measured at its own output ranks them
differently (the first down_proj is ordinary there): the drift is measured end to end.

Rule: float the layers that each hold at least DRIFT_SHARE of the summed drift of all, worst first, while the float
layers hold at most MAX_SHARE of the 4-bit weights (an LM head, a fifth of a small decoder's weights, never
qualifies). Each float down_proj costs SmolLM2's decode ~2.7% (3.5 MB of float32 read per token): a first rule,
8x the median layer, also took the second block's down_proj (1.7% of the drift): decode 1.93-1.97x fp32 against
2.08-2.10x for the split alone (one thread, interleaved rounds).
"""

from __future__ import annotations

DRIFT_SHARE = 0.10  # of the summed single-layer drifts: SmolLM2's two outliers hold ~0.23 each, the next 0.017
MAX_SHARE = 0.02  # of the planned weights' parameters kept float at most


def row_drifts(model, samples) -> dict[str, float]:
    """{name of each OutlierSplitLinear in `model`: the mean KL (reference || candidate) of the next-token
    distribution over `samples` (int64 token-id arrays) when only that layer's kernel input rows are quantized as
    XNNPACK's qd8 does (DynamicActivationQuant int8: asymmetric, one range per row)}, the reference being `model`
    itself unquantized."""
    import numpy as np
    import torch

    from edgeq.compress.qdq import DynamicActivationQuant
    from edgeq.llm.outlier_split import outlier_split_class
    from edgeq.plan import QDtype

    split = outlier_split_class()
    layers = {name: module for name, module in model.named_modules() if isinstance(module, split)}
    # one batch, right-padded: causal attention never lets a real position see the padding after it
    lengths = [len(ids) for ids in samples]
    batch = torch.zeros(len(samples), max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(batch)
    for row, ids in enumerate(samples):
        batch[row, :lengths[row]] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        mask[row, :lengths[row]] = 1

    def log_probs():
        with torch.no_grad():
            logits = model(input_ids=batch, attention_mask=mask).logits.float()
        return torch.log_softmax(logits[mask.bool()], -1)

    rows = DynamicActivationQuant(QDtype.INT8)
    reference = log_probs()
    drifts = {}
    for name, layer in layers.items():
        handle = layer.planned.register_forward_pre_hook(lambda _module, args: (rows(args[0]), *args[1:]))
        try:
            candidate = log_probs()
        finally:
            handle.remove()
        drifts[name] = (reference.exp() * (reference - candidate)).sum(-1).mean().item()
    return drifts


def keep_sensitive_float(model, samples, share: float = DRIFT_SHARE, max_share: float = MAX_SHARE) -> dict[str, float]:
    """Replace, in place, the OutlierSplitLinears of `model` whose drift (row_drifts) is at least `share` of all the
    layers' drifts summed by a plain float nn.Linear over the layer's exact weight (with an `edgeq_float_reason`, so
    the low-bit plan keeps it float), worst first, while they hold at most `max_share` of the split layers' parameters.
    Returns {name: drift} of the layers made float."""
    import torch
    from torch import nn

    drifts = row_drifts(model, samples)
    if not drifts:
        return {}
    owners = dict(model.named_modules())
    sizes = {name: owners[name].in_features * owners[name].out_features for name in drifts}
    total = sum(drifts.values())
    budget = max_share * sum(sizes.values())
    chosen: dict[str, float] = {}
    for name in sorted(drifts, key=drifts.get, reverse=True):
        if drifts[name] < share * total or drifts[name] <= 0:
            break
        if sizes[name] > budget:
            continue
        budget -= sizes[name]
        chosen[name] = drifts[name]
        split = owners[name]
        plain = nn.Linear(split.in_features, split.out_features, bias=split.bias is not None)
        with torch.no_grad():
            plain.weight.copy_(split.weight)  # the planned weight plus a source grid's offsets: the layer exactly
            if split.bias is not None:
                plain.bias.copy_(split.bias)
        plain.edgeq_float_reason = (f"float: its int8 input rows alone cost {drifts[name]:.2g} KL of the next-token "
                                    f"distribution, {drifts[name] / total:.0%} of all the linears' drifts summed "
                                    "(edgeq/llm/row_sensitivity.py)")
        parent, _, attribute = name.rpartition(".")
        setattr(owners[parent] if parent else model, attribute, plain)
    return chosen


def describe_float(floated: dict[str, float]) -> str:
    return (f"{len(floated)} linears float whole, their int8 input rows costing most of all with the outlier "
            f"channels split (KL alone: " + ", ".join(f"{name} {drift:.2g}" for name, drift in floated.items())
            + f"; each at least {DRIFT_SHARE:.0%} of all the linears' drifts summed; edgeq/llm/row_sensitivity.py)")
