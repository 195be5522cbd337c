"""Low-rank factorization: an nn.Linear (or 1x1 nn.Conv2d) W [out, in] becomes two smaller layers, A [r, in]
without bias then B [out, r] with the original bias, when r * (in + out) < in * out.

The pair is an ordinary nn.Sequential of two nn.Linear (or two 1x1 nn.Conv2d), so every later stage sees plain
layers: quantization plans both factors (FQNs `<layer>.0` and `<layer>.1`) and every runtime exports them as two
MatMul / FULLY_CONNECTED / linear ops. Each factor takes sqrt(S) of the singular values (B = U sqrt(S),
A = sqrt(S) V^T): balanced scales keep both factors' int8 grids equally fine.

Rank, per layer, by the spec's mode (LowRankSpec in edgeq/compress/spec.py):
    energy:E   the smallest r whose singular values keep E of the sum of squared singular values
    rank:F     r = F x min(in, out)
    params:F   r such that the two factors hold F x the layer's weights: r = F * in * out / (in + out)
A layer whose rank would not save weights is left as it is, with the reason.

activation_aware (SVD-LLM, Wang et al. 2024, eq. 4-6): plain SVD minimizes ||W - W'||_F, but what matters is
the layer's output on real inputs, ||(W - W') X^T||_F = ||(W - W') L||_F with L L^T = X^T X / n (Cholesky of the
inputs' second moment on the calibration samples). So SVD of W L, truncate, and map back: W' = (W L)_r L^-1,
i.e. B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T L^-1. Then the energy kept is that of the layer's outputs.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import time
from dataclasses import dataclass

import numpy as np

from edgeq.compress.apply import user_fqn
from edgeq.compress.stage import StageResult
from edgeq.errors import UsageError
from edgeq.layer_overrides import pattern_matches

MODES = ("energy", "rank", "params")
# Ridge on X^T X before Cholesky, relative to its mean diagonal: inputs that never vary (dead features, padding)
# make X^T X singular; 1% is GPTQ's damping for the same matrix, small enough to keep the whitening's benefit.
DAMPING = 0.01


@dataclass(frozen=True)
class Factors:
    """first [rank, in] (no bias) then second [out, rank]; energy: share of sum(S^2) the rank keeps."""

    first: np.ndarray
    second: np.ndarray
    rank: int
    full_rank: int
    energy: float


def factorize(module, spec, calibration: list[dict[str, np.ndarray]], input_names: list[str],
              example_inputs: tuple | None = None) -> StageResult:
    """A copy of `module` whose selected nn.Linear and 1x1 nn.Conv2d layers are each two smaller layers.

    `spec`: a LowRankSpec (mode, value, activation_aware, layers, text). `calibration`: samples by input name,
    read only when spec.activation_aware (the example inputs stand in when there are none). The result's
    `layers` and `skipped` are keyed by the input module's user FQNs (edgeq's FlatModel wrapper prefix dropped,
    as in plans): {"rank", "full_rank", "energy", "params": [before, after]}, params with the bias.
    """
    import torch

    start = time.perf_counter()
    _check_spec(spec)
    model = copy.deepcopy(module).eval()
    selected, skipped = select_layers(model, tuple(spec.layers))
    moments, samples = {}, 0
    if spec.activation_aware and selected:
        moments, samples = input_moments(model, selected, calibration, input_names, example_inputs)
    layers = {}
    for fqn, layer in selected.items():
        weight = _weight_matrix(layer)
        out_features, in_features = weight.shape
        full_rank = min(in_features, out_features)
        if spec.mode != "energy":  # the rank is known before any SVD: skip the layers it cannot shrink now
            rank = choose_rank(np.ones(full_rank), spec.mode, spec.value, in_features, out_features)
            reason = _no_saving(rank, full_rank, in_features, out_features, spec)
            if reason:
                skipped[fqn] = reason
                continue
        whitening = None
        if spec.activation_aware:
            if fqn not in moments:
                skipped[fqn] = "not reached by a forward pass on the calibration samples (no activations to whiten by)"
                continue
            whitening = cholesky_factor(moments[fqn])
        factors = low_rank_factors(weight, lambda s: choose_rank(s, spec.mode, spec.value, in_features, out_features),
                                   whitening)
        reason = _no_saving(factors.rank, full_rank, in_features, out_features, spec)
        if reason:
            skipped[fqn] = reason
            continue
        before, after = in_features * out_features, factors.rank * (in_features + out_features)
        bias = 0 if layer.bias is None else layer.bias.numel()
        _replace(model, layer, _factored_layer(layer, factors, torch))
        layers[fqn] = {"rank": factors.rank, "full_rank": factors.full_rank, "energy": round(factors.energy, 6),
                       "params": [before + bias, after + bias]}
    notes = _notes(spec, layers, skipped, module, model, samples)
    return StageResult(module=model.eval(), stage="lowrank", spec=_spec_text(spec), layers=layers, notes=notes,
                       skipped=skipped, seconds=time.perf_counter() - start)


def low_rank_factors(weight: np.ndarray, rank_for, whitening: np.ndarray | None = None) -> Factors:
    """Truncated SVD of `weight` [out, in] (of weight @ whitening when given, a lower-triangular L with
    L L^T the inputs' second moment), at the rank `rank_for(singular_values)` picks, as two factors whose
    product approximates `weight`. float64 throughout; the caller casts."""
    import torch

    weight = np.asarray(weight, np.float64)
    target = weight if whitening is None else weight @ whitening
    u, s, vh = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(target), full_matrices=False))  # numpy's: 2x slower
    rank = int(min(max(rank_for(s), 1), len(s)))
    total = float(np.sum(s**2))
    energy = float(np.sum(s[:rank] ** 2) / total) if total > 0 else 1.0
    root = np.sqrt(s[:rank])
    second = u[:, :rank] * root
    first = root[:, None] * vh[:rank]
    if whitening is not None:  # A = sqrt(S) V^T L^-1, i.e. A L = sqrt(S) V^T: one triangular solve
        lower = torch.from_numpy(np.ascontiguousarray(whitening, np.float64))
        first = torch.linalg.solve_triangular(lower, torch.from_numpy(first), upper=False, left=False).numpy()
    first, second = _balanced(first, second)
    return Factors(first, second, rank, len(s), energy)


def choose_rank(singular_values: np.ndarray, mode: str, value: float, in_features: int, out_features: int) -> int:
    """The rank `mode`:`value` asks for (at least 1; see the module docstring)."""
    full = len(singular_values)
    if mode == "energy":
        squared = singular_values.astype(np.float64) ** 2
        kept = np.cumsum(squared) / max(float(squared.sum()), np.finfo(np.float64).tiny)
        # the smallest r with kept[r-1] >= value (a hair of tolerance so value 1.0 is reachable in float)
        return int(min(np.searchsorted(kept, value - 1e-12) + 1, full))
    if mode == "rank":
        return max(1, min(full, round(value * full)))
    return max(1, min(full, math.floor(value * in_features * out_features / (in_features + out_features))))


def cholesky_factor(moment: np.ndarray) -> np.ndarray:
    """Lower-triangular L with L L^T = moment + damping (DAMPING x its mean diagonal, raised tenfold until
    the factorization succeeds)."""
    import torch

    moment = torch.from_numpy(np.asarray(moment, np.float64))
    scale = float(moment.diagonal().mean()) or 1.0
    damping = DAMPING
    while True:  # torch's LAPACK call: numpy's is ten times slower here
        lower, info = torch.linalg.cholesky_ex(moment + damping * scale * torch.eye(len(moment), dtype=moment.dtype))
        if int(info) == 0:
            return lower.numpy()
        damping *= 10


def select_layers(model, patterns: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    """(user FQN -> layer to factorize, user FQN -> why a matching layer cannot be). User FQNs are the model's own
    (edgeq's FlatModel wrapper prefix dropped), as in plans and --keep-float. No patterns: every nn.Linear and
    1x1 nn.Conv2d. A pattern (FQN, glob, or re:REGEX in full) that names no module is a usage error."""
    from torch import nn

    modules = {user_fqn(fqn): m for fqn, m in model.named_modules() if fqn}
    shared = _shared_weights(model)
    chosen = {fqn: m for fqn, m in modules.items() if not patterns or any(_matches(p, fqn) for p in patterns)}
    for pattern in patterns:
        if not any(_matches(pattern, fqn) for fqn in modules):
            close = difflib.get_close_matches(pattern, [f for f, m in modules.items() if isinstance(m, nn.Linear)], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (FQN, glob such as '*.intermediate.dense', or re:REGEX)"
            raise UsageError(f"--lowrank-layers {pattern!r} names no module of the model{hint}")
    selected, skipped = {}, {}
    for fqn, layer in chosen.items():
        if isinstance(layer, nn.Conv2d):
            if tuple(layer.kernel_size) != (1, 1):
                if patterns:
                    skipped[fqn] = f"a {layer.kernel_size[0]}x{layer.kernel_size[1]} convolution: only 1x1 convolutions factorize into two layers"
                continue
            if layer.groups != 1:
                skipped[fqn] = f"a grouped convolution (groups={layer.groups}): its weight is not one matrix"
                continue
        elif not isinstance(layer, nn.Linear):
            continue
        if id(layer.weight) in shared:
            skipped[fqn] = f"its weight is shared with {', '.join(sorted(shared[id(layer.weight)] - {fqn}))} (tied): factorizing would untie them"
            continue
        selected[fqn] = layer
    if patterns and not selected and not skipped:
        raise UsageError(f"--lowrank-layers {', '.join(map(repr, patterns))}: none of the modules named is an "
                         "nn.Linear or 1x1 nn.Conv2d")
    return selected, skipped


def input_moments(model, layers: dict, calibration: list[dict[str, np.ndarray]], input_names: list[str],
                  example_inputs: tuple | None) -> tuple[dict[str, np.ndarray], int]:
    """FQN -> X^T X / n [in, in] of each layer's inputs over the calibration samples (float64), and how many
    samples were run. Without calibration samples the example inputs are the one sample.

    Tokens an `attention_mask` input marks as padding are left out where a layer's input is [batch, sequence,
    features] of the mask's shape: a short sentence padded to 128 tokens is mostly padding, whose activations
    nothing downstream reads (masked attention, masked pooling), and they would outweigh the real tokens."""
    import torch

    if calibration:
        batches = [tuple(torch.from_numpy(np.asarray(sample[name])) for name in input_names) for sample in calibration]
    elif example_inputs is not None:
        batches = [tuple(example_inputs)]
    else:
        raise UsageError("activation-aware low-rank needs calibration samples (--data) or example inputs")
    mask_at = input_names.index("attention_mask") if "attention_mask" in input_names else None
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(fqn, layer):
        def record(_module, args, _output):
            x = args[0].detach()
            if isinstance(layer, torch.nn.Conv2d):  # the pixels a 1x1 conv reads; zero padding adds nothing to X^T X
                x = x[..., :: layer.stride[0], :: layer.stride[1]].movedim(-3, -1)
            mask = current["mask"]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask != 0]
            x = x.reshape(-1, x.shape[-1]).float()
            # float32 products (the slow part) summed in float64: one sample's rows are few enough for float32
            sums[fqn] = sums.get(fqn, 0) + (x.T @ x).double()
            counts[fqn] = counts.get(fqn, 0) + x.shape[0]
        return record

    handles = [layer.register_forward_hook(hook(fqn, layer)) for fqn, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch[mask_at] if mask_at is not None else None
                model(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return {fqn: (sums[fqn] / max(counts[fqn], 1)).numpy() for fqn in sums}, len(batches)


def _no_saving(rank: int, full_rank: int, in_features: int, out_features: int, spec) -> str | None:
    """Why a layer stays as it is at `rank`, or None where two factors hold fewer weights than the layer."""
    before, after = in_features * out_features, rank * (in_features + out_features)
    if after < before:
        return None
    return (f"rank {rank} of {full_rank} ({spec.mode}:{spec.value:g}) would hold {after} weights, not fewer than "
            f"the layer's {before}: no saving")


def _check_spec(spec) -> None:
    if spec.mode not in MODES:
        raise UsageError(f"low-rank mode {spec.mode!r}: expected one of {', '.join(MODES)} (e.g. rank:0.5, energy:0.95)")
    if not 0 < spec.value <= 1:
        raise UsageError(f"low-rank {spec.mode}:{spec.value}: the value must be in (0, 1] (e.g. {spec.mode}:0.5)")


def _matches(pattern: str, fqn: str) -> bool:
    """An exact FQN, a glob (`*` also crosses dots) or `re:REGEX` in full: per_layer's rules."""
    try:
        return pattern_matches(pattern, fqn)
    except re.error as exc:
        raise UsageError(f"--lowrank-layers {pattern!r}: not a valid regular expression: {exc}") from exc


def _shared_weights(model) -> dict[int, set[str]]:
    """id of a weight tensor held by more than one module (tied embeddings and heads) -> those modules' FQNs."""
    owners: dict[int, set[str]] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if weight is not None:
            owners.setdefault(id(weight), set()).add(user_fqn(fqn))
    return {key: names for key, names in owners.items() if len(names) > 1}


def _weight_matrix(layer) -> np.ndarray:
    weight = layer.weight.detach().to("cpu").double()
    return weight.reshape(weight.shape[0], -1).numpy()


def _balanced(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rescale each rank component so its row of `first` and column of `second` have equal norms (the product
    is unchanged): plain SVD's sqrt(S) split already is; the whitened one's L^-1 unbalances it."""
    rows, cols = np.linalg.norm(first, axis=1), np.linalg.norm(second, axis=0)
    gain = np.sqrt(np.where((rows > 0) & (cols > 0), cols / np.where(rows > 0, rows, 1), 1.0))
    return first * gain[:, None], second / gain


def _factored_layer(layer, factors: Factors, torch):
    from torch import nn

    options = dict(dtype=layer.weight.dtype, device=layer.weight.device)
    rank, (out_features, in_features) = factors.rank, (factors.second.shape[0], factors.first.shape[1])
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Conv2d):  # stride and padding on the first: a 1x1 conv is per pixel, zeros stay zeros
        first = nn.Conv2d(in_features, rank, 1, stride=layer.stride, padding=layer.padding,
                          padding_mode=layer.padding_mode, bias=False, **options)
        second = nn.Conv2d(rank, out_features, 1, bias=has_bias, **options)
        shapes = ((rank, in_features, 1, 1), (out_features, rank, 1, 1))
    else:
        first = nn.Linear(in_features, rank, bias=False, **options)
        second = nn.Linear(rank, out_features, bias=has_bias, **options)
        shapes = ((rank, in_features), (out_features, rank))
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(factors.first.reshape(shapes[0])))
        second.weight.copy_(torch.from_numpy(factors.second.reshape(shapes[1])))
        if has_bias:
            second.bias.copy_(layer.bias.detach())
    pair = nn.Sequential(first, second)
    pair.train(layer.training)
    return pair


def _replace(model, old, new) -> None:
    """Put `new` wherever `old` sits (by identity: the user FQN may lack the wrapper's prefix)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)


def _spec_text(spec) -> str:
    text = getattr(spec, "text", "")
    return text or f"{spec.mode}:{spec.value:g}" + (":activation" if spec.activation_aware else "")


def _notes(spec, layers: dict, skipped: dict, original, factored, samples: int) -> list[str]:
    before = sum(entry["params"][0] for entry in layers.values())
    after = sum(entry["params"][1] for entry in layers.values())
    total_before = sum(p.numel() for p in original.parameters())
    total_after = sum(p.numel() for p in factored.parameters())
    method = (f"activation-aware SVD (inputs whitened by their second moment on {samples} calibration sample"
              f"{'s' if samples != 1 else ''}; energy is the layer output's)" if spec.activation_aware else "SVD")
    notes = [f"low-rank {_spec_text(spec)}: {method} of {len(layers)} layer{'s' if len(layers) != 1 else ''}, "
             f"{before:,} -> {after:,} parameters in them; model {total_before:,} -> {total_after:,} parameters "
             f"({total_after / max(total_before, 1):.1%})"]
    if layers:
        ranks = [entry["rank"] / entry["full_rank"] for entry in layers.values()]
        energies = [entry["energy"] for entry in layers.values()]
        notes.append(f"low-rank: ranks {min(ranks):.0%}-{max(ranks):.0%} of full, energy kept {min(energies):.4f}-{max(energies):.4f}")
    if skipped:
        notes.append(f"low-rank: {len(skipped)} layer{'s' if len(skipped) != 1 else ''} left as they were (see skipped)")
    return notes
