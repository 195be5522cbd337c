"""Per-layer drift localization: which layer of the artifact makes its drift.

FP32 PyTorch gives every leaf module's output (forward hooks); the runtime gives its own intermediate tensors,
each labelled with the module scopes that made it (validate.layer_taps). A tensor stands for the last-executed
module among its scopes (TFLite fuses conv + batchnorm + relu into one op: one row for the group, named after
its first module, the one with weights); TFLite's channels-last tensors are read back in torch's layout.
Modules with no tensor of their own (folded, dropout) are listed as unmatched.

Each row's SQNR says how far that layer's output is from FP32; it does not say where the drift was made, since
a layer inherits the noise of every layer before it. So each layer is also run in FP32 PyTorch on the
artifact's own input to it (the tensor its producer left in the runtime): what the artifact computes beyond
that is the noise the layer adds itself, and its SQNR (`local_sqnr_db`, "isolated") ranks the offenders.
Where the input is not a tapped tensor (made by a functional op), the noise is estimated from the input's and
output's SQNR instead ("estimated", validate.layer_drift.local_sqnr_db).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from edgeq.compress.apply import user_fqn
from edgeq.load import LoadedModel
from edgeq.validate.layer_drift import LayerDrift, LayerReport, local_sqnr_db, mean_cosine, pooled_sqnr_db
from edgeq.validate.layer_taps import Tensor
from edgeq.validate.token_mask import MASK_INPUT, binary_mask, is_token_shape

LAYER_SAMPLES = 8  # the first validation samples: enough for stable per-layer SQNR, cheap on big models
MODEL_INPUT = "<input>:"  # producer prefix of a model input, followed by its name
_OUTPUT_QUANT = "output_quant"  # edgeq's quantized layers requantize their output in this child module


@dataclass
class Trace:
    """What FP32 PyTorch computed per leaf module, and how the leaves feed each other."""

    modules: dict[str, torch.nn.Module]
    order: list[str] = field(default_factory=list)  # wrapper-level FQNs in first-call order
    kinds: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # per sample
    producers: dict[str, str | None] = field(default_factory=dict)  # who made the first input; None: a functional op
    single_input: set[str] = field(default_factory=set)  # called with one tensor and nothing else: can be re-run
    attrs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # attribute names of the called ancestors
    model_outputs: dict[str, str] = field(default_factory=dict)  # module -> model output it returns as is
    repeated: set[str] = field(default_factory=set)  # called more than once per forward: not localized


def trace(model: LoadedModel, samples: list[dict]) -> Trace:
    """Run FP32 PyTorch on `samples` with hooks on every module; keep the float outputs of the leaves."""
    root = model.module
    result = Trace(dict(root.named_modules()))
    names = {id(m): name for name, m in root.named_modules()}
    leaves = {id(m) for name, m in root.named_modules() if name and next(m.children(), None) is None}
    stack: list[str] = []
    made_by: dict[int, str] = {}
    alive: list = []  # keeps sample 0's tensors alive so their ids stay unique while producers are read
    calls: dict[str, int] = {}
    first = [True]

    def enter(module, _args):
        name = names.get(id(module), "")
        if name:
            stack.append(name.rsplit(".", 1)[-1])

    def leave(module, args, kwargs, output):
        name = names.get(id(module), "")
        if not name:
            return
        attrs = tuple(stack)
        stack.pop()
        if id(module) not in leaves or not (isinstance(output, torch.Tensor) and output.is_floating_point()):
            return
        if any(output is a for a in args):
            return  # a pass-through (Identity, eval-mode Dropout): nothing to compare, no tensor of its own
        calls[name] = calls.get(name, 0) + 1
        if calls[name] > 1:
            result.repeated.add(name)
            return
        if first[0]:
            result.order.append(name)
            result.kinds[name] = type(module).__name__
            result.attrs[name] = attrs
            source = next((a for a in args if isinstance(a, torch.Tensor)), None)
            result.producers[name] = None if source is None else made_by.get(id(source))
            if len(args) == 1 and source is not None and not kwargs:
                result.single_input.add(name)
            made_by[id(output)] = name
            alive.extend([output, *args])
        result.outputs.setdefault(name, []).append(output.detach().float().numpy().copy())

    handles = []
    for module in root.modules():
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, with_kwargs=True)]
    try:
        with torch.no_grad():
            for index, sample in enumerate(samples):
                first[0] = index == 0
                calls.clear()
                inputs = [torch.from_numpy(np.ascontiguousarray(sample[n])) for n in model.input_names]
                if first[0]:
                    made_by.update({id(t): MODEL_INPUT + n for t, n in zip(inputs, model.input_names)})
                    alive.extend(inputs)
                outputs = root(*inputs)
                if first[0]:
                    for output_name, tensor in zip(model.outputs, outputs):
                        maker = made_by.get(id(tensor), MODEL_INPUT)
                        if not maker.startswith(MODEL_INPUT):
                            result.model_outputs[maker] = output_name
    finally:
        for handle in handles:
            handle.remove()
    for name in result.repeated:
        result.outputs.pop(name, None)
    result.order = [n for n in result.order if n not in result.repeated]
    return result


def onnx_match(traced: Trace, tensors: list[Tensor]) -> dict[str, tuple[str, list[str]]]:
    """Module -> (the ONNX value holding its output, [module]): the exporter fuses nothing."""
    matches = {}
    for name in traced.order:
        own = {name, f"{name}.{_OUTPUT_QUANT}"}
        size = traced.outputs[name][0].size
        found = [t for t in tensors if t.scopes and t.scopes[-1] in own and (t.shape is None or math.prod(t.shape) == size)]
        if found:
            matches[name] = (found[-1].key, [name])
        elif name in traced.model_outputs:
            matches[name] = (traced.model_outputs[name], [name])
    return matches


def tflite_match(traced: Trace, tensors: list[Tensor]) -> dict[str, tuple[int | str, list[str]]]:
    """Module -> (the TFLite tensor holding its output, the modules its op computes, in call order).

    litert-torch's scope segments are `<module.Class>_<attribute>` under `KeywordIO/FlatModel_flat`; classes
    differ once layers are quantized (Linear -> QuantizedLinear), so segments are matched by attribute names.
    A fused op's tensor lists every fused module's location (in no reliable order, sometimes with the module
    that made its input): it stands for the last-called of them, and groups those no earlier tensor took."""
    position = {name: i for i, name in enumerate(traced.order)}
    matches: dict[str, tuple[int | str, list[str]]] = {}
    taken: set[str] = set()
    for tensor in tensors:
        if not any(_tflite_scope_is(tensor.scopes[2:], traced.attrs[m]) for m in traced.order):
            continue  # a functional op of an enclosing module (a residual add that took the dense layer's name too)
        modules = {m for loc in (tensor.scopes, *tensor.fused) for m in traced.order if _tflite_scope_is(loc[2:], traced.attrs[m])}
        owner = max(modules, key=position.__getitem__)
        if tensor.shape is None or math.prod(tensor.shape) != traced.outputs[owner][0].size:
            continue  # an op inside the module's scope that does not make its output (a transpose of its input)
        group = sorted({m for m in modules if m not in taken} | {owner} | set(matches.get(owner, (None, []))[1]), key=position.__getitem__)
        matches[owner] = (tensor.key, group)
        taken |= set(group)
    for name in traced.order:
        if name not in taken and name in traced.model_outputs:
            matches[name] = (traced.model_outputs[name], [name])
    return matches


def _tflite_scope_is(segments: tuple[str, ...], attrs: tuple[str, ...]) -> bool:
    if len(segments) == len(attrs) + 1 and segments[-1].endswith("_" + _OUTPUT_QUANT):
        segments = segments[:-1]
    return len(segments) == len(attrs) and all(s.endswith("_" + a) for s, a in zip(segments, attrs))


def torch_layouts(array: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    """Every reading of `array` in the reference's layout: as is, or channels-last (NHWC, NLC) moved back to
    channels-first. Two when the sizes cannot tell (e.g. 16x16 maps of 16 channels); the caller picks."""
    views = []
    if array.shape == shape:
        views.append(array)
    if array.ndim == 4 and array.shape == (shape[0], shape[2], shape[3], shape[1]):
        views.append(array.transpose(0, 3, 1, 2))
    if array.ndim == 3 and array.shape == (shape[0], shape[2], shape[1]):
        views.append(array.transpose(0, 2, 1))
    if not views and array.size == math.prod(shape) and array.squeeze().shape == tuple(s for s in shape if s != 1):
        views.append(array.reshape(shape))
    return views


def _in_layout(arrays: list[np.ndarray], references: list[np.ndarray]) -> list[np.ndarray] | None:
    """The runtime's values of one layer in the reference's layout; where the shape is ambiguous, the reading
    closest to the reference (a transposed reading of a feature map is uncorrelated with it)."""
    readings = [torch_layouts(np.asarray(a), r.shape) for a, r in zip(arrays, references)]
    if not readings or not readings[0]:
        return None
    choices = [[views[k] for views in readings] for k in range(len(readings[0]))]
    return max(choices, key=lambda values: pooled_sqnr_db(references, values))


def localize(model: LoadedModel, artifact: Path, runtime: str, settings: dict, samples: list[dict], quantized: bool = False) -> LayerReport:
    """Per-layer drift of `artifact` against FP32 PyTorch on the first LAYER_SAMPLES of `samples`.

    For `quantized` artifacts the reference has BatchNorm folded into its convolutions, as the plan did
    (edgeq.compress.fold): the artifact's conv then computes what the reference conv does.
    """
    from edgeq.validate import layer_taps

    samples = samples[:LAYER_SAMPLES]
    notes = []
    if quantized:
        from edgeq.compress.fold import fold_batchnorm

        module, folded = fold_batchnorm(model.module, model.example_inputs)
        if folded:
            model = replace(model, module=module)
            notes.append(f"reference with BatchNorm folded into {', '.join(user_fqn(f) for f in folded)}, as in the plan")
    traced = trace(model, samples)
    if runtime == "onnx":
        taps = layer_taps.OnnxTaps(artifact, settings)
        matches = onnx_match(traced, taps.tensors)
        values, executor = taps.run(sorted({key for key, _ in matches.values()}), samples)
        notes.append("layer tensors are extra outputs of a copy of the graph, run with the artifact's session settings")
    elif runtime == "tflite":
        taps = layer_taps.TFLiteTaps(artifact)
        matches = tflite_match(traced, taps.tensors)
        values, executor = taps.run(sorted({key for key, _ in matches.values() if isinstance(key, int)}), samples)
        notes.append("layer tensors come from LiteRT's builtin kernels (a delegate keeps its intermediates to itself)")
    else:
        raise ValueError(f"per-layer drift reads intermediate tensors of onnx and tflite artifacts, not {runtime}")
    report = LayerReport("FP32 PyTorch", executor, len(samples), notes=notes)
    masks = _token_masks(model, samples)
    if masks is not None:
        real, total = sum(int(m.sum()) for m in masks), sum(m.size for m in masks)
        report.notes.append(
            f"token tensors ([batch, seq, ...]) are compared on the {real} of {total} token positions attention_mask "
            "marks real, as the model's outputs are; padding is left out of every layer's figures"
        )
    runtime_values: dict[str, list[np.ndarray]] = {}
    grouped = set()
    for name in traced.order:
        if name not in matches:
            continue
        key, group = matches[name]
        candidates = _in_layout([v[key] for v in values], traced.outputs[name])
        if candidates is not None:
            runtime_values[name] = candidates
            grouped |= set(group)
    report.unmatched = [user_fqn(n) for n in traced.order if n not in grouped]
    previous = math.inf
    for name in traced.order:
        if name not in runtime_values:
            continue
        group = matches[name][1]
        references, candidates = _valid(traced.outputs[name], masks), _valid(runtime_values[name], masks)
        sqnr = pooled_sqnr_db(references, candidates)
        source = _source(traced, group[0], runtime_values)
        if source is None:
            input_sqnr = previous  # made by a functional op: the nearest tapped layer before it
        elif source.startswith(MODEL_INPUT):
            input_sqnr = math.inf
        else:
            input_sqnr = pooled_sqnr_db(_valid(traced.outputs[source], masks), _valid(runtime_values[source], masks))
        isolated = _isolated_sqnr(traced, group, source, samples, runtime_values, references, candidates, masks)
        report.rows.append(LayerDrift(
            name=user_fqn(group[0]), kind="+".join(traced.kinds[m] for m in group), tensor=str(matches[name][0]),
            sqnr_db=sqnr, cosine=mean_cosine(references, candidates), input_sqnr_db=input_sqnr,
            local_sqnr_db=isolated if isolated is not None else local_sqnr_db(input_sqnr, sqnr),
            local_method="isolated" if isolated is not None else "estimated",
            sqnr_lost_db=None if math.isinf(input_sqnr) else input_sqnr - sqnr,
            fused=[user_fqn(m) for m in group[1:]],
        ))
        previous = sqnr
    if traced.repeated:
        report.notes.append(f"not localized (called more than once per forward): {', '.join(sorted(user_fqn(n) for n in traced.repeated))}")
    return report


def _token_masks(model: LoadedModel, samples: list[dict]) -> list[np.ndarray] | None:
    """Per sample, the token positions a text model attends to ([batch, seq] booleans from its 0/1
    attention_mask): padding positions hold values no output depends on (pooling and attention mask them),
    which drift freely and would swamp every layer's figures. The rule is the model outputs' own
    (edgeq.validate.token_mask): None without a binary attention_mask input."""
    if MASK_INPUT not in model.input_names:
        return None
    masks = [binary_mask(sample[MASK_INPUT]) for sample in samples]
    return None if any(m is None for m in masks) else masks


def _valid(arrays: list[np.ndarray], masks: list[np.ndarray] | None) -> list[np.ndarray]:
    """The arrays restricted to real token positions, for tensors laid out [batch, seq, ...] like the mask
    (validate.token_mask.is_token_shape); other tensors (attention scores [batch, heads, seq, seq]) whole."""
    if masks is None:
        return arrays
    return [a[m] if is_token_shape(a.shape, m.shape) else a for a, m in zip(arrays, masks)]


def _source(traced: Trace, name: str, runtime_values: dict) -> str | None:
    """What made `name`'s input: a model input, a tapped module (through untapped ones), or None (unknown)."""
    source = traced.producers.get(name)
    while source is not None and not source.startswith(MODEL_INPUT) and source not in runtime_values:
        source = traced.producers.get(source)
    return source


