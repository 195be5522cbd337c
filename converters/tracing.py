"""What the converters share around tracing: dynamic-shape specs, the frozen-axes note, quiet toolchains."""

from __future__ import annotations

import contextlib
import io

import torch

from edgeq.load import LoadedModel
from edgeq.targets import TargetProfile


@contextlib.contextmanager
def quiet():
    """Toolchains print progress bars and summaries on stdout/stderr; edgeq reports what matters itself."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def shape_notes(model: LoadedModel, profile: TargetProfile) -> list[str]:
    """The manifest note for a static-shape target given dynamic axes (they are traced at their example size)."""
    if profile.dynamic_shapes or not any(spec.dynamic_axes for spec in model.inputs):
        return []
    return [f"dynamic axes frozen at their example sizes (target {profile.id} takes static shapes)"]


def dynamic_examples(model: LoadedModel) -> tuple[tuple[torch.Tensor, ...], tuple | None]:
    """Examples and torch.export dynamic_shapes for the declared dynamic axes.

    torch.export specialises axes of size 0 or 1, so a dynamic axis whose example size is 1 is traced at
    size 2 (its values repeated); the artifact still accepts size 1.
    """
    if not any(spec.dynamic_axes for spec in model.inputs):
        return model.example_inputs, None
    dims: dict[str, torch.export.Dim] = {}
    tensors, shapes = [], []
    for spec, tensor in zip(model.inputs, model.example_inputs):
        axes = {}
        for axis, name in spec.dynamic_axes.items():
            axes[axis] = dims.setdefault(name, torch.export.Dim(name))
            if tensor.shape[axis] == 1:
                tensor = torch.cat([tensor, tensor], dim=axis)
        tensors.append(tensor)
        shapes.append(axes or None)
    # FlatModel.forward(*args): the specs of a var-positional argument go in one tuple.
    return tuple(tensors), (tuple(shapes),)
