"""AWQ in conversion: each quantized linear's per-input-channel scale is searched on the calibration samples
and folded into the op that produces the linear's input, in the model being converted, never as a runtime Mul.
A linear whose input producer cannot absorb a scale keeps s = 1 (the driver's AWQ clip search still applies),
with the reason.

  1. find (one forward on one sample, module hooks): the leaf module whose output tensor IS the linear's
     input (the same object, not equal values), directly or through one elementwise module (an activation, a
     Dropout); the linears reading that one tensor form a group and share one scale (q/k/v after a norm).
     BERT-style layers add value -> attention.output.dense (fold.bert_scale_groups): the attention product and
     the reshapes between them are functional, so hooks cannot follow them.
  2. prove: fold.fold_reason at module level (a norm with an affine weight, a Linear through nothing, a
     Dropout or a ReLU-like activation), then the graph. Hooks do not see functional readers of the
     producer's output (a residual add), so random positive scales are folded into a float64 copy and the
     model's outputs must not move (relative 1e-9; a residual reader moves them by ~1e-1, see
     tests/calibration/test_lowbit_awq.py). A group that fails keeps s = 1 and the plan says why.
  3. search (awq.AWQ per group, in one pass over the calibration samples on the FP32 model as the reference
     code does, padding rows masked as in the driver) and fold into the caller's module in place. The scales
     are powers of two (AWQ(power_of_two=True)), so the folded model computes the same FP32 numbers as before.

The driver then decides the codes on the folded model (calibration/lowbit/driver.py), so the plan's codes are
of the folded weights, and the converted model is the folded one.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeq.calibration.lowbit.awq import AWQ
from edgeq.calibration.lowbit.driver import Sample, _Runner, _to_device
from edgeq.calibration.lowbit.fold import LINEAR_PASSTHROUGH, NORMS, bert_scale_groups, fold_reason, fold_scales
from edgeq.calibration.lowbit.grid import Grid
from edgeq.compress.apply import user_fqn

EXACT_RELATIVE = 1e-9  # float64 drift an exact fold stays under (measured ~1e-16); inexact folds move ~1e-1
STATISTICS_BYTES = 1 << 30  # AWQ keeps a K x K matrix per group: groups share a search pass up to this much


@dataclass
class InputGroup:
    """Linears reading one tensor (FQNs as named_modules gives them), its producer, and the outcome."""

    consumers: tuple[str, ...]
    producer: str | None = None
    between: str | None = None  # an elementwise module between producer and consumers
    reason: str | None = None  # why nothing is folded (None: foldable, or folded)
    alpha: float | None = None  # after the search: the exponent chosen (0: s = 1, nothing to fold)
    scales: torch.Tensor | None = field(default=None, repr=False)

    def note(self) -> str:
        """What the plan says about this group, naming its layers by user FQN."""
        layers = ", ".join(user_fqn(c) for c in self.consumers)
        if self.reason is not None:
            return f"AWQ {layers}: input scale 1 (clip search only): {self.reason}"
        if not self.alpha:
            return f"AWQ {layers}: the scale search kept s = 1 (alpha 0): nothing folded"
        low, high = int(torch.log2(self.scales.min())), int(torch.log2(self.scales.max()))
        where = user_fqn(self.producer) + (f" (through {user_fqn(self.between)})" if self.between else "")
        return f"AWQ {layers}: input scales (alpha {self.alpha:.2f}, 2^{low}..2^{high}) folded into {where}"


def fold_awq_scales(
    module: nn.Module,
    samples: Sequence[Sample],
    layers: Mapping[str, Grid],
    *,
    input_names: Sequence[str] | None = None,
    row_mask: Callable[[Sample], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
    fixed: Collection[str] = (),
) -> list[InputGroup]:
    """Search AWQ scales for the linears `layers` (user FQN -> the grid its codes go on) and fold them into
    `module` IN PLACE where the fold is exact (pass a copy to keep the original). Returns every group reading
    one of those layers' inputs, folded or with the reason it is not; a group's search uses its first layer's
    grid. `fixed`: layers (user FQNs) whose codes are already decided on their present weight (int8 or palette
    layers of per-layer schemes): a group reading into one is not folded. `samples` as for
    driver.quantize_layers (re-iterable)."""
    if not samples:
        raise ValueError("AWQ needs calibration samples to search its scales")
    names = {user_fqn(name): name for name, _ in module.named_modules()}
    quantized = {names[fqn]: grid for fqn, grid in layers.items()}
    first = next(iter(samples))
    groups = find_groups(module, first, input_names, quantized)
    for group in groups:
        decided = [user_fqn(c) for c in group.consumers if user_fqn(c) in fixed]
        if decided and group.reason is None:
            group.reason = f"{', '.join(decided)} also reads this input and has its codes decided on the unscaled weight"
    check_exact(module, groups, first, input_names)
    foldable = [g for g in groups if g.reason is None]
    modules = dict(module.named_modules())
    for chunk in _chunks(foldable, modules, quantized):
        _search(module, chunk, quantized, samples, input_names, row_mask, torch.device(device))
    for group in foldable:
        if group.alpha:
            fold_scales(modules[group.producer], [modules[c] for c in group.consumers], group.scales.cpu(),
                        modules.get(group.between) if group.between else None)
    return groups


@dataclass
class _Tensor:
    """One tensor seen during the discovery forward: the leaf that produced it and the leaves that read it."""

    ref: weakref.ref
    producer: str | None = None
    readers: list[str] = field(default_factory=list)


def find_groups(module: nn.Module, sample: Sample, input_names: Sequence[str] | None, quantized: Mapping[str, object]) -> list[InputGroup]:
    """Step 1: the groups of linears sharing an input, for every linear in `quantized` (named_modules names),
    with their producer where one module makes that input; a reason where none does."""
    leaves = {name: m for name, m in module.named_modules() if next(m.children(), None) is None}
    seen: dict[int, _Tensor] = {}  # by id(); an entry whose referent died is replaced, never matched
    inputs: dict[str, list[_Tensor]] = {name: [] for name in leaves}

    def entry(tensor: torch.Tensor) -> _Tensor:
        found = seen.get(id(tensor))
        if found is None or found.ref() is not tensor:
            found = seen[id(tensor)] = _Tensor(weakref.ref(tensor))
        return found

    def read(name):
        def hook(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor):
                tensor = entry(x)
                tensor.readers.append(name)
                inputs[name].append(tensor)
        return hook

    def wrote(name):
        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor) and entry(output).producer is None:  # Identity, eval Dropout: the input
                entry(output).producer = name
        return hook

    handles = [m.register_forward_pre_hook(read(n), with_kwargs=True) for n, m in leaves.items()]
    handles += [m.register_forward_hook(wrote(n)) for n, m in leaves.items()]
    try:
        _call(module, sample, input_names, torch.device("cpu"))
    finally:
        for handle in handles:
            handle.remove()

    bert = {g.consumers: g for g in bert_scale_groups(module) if g.reason is None}
    groups: dict[int, InputGroup] = {}  # by the input tensor
    for name in leaves:
        if name not in quantized:
            continue
        calls = inputs[name]
        if len(calls) != 1:
            groups[id(calls)] = InputGroup((name,), reason=f"called {len(calls)} times per forward; one input scale cannot serve every call")
            continue
        tensor = calls[0]
        if id(tensor) in groups:
            continue
        # an Identity or eval Dropout returns this very tensor: its readers are already this tensor's readers
        consumers = tuple(dict.fromkeys(r for r in tensor.readers if not isinstance(leaves[r], LINEAR_PASSTHROUGH)))
        groups[id(tensor)] = _producer_of(InputGroup(consumers), tensor, leaves, inputs, bert)
    return list(groups.values())


def _producer_of(group: InputGroup, tensor: _Tensor, leaves: dict, inputs: dict, bert: dict) -> InputGroup:
    if group.consumers in bert:  # value -> attention.output.dense: through the attention product
        known = bert[group.consumers]
        group.producer, group.between = known.producer, known.between
        return group
    producer = tensor.producer
    if producer is None:
        group.reason = "the input is no module's output (a model input, or made by functional ops) to fold a scale into"
        return group
    if not isinstance(leaves[producer], (nn.Linear, *NORMS)) and len(inputs[producer]) == 1:
        before = inputs[producer][0].producer  # one elementwise module between: fold_reason judges it
        if before is not None and isinstance(leaves[before], (nn.Linear, *NORMS)):
            group.producer, group.between = before, producer
            return group
    group.producer = producer
    return group


def check_exact(module: nn.Module, groups: list[InputGroup], sample: Sample, input_names: Sequence[str] | None) -> None:
    """Step 2: set each group's reason unless folding into its producer is exact for the whole model."""
    modules = dict(module.named_modules())
    for group in groups:
        if group.reason is None:
            consumers = [modules[c] for c in group.consumers]
            probe = torch.ones(consumers[0].in_features if hasattr(consumers[0], "in_features") else 1)
            group.reason = fold_reason(modules[group.producer], consumers, probe, modules.get(group.between) if group.between else None)
    candidates = [g for g in groups if g.reason is None]
    if not candidates:
        return
    double = copy.deepcopy(module).double().eval()
    doubles = dict(double.named_modules())
    try:
        reference = _outputs(_call(double, sample, input_names, torch.device("cpu"), torch.float64))
    except Exception as exc:  # noqa: BLE001 - a model that cannot run in float64 gets no folds, with the reason
        for group in candidates:
            group.reason = f"the fold could not be checked: the model does not run in float64 ({type(exc).__name__}: {exc})"
        return
    generator = torch.Generator().manual_seed(0)
    for group in candidates:
        producer, consumers = doubles[group.producer], [doubles[c] for c in group.consumers]
        between = doubles.get(group.between) if group.between else None
        saved = [p.detach().clone() for m in (producer, *consumers) for p in m.parameters(recurse=False)]
        scales = torch.exp(torch.rand(consumers[0].in_features, generator=generator, dtype=torch.float64) * 2 - 1)
        fold_scales(producer, consumers, scales, between)
        folded = _outputs(_call(double, sample, input_names, torch.device("cpu"), torch.float64))
        with torch.no_grad():
            for p, value in zip((p for m in (producer, *consumers) for p in m.parameters(recurse=False)), saved):
                p.copy_(value)
        drift = max(float((a - b).norm() / b.norm().clamp(min=1e-300)) for a, b in zip(folded, reference))
        if not drift < EXACT_RELATIVE:
            group.reason = (
                f"folding into {user_fqn(group.producer)} changes the model's outputs (relative {drift:.1e} in float64): "
                "its output has another reader the fold does not compensate (e.g. a residual connection)"
            )


