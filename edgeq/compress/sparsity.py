"""Weight sparsity: unstructured (magnitude, per layer or global) and N:M semi-structured pruning, by magnitude or
by SparseGPT's one-shot reconstruction (calibration/lowbit/sparsegpt.py on the low-bit layer driver).

The graph keeps its shape: pruned weights become exact zeros. Only Core ML stores them sparse
(converters/coreml_sparse.py: constexpr_sparse_to_dense, joint with int8/int4 codes); ONNX Runtime and LiteRT
have no sparse kernels for these patterns (research: shared/research/lowbit-prune-peers.md §7), so there the
zeros only show in the report (edgeq/sparsity_report.py). Quantization keeps them: RTN maps 0 to the zero
point exactly, and GPTQ keeps a layer's existing zeros at the zero point (calibration/lowbit/gptq.py).

Which layers: nn.Linear and convolution weights. Embedding tables are lookups (no matmul to skip), and the
model's last layer (the one that writes its output) is left dense by default, since every error there reaches
the output unfiltered; both are listed in `skipped` with the reason.

Per-layer ratios (prune_layers, edgeq/compress/prune_layers.py) set a layer's share of zeros; 0 leaves it dense
(the only value N:M takes: its pattern is the spec's). With one global threshold the named layers are pinned
at their own ratio and the threshold ranks the others.

N:M keeps n of every m consecutive weights along a layer's input dimension (a conv's flattened
[C_in * kh * kw] axis, the layout the driver and Core ML's mask use), so 2:4 zeroes exactly half of each group.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from edgeq.calibration.lowbit.sparsegpt import nm_mask, smallest_mask
from edgeq.compress.apply import user_fqn
from edgeq.compress.prune_layers import entry as layer_entry
from edgeq.compress.prune_layers import left_whole, note
from edgeq.compress.spec import layer_ratio
from edgeq.compress.stage import StageResult
from edgeq.errors import UsageError

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
KINDS = ("unstructured", "nm")


def prune_sparse(
    module: nn.Module,
    spec,
    calibration: Sequence[dict[str, np.ndarray]] | None,
    input_names: Sequence[str] | None,
    example_inputs: tuple | None = None,
    *,
    keep_last: bool = True,
    device: str = "cpu",
) -> StageResult:
    """A copy of `module` with spec's sparsity (edgeq.compress.spec.PruneSpec: kind "unstructured" or "nm",
    ratio, n, m, scope "layer"|"global", method "magnitude"|"sparsegpt") in its linear and conv weights.

    calibration: samples {input name: array} (SparseGPT's layer inputs; magnitude needs none). example_inputs:
    one forward to find the layers' call order (the last one called whose output reaches the model's outputs
    is the output layer, left dense when `keep_last`); without them, module order decides. Layers are keyed by
    the input module's torch FQNs; `device` is where SparseGPT's driver runs ("cpu" or "cuda").
    """
    started = time.perf_counter()
    if spec.kind not in KINDS:
        raise UsageError(f"prune_sparse handles kinds {', '.join(KINDS)}, not {spec.kind!r} (structured kinds: prune_structured/prune_heads)")
    pattern = f"{spec.n}:{spec.m}" if spec.kind == "nm" else "unstructured"
    model = copy.deepcopy(module).eval()
    layers, skipped = _eligible(model, spec, example_inputs, keep_last)
    if not layers:
        raise UsageError(f"--prune {spec.text or pattern}: no layer of the model can be pruned "
                         f"({'; '.join(f'{k}: {v}' for k, v in skipped.items()) or 'it has no nn.Linear or convolution'})")
    asked = {fqn: layer_ratio(spec, fqn) for fqn in layers}  # (ratio, prune_layers pattern or None)
    for fqn, (ratio, named) in asked.items():
        if named is not None and ratio == 0:
            skipped[fqn] = left_whole(spec, named)
            del layers[fqn]
    if not layers:
        raise UsageError(f"{getattr(spec, 'layers_origin', 'prune_layers')}: leaves every prunable layer whole (0); nothing left for --prune {spec.text or pattern}")
    if spec.kind == "nm":
        ratios = {fqn: spec.ratio for fqn in layers}
    elif spec.scope == "global":  # layers prune_layers names are pinned; the threshold ranks the others
        together = {fqn: layer for fqn, layer in layers.items() if asked[fqn][1] is None}
        ratios = {fqn: asked[fqn][0] for fqn in layers} | (_global_ratios(together, spec.ratio) if together else {})
    else:
        ratios = {fqn: asked[fqn][0] for fqn in layers}
    summaries: dict[str, dict] = {}
    by_magnitude = dict(layers)
    fallback: list[str] = []
    if spec.method == "sparsegpt":
        model, summaries, fallback = _sparsegpt(model, layers, ratios, spec, calibration, input_names, device)
        by_name = {user_fqn(name): child for name, child in model.named_modules()}
        by_magnitude = {fqn: by_name[fqn] for fqn in fallback}
    with torch.no_grad():
        for fqn, layer in by_magnitude.items():
            weight = layer.weight.reshape(layer.weight.shape[0], -1)
            score = weight.abs()
            mask = nm_mask(score, spec.n, spec.m) if spec.kind == "nm" else smallest_mask(score, ratios[fqn])
            layer.weight.copy_(weight.masked_fill(mask, 0).reshape(layer.weight.shape))
    result = StageResult(model, "prune", spec.text or pattern, skipped=skipped)
    by_name = {user_fqn(name): child for name, child in model.named_modules()}
    zeros = total = 0
    for fqn in layers:
        if fqn in skipped:
            continue
        weight = by_name[fqn].weight.detach()
        share = float((weight == 0).float().mean())
        zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
        entry = {"sparsity": round(share, 4), "pattern": pattern, **layer_entry(spec, *asked[fqn])}
        if fqn in summaries and summaries[fqn].get("weight"):
            energy = summaries[fqn]["weight"]  # relative output error on the calibration inputs (tr(E H E^T) / tr(W H W^T))
            entry |= {"rel_output_error": round(summaries[fqn]["sparsegpt"] / energy, 6),
                      "rel_output_error_magnitude": round(summaries[fqn]["magnitude"] / energy, 6)}
        if fqn in fallback:
            entry["method"] = "magnitude"
        result.layers[fqn] = entry
    how = f"SparseGPT (one-shot, on {len(calibration or [])} calibration samples)" if spec.method == "sparsegpt" else "magnitude"
    scope = ", one threshold for the whole model" if spec.kind == "unstructured" and spec.scope == "global" else ""
    result.notes.append(f"{pattern} sparsity by {how}{scope}: {len(result.layers)} layers, {100 * zeros / max(total, 1):.1f}% "
                        "of their weights exactly zero")
    result.notes.extend(note(spec))
    if fallback:
        result.notes.append(f"pruned by magnitude (SparseGPT cannot lay out their inputs: grouped or 1-d convs): {', '.join(fallback)}")
    result.notes.append("zeros are stored sparse in Core ML (constexpr_sparse_to_dense); ONNX Runtime and LiteRT keep "
                        "dense weights (no sparse kernels), so there sparsity saves no size or time")
    result.seconds = time.perf_counter() - started
    return result


def _eligible(model: nn.Module, spec, example_inputs, keep_last: bool) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The layers to prune (user FQN -> module, in call order when a forward was possible) and the skipped ones."""
    candidates: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, child in model.named_modules():
        fqn = user_fqn(name)
        if isinstance(child, nn.Embedding):
            skipped[fqn] = "embedding table: a lookup, no matmul for zeros to skip (left dense)"
        elif isinstance(child, PRUNABLE):
            candidates[fqn] = child
    traced = _call_order(model, candidates, example_inputs)
    last = next(reversed(candidates), None)
    if traced is not None:
        order, reaching = traced
        for fqn in [f for f in candidates if f not in order]:
            skipped[fqn] = "never called by the model's forward (left as it is)"
        candidates = {fqn: candidates[fqn] for fqn in order}
        last = reaching[-1] if reaching else None
    if keep_last and last is not None:
        skipped[last] = "the model's last layer (writes the output): left dense by default"
        del candidates[last]
    if spec.kind == "nm":
        for fqn, layer in list(candidates.items()):
            columns = layer.weight[0].numel()
            if columns % spec.m:
                skipped[fqn] = f"{columns} input weights per output are not a multiple of M = {spec.m} (N:M needs whole groups)"
                del candidates[fqn]
    return candidates, skipped


