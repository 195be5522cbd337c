"""Calibration passes: run the FP32 model over calibration samples and watch the inputs and outputs of
chosen layers through forward hooks. Only statistics are kept (observers, per-channel maxima), never the
activations themselves, so memory stays flat however many samples are used. Samples are taken one at a
time from any iterable (a list, or a sequence that loads each sample when asked), once per pass: a pass holds
one sample, its outputs and the observers' fixed-size state, never the whole set's activations.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from edgeq.compress.apply import user_fqn

Sample = dict[str, np.ndarray]
# (user FQN, layer input, layer output) for one call of a watched layer
Watcher = Callable[[str, torch.Tensor, torch.Tensor], None]


def run_module(
    module: nn.Module,
    samples: Iterable[Sample],
    input_names: list[str],
    output_names: list[str] | None = None,
    description: str = "running",
    each_sample: Callable[[Sample], None] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Call `module` on every sample (no grad, a progress bar on a terminal), after `each_sample(sample)` if
    given. With `output_names`, return each call's outputs by name as float32 arrays; without, keep nothing
    (calibration passes only need the hooks)."""
    from rich.progress import track

    results = []
    with torch.no_grad():
        for sample in track(samples, description=description, transient=True, disable=not sys.stderr.isatty()):
            if each_sample is not None:
                each_sample(sample)
            outputs = module(*(torch.from_numpy(np.ascontiguousarray(sample[name])) for name in input_names))
            if output_names is not None:
                results.append({name: out.detach().float().numpy() for name, out in zip(output_names, outputs)})
    return results


def watch(
    module: nn.Module,
    fqns: set[str],
    samples: Iterable[Sample],
    input_names: list[str],
    watcher: Watcher,
    description: str,
    each_sample: Callable[[Sample], None] | None = None,
) -> None:
    """Run the calibration samples with `watcher` called on every watched layer's (input, output), and
    `each_sample` on each sample first (what the model inputs themselves need, in the same pass)."""
    handles = []
    for fqn, child in module.named_modules():
        name = user_fqn(fqn)
        if name in fqns:
            hook = lambda _m, args, out, name=name: watcher(name, args[0].detach(), out.detach())  # noqa: E731
            handles.append(child.register_forward_hook(hook))
    try:
        run_module(module, samples, input_names, description=description, each_sample=each_sample)
    finally:
        for handle in handles:
            handle.remove()


def called_modules(module: nn.Module, example_inputs: tuple, select: Callable[[str, nn.Module], bool]) -> list[str]:
    """User FQNs of the selected submodules that one forward pass on `example_inputs` calls and that return a
    float tensor, in call order."""
    called: dict[str, None] = {}

    def hook(name):
        def record(_module, _args, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                called.setdefault(name)
        return record

    handles = [child.register_forward_hook(hook(user_fqn(fqn))) for fqn, child in module.named_modules() if fqn and select(fqn, child)]
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return list(called)


def input_channel_absmax(module: nn.Module, fqns: set[str], samples: Iterable[Sample], input_names: list[str]) -> dict[str, np.ndarray]:
    """max |x| per input channel (the last axis) of each watched linear layer's input: SmoothQuant's statistic."""
    maxima: dict[str, torch.Tensor] = {}

    def record(fqn: str, x: torch.Tensor, _y: torch.Tensor) -> None:
        current = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
        maxima[fqn] = torch.maximum(maxima[fqn], current) if fqn in maxima else current

    watch(module, fqns, samples, input_names, record, "calibration: channel ranges")
    return {fqn: value.float().numpy() for fqn, value in maxima.items()}