def _chunks(groups: list[InputGroup], modules: dict, quantized: Mapping[str, Grid]) -> list[list[InputGroup]]:
    """Groups whose search shares one pass, so that their statistics stay within STATISTICS_BYTES."""
    chunks: list[list[InputGroup]] = []
    used = STATISTICS_BYTES
    for group in groups:
        if not any(c in quantized for c in group.consumers):
            continue
        size = 8 * modules[group.consumers[0]].in_features ** 2
        if used + size > STATISTICS_BYTES and (not chunks or chunks[-1]):
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += size
    return chunks


def _search(module, groups, quantized, samples, input_names, row_mask, device) -> None:
    """Step 3's search for `groups`: one pass over the samples on a copy of the FP32 model on `device`."""
    model = copy.deepcopy(module).to(device).eval()
    modules = dict(model.named_modules())
    runner = _Runner(model, samples, input_names, device, row_mask)
    solvers, handles = {}, []
    for group in groups:
        names = [c for c in group.consumers if c in quantized]
        layers = [modules[c] for c in names]
        solver = solvers[id(group)] = AWQ([layer.weight for layer in layers], quantized[names[0]], name=user_fqn(names[0]),
                                          power_of_two=True)

        def feed(layer, args, kwargs, solver=solver, fqn=names[0]):
            solver.add_batch(runner.rows(fqn, layer, (args[0] if args else kwargs["input"]).detach()))

        handles.append(layers[0].register_forward_pre_hook(feed, with_kwargs=True))
    try:
        runner.run()
    finally:
        for handle in handles:
            handle.remove()
    for group in groups:
        result = solvers[id(group)].solve()
        group.alpha, group.scales = result.alpha, result.scales.cpu()


def _call(module: nn.Module, sample: Sample, input_names, device: torch.device, dtype: torch.dtype | None = None):
    inputs = _to_device(sample, device)
    if dtype is not None:
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return module(**inputs) if input_names is None else module(*(inputs[n] for n in input_names))


def _outputs(value) -> list[torch.Tensor]:
    """Every floating tensor in a model's output (tensors, tuples, lists, dicts, ModelOutput), in order."""
    if isinstance(value, torch.Tensor):
        return [value.double()] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _outputs(item)]
    return []