def _call_order(model: nn.Module, layers: dict[str, nn.Module], example_inputs) -> tuple[list[str], list[str]] | None:
    """(the layers in the order one forward on `example_inputs` first calls them, those of them whose output
    reaches the model's outputs), or None without inputs. "Reaches" is autograd's answer: a layer computed but
    unused (a BERT pooler under a sentence-embedding head) is not the layer that writes the output."""
    if example_inputs is None:
        return None
    order: list[str] = []
    produced: dict[str, torch.Tensor] = {}

    def record(fqn):
        def hook(_module, _args, output):
            if fqn not in order:
                order.append(fqn)
            if isinstance(output, torch.Tensor) and output.is_floating_point() and fqn not in produced:
                output = output + torch.zeros((), dtype=output.dtype, requires_grad=True)  # a graph even without grads
                produced[fqn] = output
                return output
            return None
        return hook

    handles = [layer.register_forward_hook(record(fqn)) for fqn, layer in layers.items()]
    try:
        with torch.enable_grad():
            outputs = model(**example_inputs) if isinstance(example_inputs, dict) else model(*example_inputs)
            leaves = [t for t in _tensors(outputs) if t.is_floating_point() and t.requires_grad]
            reaching: list[str] = []
            if leaves and produced:
                total = sum(t.float().sum() for t in leaves)
                grads = torch.autograd.grad(total, list(produced.values()), allow_unused=True)
                used = {fqn for fqn, grad in zip(produced, grads) if grad is not None}
                reaching = [fqn for fqn in order if fqn in used]
    finally:
        for handle in handles:
            handle.remove()
    return order, reaching


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _global_ratios(layers: dict[str, nn.Module], ratio: float) -> dict[str, float]:
    """Per-layer sparsity from one magnitude threshold over every eligible weight (global scope): exactly
    round(ratio x total) weights of least |w| across the layers."""
    magnitudes = torch.cat([layer.weight.detach().abs().flatten() for layer in layers.values()])
    mask = smallest_mask(magnitudes, ratio)
    ratios, start = {}, 0
    for fqn, layer in layers.items():
        count = layer.weight.numel()
        ratios[fqn] = float(mask[start : start + count].float().mean())
        start += count
    return ratios


