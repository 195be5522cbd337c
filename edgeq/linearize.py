"""Before a quantized plan: rebuild the modules whose weights only a fused or functional op reads (recurrent
layers, their cells, nn.MultiheadAttention) from nn.Linear layers (edgeq.rewrite_recurrent, rewrite_attention),
so the plan, the three converters, weight parity and the footprint see ordinary linear layers.

Each rewrite computes the same function with the same numbers (tests/test_layer_coverage.py proves it per
module kind; validation proves it on each artifact). The FP32 reference stays the original module. A module that
cannot be rebuilt exactly keeps its weights float, with the reason in the plan:
  - a recurrent layer whose sequence length follows a dynamic input axis on a target that keeps dynamic shapes
    (ONNX): the unrolled recurrence fixes the length it is traced with, and the artifact would then refuse
    every other length; declaring the axis static quantizes it (targets that freeze dynamic axes, TFLite and
    Core ML, fix the length anyway);
  - a recurrent layer fed a PackedSequence; nn.MultiheadAttention with add_bias_kv or add_zero_attn;
  - a module a --keep-float pattern names exactly (its FQN before the rewrite).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeq.compress.apply import user_fqn
from edgeq.rewrite_attention import LinearAttention, attention_refusal
from edgeq.rewrite_recurrent import CELLS, RECURRENT, LinearCell, LinearRecurrent

REBUILT = (*RECURRENT, *CELLS, nn.MultiheadAttention)


@dataclass
class Linearized:
    module: nn.Module  # the model to plan and convert (the input itself when nothing was rebuilt)
    notes: list[str] = field(default_factory=list)  # one per rebuilt module kind, for the plan notes
    floats: dict[str, str] = field(default_factory=dict)  # user parameter name -> why it stays float
    keep_float: list[str] = field(default_factory=list)  # the patterns left for the plan (module FQNs consumed)


def linearize(module: nn.Module, example_inputs: tuple | None, inputs=(), dynamic_shapes: bool = False,
              keep_float: list[str] = ()) -> Linearized:
    """Rebuild every recurrent layer, cell and nn.MultiheadAttention of `module` that can be rebuilt exactly (on a
    copy). `inputs`: the model's TensorSpecs (their dynamic axes); `dynamic_shapes`: the target keeps them."""
    found = [(fqn, child) for fqn, child in module.named_modules() if fqn and isinstance(child, REBUILT)]
    found = [(fqn, child) for fqn, child in found if not any(fqn.startswith(f"{outer}.") for outer, _ in found)]
    result = Linearized(module, keep_float=list(keep_float))
    if not found:
        return result
    lengths = _sequence_lengths(module, example_inputs, [c for _, c in found if isinstance(c, RECURRENT)])
    grown = {}
    if dynamic_shapes and any(spec.dynamic_axes for spec in inputs) and any(isinstance(c, RECURRENT) for _, c in found):
        grown = _sequence_lengths(module, _grown(example_inputs, inputs), [c for _, c in found if isinstance(c, RECURRENT)])
    rebuilt: dict[str, list[str]] = {}
    plans = []
    for fqn, child in found:
        name = user_fqn(fqn)
        reason = _refusal(name, child, lengths, grown, inputs, result.keep_float)
        if reason is not None:
            result.floats.update({f"{name}.{p}": reason for p, _ in child.named_parameters()})
            continue
        plans.append((fqn, child))
    if not plans:
        return result
    copied = copy.deepcopy(module)
    for fqn, child in plans:
        parent_name, _, attribute = fqn.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        original = getattr(parent, attribute)
        replacement = LinearAttention(original) if isinstance(child, nn.MultiheadAttention) else (
            LinearRecurrent(original) if isinstance(child, RECURRENT) else LinearCell(original))
        setattr(parent, attribute, replacement.train(original.training))
        rebuilt.setdefault(type(child).__name__, []).append(user_fqn(fqn))
    for encoder in copied.modules():  # its nested-tensor fast path reads layers[0].self_attn.in_proj_weight
        if isinstance(encoder, nn.TransformerEncoder) and any(isinstance(m, LinearAttention) for m in encoder.modules()):
            encoder.use_nested_tensor = False
    result.module = copied
    for kind, names in rebuilt.items():
        shape = "q_proj, k_proj, v_proj, out_proj" if kind == "MultiheadAttention" else (
            "ih, hh per cell" if kind.endswith("Cell") else "l<k>[_reverse].ih / .hh per layer and direction, unrolled")
        result.notes.append(f"{kind} rebuilt from nn.Linear layers ({shape}) so its weights are quantized: {', '.join(names)}")
    return result


def _refusal(name: str, child: nn.Module, lengths: dict, grown: dict, inputs, keep_float: list[str]) -> str | None:
    if name in keep_float:
        keep_float.remove(name)  # consumed here: the plan's patterns name its layers, and this is none of them
        return f"kept float: --keep-float {name}"
    if isinstance(child, nn.MultiheadAttention):
        reason = attention_refusal(child)
        return f"{type(child).__name__} {name}: {reason}; its weights stay float" if reason else None
    if not isinstance(child, RECURRENT):
        return None
    seen = lengths.get(id(child))
    if seen == "packed":
        return f"{type(child).__name__} {name} takes a PackedSequence, which the unrolled rewrite does not; its weights stay float"
    if id(child) in grown and grown[id(child)] != seen:
        axes = ", ".join(f"{spec.name}[{axis}] '{axis_name}'" for spec in inputs for axis, axis_name in spec.dynamic_axes.items())
        return (
            f"{type(child).__name__} {name}: its sequence length ({seen}) follows a dynamic input axis ({axes}) that "
            f"this target keeps dynamic, and the quantizable (unrolled) form fixes the length; its weights stay "
            f"float. Declare the axis static (e.g. --input with a fixed size) to quantize them"
        )
    return None


def _sequence_lengths(module: nn.Module, example_inputs: tuple | None, recurrent: list[nn.Module]) -> dict:
    """id(recurrent module) -> the sequence length it is called with on `example_inputs` ('packed' for a
    PackedSequence); modules the forward never calls are absent."""
    if example_inputs is None or not recurrent:
        return {}
    lengths = {}

    def record(child, args, _output):
        x = args[0]
        if isinstance(x, nn.utils.rnn.PackedSequence):
            lengths[id(child)] = "packed"
        elif x.dim() == 3:
            lengths[id(child)] = x.shape[1] if child.batch_first else x.shape[0]
        else:
            lengths[id(child)] = x.shape[0]

    handles = [child.register_forward_hook(record) for child in recurrent]
    try:
        with torch.no_grad():
            module(*example_inputs)
    except Exception:  # noqa: BLE001  a model that refuses grown inputs: lengths unknown, judged as dynamic
        return {id(child): -1 for child in recurrent}
    finally:
        for handle in handles:
            handle.remove()
    return lengths


def _grown(example_inputs: tuple, inputs) -> tuple:
    """The examples with every dynamic axis doubled (values repeated, so token ids stay valid)."""
    grown = []
    for spec, tensor in zip(inputs, example_inputs):
        for axis in spec.dynamic_axes:
            tensor = torch.cat([tensor, tensor], dim=axis)
        grown.append(tensor)
    return tuple(grown)
