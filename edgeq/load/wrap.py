"""Give any module one calling convention: positional tensors in, a flat tuple of named tensors out.

Converters and validation then never care whether the user's model returned a tensor, a tuple, a dict or
a Hugging Face `ModelOutput`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from edgeq.errors import SourceError


def flatten_outputs(value, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Name every tensor in a (nested) model output: dict keys, `output_0..n` for sequences."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, Mapping):  # includes transformers' ModelOutput
        pairs = []
        for key, item in value.items():
            if item is None:
                continue
            name = str(key) if prefix == "output" else f"{prefix}.{key}"
            pairs.extend(flatten_outputs(item, name))
        return pairs
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 1:
            return flatten_outputs(value[0], prefix)
        pairs = []
        for index, item in enumerate(value):
            pairs.extend(flatten_outputs(item, f"{prefix}_{index}"))
        return pairs
    if value is None:
        return []
    raise SourceError(
        f"the model returned a {type(value).__name__} where edgeq expects tensors, or tuples/dicts of "
        "tensors; wrap the model so its forward returns tensors"
    )


class FlatModel(torch.nn.Module):
    """Calls `inner` with positional (or, for `keyword_names`, keyword) inputs; returns a flat tuple.

    `input_quant`, when set (compress.apply for full-integer plans), holds one module per input, applied
    before `inner`: the model's inputs are quantized at this boundary.
    """

    def __init__(self, inner: torch.nn.Module, keyword_names: list[str] | None = None):
        super().__init__()
        self.inner = inner
        self.keyword_names = keyword_names
        self.input_quant: torch.nn.ModuleList | None = None

    def train(self, mode: bool = True):
        self.training = mode
        try:
            self.inner.train(mode)
        except NotImplementedError:  # torch.export programs' modules have their mode fixed at export
            pass
        return self

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.input_quant is not None:
            args = tuple(quant(arg) for quant, arg in zip(self.input_quant, args))
        if self.keyword_names:
            out = self.inner(**dict(zip(self.keyword_names, args)))
        else:
            out = self.inner(*args)
        return tuple(tensor for _, tensor in flatten_outputs(out))


def output_names_of(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[str]:
    """Run the model once on its example inputs and name its outputs."""
    inner = module.inner if isinstance(module, FlatModel) else module
    keywords = module.keyword_names if isinstance(module, FlatModel) else None
    with torch.no_grad():
        out = inner(**dict(zip(keywords, example_inputs))) if keywords else inner(*example_inputs)
    names = [name for name, _ in flatten_outputs(out)]
    if not names:
        raise SourceError("the model returned no tensors for its example inputs")
    return names
