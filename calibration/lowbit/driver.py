"""The layer-by-layer driver every low-bit algorithm runs under (RTN, GPTQ, AWQ, k-means palettes).

Layers are solved in forward order on a copy of the model. Each layer's solver is fed that layer's inputs
while the model runs with every earlier layer already quantized ("sequential": a layer compensates for the
error its quantized predecessors made, as in GPTQ's and AWQ's drivers), batch by batch as the samples go
through (only the solver's fixed-size state is kept, e.g. GPTQ's K x K Hessian, never the activations). Then
the layer's dequantized weight is written into the copy and the driver moves on.

Cost: one calibration pass per stage. Consecutive layers that receive the very same input tensor (q/k/v of an
attention block, the gates of a gated MLP) cannot feed each other, so they share a stage and a pass. A pass
stops as soon as the stage's layers have seen their inputs (the rest of the model is not run), so on average
a pass costs about half a forward.

Solver contract: `solver(fqn, module)` makes one object per layer with
    add_batch(rows)   rows: [M, K] float, the layer's inputs laid out to match `layer_weight(module)` [N, K]
                      (a linear's tokens; a conv's unfolded patches), on the driver's device
    solve() -> LowBitWeight
and optionally `needs_inputs` (False: the driver skips feeding it, and a stage where no solver needs inputs
costs no pass, e.g. plain RTN) and `summary() -> dict[str, float]` (kept in the result, e.g. GPTQ's errors).
"""

from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.rtn import RTN, LowBitWeight
from edgeq.compress.apply import user_fqn

Sample = Mapping[str, Any]  # input name -> np.ndarray or torch.Tensor


class Solver(Protocol):
    def add_batch(self, rows: torch.Tensor) -> None: ...

    def solve(self) -> LowBitWeight: ...


SolverFactory = Callable[[str, nn.Module], Solver]


@dataclass
class LayerwiseResult:
    """What the driver did: the quantized copy of the model (dequantized weights written in), each layer's
    LowBitWeight, and timings in seconds (per layer: its share of its stage's pass plus its solve)."""

    module: nn.Module
    weights: dict[str, LowBitWeight] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    summaries: dict[str, dict[str, float]] = field(default_factory=dict)  # a solver's optional summary()
    stages: list[list[str]] = field(default_factory=list)
    passes: int = 0
    total_seconds: float = 0.0


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the [N out, K in] matrix the algorithms quantize (a conv's [N, C*kh*kw])."""
    return module.weight.detach().reshape(module.weight.shape[0], -1)


def check_layer(fqn: str, module: nn.Module) -> None:
    """Raise a ValueError naming the layer if the driver cannot lay its inputs out against its weight."""
    if isinstance(module, nn.Linear):
        return
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError(
                f"{fqn}: Conv2d with groups={module.groups}, padding={module.padding!r}, padding_mode={module.padding_mode!r}; "
                "low-bit calibration handles groups=1 with numeric zero padding (leave this layer in float or int8)"
            )
        return
    raise ValueError(f"{fqn}: {type(module).__name__} is not a layer low-bit calibration handles (nn.Linear, nn.Conv2d)")


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input `x` as rows [M, K] matching `layer_weight(module)` (y = rows @ W^T)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # [B, C*kh*kw, L] -> [B*L, C*kh*kw]
    return x.reshape(-1, x.shape[-1])


def rtn_solver(grid: Grid, clip: str = "minmax", weighted: bool = False) -> SolverFactory:
    """Round-to-nearest on `grid` (see calibration.lowbit.rtn); `weighted` weights the clip search by diag(H)."""
    return lambda fqn, module: RTN(layer_weight(module), grid, clip=clip, weighted=weighted)


class KnownCodes:
    """A layer whose weight already lies on the plan's grid (a source's own 4-bit codes, edgeq/llm/source_grid.py):
    its codes verbatim, its scales made representable in the grid's scale dtype (a float16 scale on a bfloat16
    grid is rounded to the nearest; the codes then round back to themselves since |code| * 2^-8 < 1/2, and the
    weight moves by at most |code| * |rounded - scale|). Needs no calibration pass. Nearest, not up: rounding
    every scale up biases every weight of SmolLM2-135M the same way (PyTorch, 24 STS-B sentences: top-1 vs FP32
    0.971 rounded up, 1.000 to nearest)."""

    needs_inputs = False

    def __init__(self, weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, grid: Grid):
        self.W, self.codes, self.scale, self.grid = weight.detach().float(), codes, scale.float(), grid

    def add_batch(self, rows: torch.Tensor) -> None:
        return None

    def solve(self) -> LowBitWeight:
        if self.codes.shape != self.W.shape or self.scale.shape != (self.W.shape[0], self.grid.groups(self.W.shape[1])):
            raise ValueError(f"source codes {tuple(self.codes.shape)} / scales {tuple(self.scale.shape)} do not fit "
                             f"the weight {tuple(self.W.shape)} on {self.grid}")
        scale = self.grid.nearest_representable(self.scale)
        zero = torch.zeros_like(scale)
        codes = self.grid.quantize(self.W, scale, zero)
        if not torch.equal(codes, self.codes.float()):
            raise ValueError("source codes do not round back to themselves on the grid's scales")
        return LowBitWeight(codes.to(torch.int8), scale, zero, self.grid)


def known_codes_solver(grid: Grid, fallback: SolverFactory) -> SolverFactory:
    """`fallback`, except for layers carrying their own symmetric codes and scales (`edgeq_source_codes`) whose
    group size and bits are the grid's: those keep them (KnownCodes)."""

    def make(fqn: str, module: nn.Module) -> Solver:
        known = getattr(module, "edgeq_source_codes", None)
        if known is not None and grid.symmetric and grid.bits == 4 and grid.group_size is not None:
            codes, scale = known
            if scale.shape[1] * grid.group_size == codes.shape[1]:
                return KnownCodes(layer_weight(module), codes, scale, grid)
        return fallback(fqn, module)

    return make


def gptq_solver(grid: Grid, **options) -> SolverFactory:
    """GPTQ on `grid`; `options` are GPTQ.solve's (percdamp, blocksize, actorder, static_groups, clip)."""
    from edgeq.calibration.lowbit.gptq import GPTQ

    class _GPTQLayer(GPTQ):
        def solve(self) -> LowBitWeight:  # the driver's no-argument solve
            return super().solve(grid, **options)

    return lambda fqn, module: _GPTQLayer(layer_weight(module), name=fqn)


class _StageDone(Exception):
    """Raised from a hook once the stage's layers have seen this sample: the rest of the forward is not needed."""


def _to_device(sample: Sample, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        name: (value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))).to(device)
        for name, value in sample.items()
    }


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


