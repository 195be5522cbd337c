"""LoadedModel: the one shape every model source is turned into before conversion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from edgeq.signature import TensorSpec


@dataclass(frozen=True)
class SourceInfo:
    """Where a model came from, for the manifest."""

    kind: str  # callable | torchscript | export | huggingface | state_dict
    location: str  # what the user typed (a path or package.module:callable)
    sha256: str  # of the files read, or of the weights for a callable


@dataclass
class LoadedModel:
    """An eval-mode module taking positional tensors in `inputs` order and returning a tuple in `outputs` order.

    `example_inputs` match `inputs`; `tokenizer` is set for text models (used to turn text data into inputs).
    """

    name: str
    module: torch.nn.Module
    inputs: list[TensorSpec]
    outputs: list[str]
    example_inputs: tuple[torch.Tensor, ...]
    source: SourceInfo
    task: str | None = None
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]
