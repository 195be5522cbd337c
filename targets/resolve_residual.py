"""Which linear layers feed a residual add, read from one PyTorch forward pass.

A transformer's attention output projection and FFN down-projection write into the residual stream
(`LayerNorm(dense(x) + residual)` in BERT, `h + o_proj(...)` in LLaMA). Their outputs carry the stream's outlier
channels, so a static per-tensor int8 *output* range is where a TFLite w8a8 island loses most (MiniLM: every linear
an island 0.949 mean cosine; these 12 as the hybrid kernel 0.994 at the same speed; docs/research/tflite-w8a8-speed.md).

Found from the graph, not from names: during one forward on the example inputs, a TorchFunctionMode sees every
torch call, follows each tensor's ancestry, and marks a linear whose output (directly, or through dropout,
reshapes or a constant scale) is added to a tensor its own input derives from: the skip path of a residual block.
Two linear outputs added to each other (a recurrent cell's input and hidden terms) are not a residual add.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__}
# Calls whose output holds the values of their first argument (eval mode), so a linear's output keeps its origin.
_SAME_VALUES = {
    torch.nn.functional.dropout, torch.dropout, torch.Tensor.contiguous, torch.Tensor.view, torch.Tensor.reshape,
    torch.reshape, torch.Tensor.clone, torch.Tensor.to,
}
_SCALES = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}  # layer scale: gamma * dense(x)


class _Lineage(TorchFunctionMode):
    """Per tensor seen in the forward: the serial numbers of the tensors it derives from, and the linear layer whose
    output it is, if any. Tensors are numbered through a weak map, so none is kept alive for this (a large model's
    activations would be) and a freed tensor's number is never given to another."""

    def __init__(self):
        super().__init__()
        self.serials = WeakIdKeyDictionary()
        self.numbers = itertools.count(1)
        self.ancestors: dict[int, frozenset[int]] = {}
        self.origin: dict[int, str] = {}  # serial -> FQN of the linear whose output the tensor holds
        self.inputs: dict[str, list[int]] = {}  # FQN -> serials of the tensors it was called on
        self.residual: set[str] = set()

    def serial(self, tensor: torch.Tensor) -> int:
        if tensor not in self.serials:
            self.serials[tensor] = next(self.numbers)
            self.ancestors[self.serials[tensor]] = frozenset()
        return self.serials[tensor]

    def lineage(self, tensor: torch.Tensor) -> frozenset[int]:
        number = self.serial(tensor)
        return self.ancestors[number] | {number}  # the tensor and what it derives from

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)  # the mode is off inside its own handler: nested calls are not seen
        operands = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in _ADDS and len(operands) == 2:
            self._check_residual(*operands)
        derived = frozenset().union(*(self.lineage(t) for t in operands)) if operands else frozenset()
        source = self._value_source(func, operands)
        origin = self.origin.get(self.serial(source)) if source is not None else None
        for out in (t for t in tree_leaves(result) if isinstance(t, torch.Tensor)):
            number = self.serial(out)
            self.ancestors[number] = derived - {number}  # an in-place op's output is one of its operands
            if origin is not None:
                self.origin[number] = origin
        return result

    @staticmethod
    def _value_source(func, operands: list[torch.Tensor]) -> torch.Tensor | None:
        """The operand whose values the call's output holds, up to a constant scale; None for any other call."""
        if func in _SAME_VALUES and operands:
            return operands[0]
        activations = [t for t in operands if not isinstance(t, nn.Parameter)]  # gamma * x: a layer scale
        return activations[0] if func in _SCALES and len(activations) == 1 else None

    def _check_residual(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape != b.shape:
            return
        for out, other in ((a, b), (b, a)):
            fqn = self.origin.get(self.serial(out))
            if fqn is None or self.serial(other) in self.origin:  # two linear outputs summed: not a skip path
                continue
            skip = self.serial(other)
            if any(skip in self.ancestors.get(i, frozenset()) | {i} for i in self.inputs.get(fqn, [])):
                self.residual.add(fqn)

    def hook(self, fqn: str):
        def record(_module, args, output):
            if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                self.inputs.setdefault(fqn, []).append(self.serial(args[0]))
                self.origin[self.serial(output)] = fqn
        return record


def residual_linears(module: nn.Module, linears: dict[str, nn.Module], example_inputs: tuple) -> list[str]:
    """The FQNs of `linears` (FQN -> nn.Linear of `module`) whose output feeds a residual add in a forward pass
    of `module` on `example_inputs`, in `linears`' order."""
    mode = _Lineage()
    handles = [layer.register_forward_hook(mode.hook(fqn)) for fqn, layer in linears.items()]
    try:
        with torch.no_grad(), mode:
            module(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [fqn for fqn in linears if fqn in mode.residual]