class _Runner:
    """Calls the model on samples the way calibration/collect.py does (positionally in `input_names` order, or
    by keyword without them), with no grad, on the driver's device."""

    def __init__(self, module: nn.Module, samples: Iterable[Sample], input_names: Sequence[str] | None, device: torch.device,
                 row_mask: Callable[[Sample], torch.Tensor] | None):
        self.module, self.samples, self.input_names, self.device, self.row_mask = module, samples, input_names, device, row_mask
        self.mask: torch.Tensor | None = None

    def run(self, on_sample: Callable[[], None] = lambda: None) -> None:
        with torch.no_grad():
            for sample in self.samples:
                self.mask = None if self.row_mask is None else torch.as_tensor(self.row_mask(sample)).to(self.device, torch.bool)
                inputs = _to_device(sample, self.device)
                on_sample()
                try:
                    if self.input_names is None:
                        self.module(**inputs)
                    else:
                        self.module(*(inputs[name] for name in self.input_names))
                except _StageDone:
                    pass

    def rows(self, fqn: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None and isinstance(layer, nn.Linear) and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            return x[self.mask]
        return layer_rows(layer, x)


def _discover(runner: _Runner, layers: dict[str, nn.Module]) -> tuple[list[list[str]], dict[str, int]]:
    """One forward on the first sample: the layers' call order grouped into stages (consecutive calls on the
    very same input tensor), and how many times each layer is called per forward."""
    calls: list[tuple[str, bool]] = []  # (layer, whether its input is the previous call's input tensor)
    counts = dict.fromkeys(layers, 0)
    previous: list[weakref.ref] = []  # a weak reference: the check must not keep activations alive

    def hook(fqn):
        def record(_layer, args, kwargs):
            x = _first_input(args, kwargs)
            calls.append((fqn, bool(previous) and previous[0]() is x))
            previous[:] = [weakref.ref(x)]
            counts[fqn] += 1
        return record

    handles = [layer.register_forward_pre_hook(hook(fqn), with_kwargs=True) for fqn, layer in layers.items()]
    first = runner.samples
    try:
        runner.samples = [next(iter(first))]
        runner.run()
    except StopIteration:
        raise ValueError("low-bit calibration needs at least one calibration sample") from None
    finally:
        runner.samples = first
        for handle in handles:
            handle.remove()
    missing = [fqn for fqn, count in counts.items() if count == 0]
    if missing:
        raise ValueError(f"layers never called by the model's forward, so they cannot be calibrated: {', '.join(missing)}")
    stages: list[list[str]] = []
    seen: set[str] = set()
    for fqn, same_input in calls:
        if fqn in seen:  # a layer called again later (shared weights) is solved at its first call
            continue
        seen.add(fqn)
        if stages and same_input:
            stages[-1].append(fqn)
        else:
            stages.append([fqn])
    return stages, counts


def quantize_layers(
    module: nn.Module,
    samples: Iterable[Sample],
    fqns: Sequence[str],
    solver: SolverFactory,
    *,
    input_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    sequential: bool = True,
    row_mask: Callable[[Sample], torch.Tensor] | None = None,
) -> LayerwiseResult:
    """Quantize the layers `fqns` (user FQNs of nn.Linear / nn.Conv2d) of a COPY of `module`, in forward order.

    samples: a re-iterable of {input name: array or tensor}, iterated once per pass (a list, or a sequence
        that loads each sample when asked; not a one-shot generator). Called as module(*[sample[n] for n in input_names]), or module(**sample)
        when `input_names` is None.
    solver: the per-layer algorithm (`rtn_solver`, `gptq_solver`, ...; see the module docstring).
    sequential: True feeds each layer the outputs of the already-quantized layers before it; False feeds
        every layer the FP32 model's activations (one pass for all layers; a baseline, not the default).
    row_mask: sample -> bool tensor over a linear's leading input dims ([batch, tokens]): only those rows
        reach the solvers (e.g. the attention mask, so padding tokens do not shape the Hessian). A linear
        whose input has other leading dims (after pooling: [batch]) gets all its rows.
    device: where the copy, the samples and the solvers' state live ("cpu" or "cuda").
    """
    started = time.perf_counter()
    device = torch.device(device)
    model = copy.deepcopy(module).to(device).eval()
    by_name = {user_fqn(name): child for name, child in model.named_modules()}
    unknown = [fqn for fqn in fqns if fqn not in by_name]
    if unknown:
        raise ValueError(f"no such layers in the model: {', '.join(unknown)}")
    layers = {fqn: by_name[fqn] for fqn in fqns}
    for fqn, layer in layers.items():
        check_layer(fqn, layer)

    runner = _Runner(model, samples, input_names, device, row_mask)
    stages, counts = _discover(runner, layers)
    if not sequential:
        stages = [[fqn for stage in stages for fqn in stage]]
    result = LayerwiseResult(module=model, stages=stages)
    for stage in stages:
        solvers = {fqn: solver(fqn, layers[fqn]) for fqn in stage}
        pass_seconds = 0.0
        fed = [fqn for fqn in stage if getattr(solvers[fqn], "needs_inputs", True)]
        if fed:
            pass_started = time.perf_counter()
            _feed(runner, {fqn: layers[fqn] for fqn in fed}, solvers, counts)
            pass_seconds = time.perf_counter() - pass_started
            result.passes += 1
        for fqn in stage:
            solve_started = time.perf_counter()
            layer_solver = solvers.pop(fqn)
            weight = layer_solver.solve()
            if callable(getattr(layer_solver, "summary", None)):
                result.summaries[fqn] = layer_solver.summary()
            layer = layers[fqn]
            layer.weight.data.copy_(weight.dequantize().reshape(layer.weight.shape).to(layer.weight.dtype))
            result.weights[fqn] = weight
            result.seconds[fqn] = pass_seconds / len(stage) + time.perf_counter() - solve_started
    result.total_seconds = time.perf_counter() - started
    return result


def _feed(runner: _Runner, layers: dict[str, nn.Module], solvers: dict[str, Solver], counts: dict[str, int]) -> None:
    """One pass over the samples feeding each layer's inputs to its solver; each sample's forward stops once
    every layer here has had its calls (nothing after them is needed)."""
    seen = dict.fromkeys(layers, 0)

    def reset():
        for fqn in seen:
            seen[fqn] = 0

    def hook(fqn):
        def feed(layer, args, kwargs):
            solvers[fqn].add_batch(runner.rows(fqn, layer, _first_input(args, kwargs).detach()))
            seen[fqn] += 1
            if all(seen[name] >= counts[name] for name in seen):
                raise _StageDone
        return feed

    handles = [layer.register_forward_pre_hook(hook(fqn), with_kwargs=True) for fqn, layer in layers.items()]
    try:
        runner.run(on_sample=reset)
    finally:
        for handle in handles:
            handle.remove()