def _sparsegpt(model, layers, ratios, spec, calibration, input_names, device):
    """SparseGPT on every layer the driver can lay out (linears, groups=1 Conv2d), sequentially on the pruned
    model's own activations; returns the pruned copy, the solvers' summaries and the layers left for magnitude."""
    from edgeq.calibration.lowbit.driver import check_layer, quantize_layers
    from edgeq.calibration.lowbit.sparsegpt import sparsegpt_solver

    if not calibration:
        raise UsageError(f"--prune {spec.text}: SparseGPT needs calibration samples (--data / --calibration-samples); "
                         "magnitude pruning (drop ':sparsegpt') needs none")
    solvable, fallback = [], []
    for fqn, layer in layers.items():
        try:
            check_layer(fqn, layer)
            solvable.append(fqn)
        except ValueError:
            fallback.append(fqn)
    row_mask = None
    if input_names and "attention_mask" in input_names:  # padding tokens must not shape the Hessian
        row_mask = lambda sample: torch.as_tensor(sample["attention_mask"]).bool()  # noqa: E731
    solver = sparsegpt_solver(ratios, n=spec.n, m=spec.m) if spec.kind == "nm" else sparsegpt_solver(ratios)
    try:
        result = quantize_layers(model, calibration, solvable, solver, input_names=input_names, device=device, row_mask=row_mask)
    except ValueError as exc:
        raise UsageError(f"--prune {spec.text}: {exc}") from exc
    return result.module.to("cpu").eval(), result.summaries, fallback
