"""What the structured pruning stages (prune_structured.py, prune_heads.py) share: calibration samples as
tensors, layer names as plans spell them, and the check that a pruned module still exports with the same
output shapes and finite outputs. A pruned model that fails the check is refused before any converter sees it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from edgeq.errors import ConversionError

_WRAPPER_PREFIX = "inner."  # edgeq's FlatModel wrapper; plans, reports and refusals use the user's own FQNs


def user_fqn(fqn: str) -> str:
    return fqn.removeprefix(_WRAPPER_PREFIX)


def module_names(module: nn.Module) -> dict[nn.Module, str]:
    """Module -> its user FQN (the first name of a module that appears twice)."""
    names: dict[nn.Module, str] = {}
    for fqn, child in module.named_modules():
        names.setdefault(child, user_fqn(fqn))
    return names


def as_example_tuple(example_inputs, input_names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """Example inputs as the positional tuple edgeq's modules take (a dict is read in `input_names` order)."""
    if isinstance(example_inputs, Mapping):
        return tuple(example_inputs[name] for name in input_names)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def sample_tensors(calibration: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str],
                   example_inputs: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """Calibration samples as positional tensor tuples; the example inputs when there are no samples."""
    if not calibration:
        return [example_inputs]
    return [tuple(torch.from_numpy(np.ascontiguousarray(sample[name])) for name in input_names) for sample in calibration]


def output_tensors(value) -> list[torch.Tensor]:
    """Every tensor of a module's output (tuple, dict or tensor), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [tensor for item in value for tensor in output_tensors(item)]
    return []


def output_shapes(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(t.shape) for t in output_tensors(module(*example_inputs))]


@contextmanager
def gradients_on(module: nn.Module) -> Iterator[None]:
    """Autograd on and every parameter requiring grad, for as long as the block runs: Torch-Pruning traces the
    graph through grad_fn and Taylor scores need dL/dw, even when the caller runs under no_grad or froze weights.
    The flags are restored afterwards."""
    frozen = [p for p in module.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def keep_requires_grad(original: nn.Module, pruned: nn.Module) -> None:
    """Give the pruned copy's parameters (new tensors where a layer shrank) the original's requires_grad flags."""
    flags = {name: p.requires_grad for name, p in original.named_parameters()}
    for name, p in pruned.named_parameters():
        p.requires_grad_(flags.get(name, p.requires_grad))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_problem(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], expected: list[tuple[int, ...]]) -> str | None:
    """Why the module's forward is no longer the model's (error, output shapes, non-finite values), or None."""
    try:
        with torch.no_grad():
            outputs = output_tensors(module(*example_inputs))
    except Exception as exc:  # any failure of user code after the edit is the finding we report
        return f"the forward fails: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    shapes = [tuple(t.shape) for t in outputs]
    if shapes != expected:
        return f"the output shapes change from {expected} to {shapes}"
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in outputs):
        return "the outputs are no longer finite"
    return None


def export_problem(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> str | None:
    """Why torch.export cannot export the module on its example inputs (what every converter starts from), or None."""
    try:
        torch.export.export(module, example_inputs, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"torch.export fails: {type(exc).__name__}: {first}"
    return None


def verify_pruned(pruned: nn.Module, original: nn.Module, example_inputs: tuple[torch.Tensor, ...],
                  expected: list[tuple[int, ...]], what: str) -> None:
    """Re-export `pruned` and check its output shapes; raise ConversionError naming `what` if either fails.
    When the original model does not export either, the fault is not the pruning's and the pipeline's own
    export names it, so only the forward is held to account here."""
    problem = forward_problem(pruned, example_inputs, expected)
    if problem is None:
        problem = export_problem(pruned, example_inputs)
        if problem is not None and export_problem(original, example_inputs) is not None:
            problem = None
    if problem is not None:
        raise ConversionError(f"{what}: after pruning {problem}; nothing was exported")