def _isolated_sqnr(traced, group, source, samples, runtime_values, references, candidates, masks) -> float | None:
    """SQNR of what the artifact adds beyond FP32 PyTorch run on the artifact's own input to the group; None
    when that input is unknown or a module of the group takes more than one tensor."""
    if source is None or source != traced.producers.get(group[0]) or any(m not in traced.single_input for m in group):
        return None  # an untapped module between them (e.g. a conv the exporter fused into its batchnorm)
    if source.startswith(MODEL_INPUT):
        inputs = [sample[source.removeprefix(MODEL_INPUT)] for sample in samples]
    else:
        inputs = runtime_values[source]
    expected = []
    with torch.no_grad():
        for value in inputs:
            x = torch.from_numpy(np.ascontiguousarray(value))
            if x.is_floating_point():
                x = x.float()
            for member in group:
                x = traced.modules[member](x)
            expected.append(x.float().numpy())
    return pooled_sqnr_db(_valid(expected, masks), candidates, signal=references)


def localize_bundle(bundle: Path, manifest: dict, source: str | None = None, **load_options) -> LayerReport:
    """Per-layer drift of a bundle's artifact on its golden inputs. The model is loaded from `source`, or from
    where the manifest says it came from; a model that is not the one converted (its sha256 differs) is refused.
    The bundle's checksums are the caller's to verify (edgeq.validate.bundle_check)."""
    from edgeq.bundle import read_golden
    from edgeq.errors import SourceError, UsageError
    from edgeq.load import load_model
    from edgeq.signature import parse_input_spec

    recorded = manifest["model"]["source"]
    runtime = manifest["target"]["runtime"]
    if runtime not in ("onnx", "tflite"):
        raise UsageError(f"{bundle}: --layers reads intermediate tensors of onnx and tflite artifacts; this one is {runtime}")
    if recorded["kind"] == "torchscript" and not load_options.get("inputs"):
        load_options["inputs"] = [
            parse_input_spec(f"{i['name']}:{'x'.join(str(d) for d in i['shape'])}:{i['dtype']}")
            for i in manifest["signature"]["declared_inputs"]
        ]
    location = source or recorded["location"]
    load_options.setdefault("task", manifest["model"].get("task"))
    try:
        model = load_model(location, **load_options)
    except SourceError as exc:
        raise SourceError(f"{bundle}: per-layer drift needs the model it was converted from ({location}): {exc}; "
                          "give it with --model") from exc
    if recorded["sha256"] and model.source.sha256 != recorded["sha256"]:
        raise SourceError(
            f"{location}: sha256 {model.source.sha256[:16]}... is not the {recorded['sha256'][:16]}... of the model "
            f"{bundle} was converted from; per-layer drift against another model would mislead"
        )
    inputs, _ = read_golden(bundle / manifest["golden"]["file"])
    artifact = bundle / manifest["artifact"]["file"]
    return localize(model, artifact, runtime, manifest.get("runtime_settings", {}), inputs, quantized=manifest.get("plan") is not None)
