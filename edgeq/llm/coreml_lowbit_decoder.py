"""Low-bit weights in the stateful Core ML decoder: the plan, packed by converters/coreml_lowbit.py, named for parity.

The decoder's linear layers (and, where the plan says so, its embedding table) become the packer's custom ops
over the plan's codes and fp16 scales (constexpr_blockwise_shift_scale, iOS18) or palettes
(constexpr_lut_to_dense): the same route and checks as `edgeq convert -t coreml -p int4-weight`. What is
specific to the decoder is the naming: the converted module is the HF model under a wrapper
(`StatefulDecoder.model`), so each constexpr op is named after the layer's FQN in the HF model (the plan's
key), which is what converters/parity_coreml.py reads back.
"""

from __future__ import annotations

import numpy as np

from edgeq.errors import ConversionError

WRAPPED = "model."  # StatefulDecoder's attribute holding the HF model: stripped from FQNs


def int4_plan(hf_model, token_ids, *, group_size: int = 32, algorithm: str = "rtn", keep_float: tuple = (),
              target: str = "coreml", overrides: tuple = ()):
    """The int4-weight QuantPlan of `hf_model` on a Core ML profile through edgeq's low-bit resolver: symmetric
    4-bit codes per group of `group_size` input columns with fp16 scales on every linear layer. `token_ids` int
    [n] or a list of them: calibration samples (GPTQ/AWQ fit on them; RTN runs them to find the executed layers).
    `keep_float`: layer patterns left float (the resolver's --keep-float)."""
    import torch

    from edgeq.llm.coreml_decoder import as_float32
    from edgeq.scheme import scheme_for
    from edgeq.targets import Precision
    from edgeq.targets.profile import load_profile
    from edgeq.targets.resolve import Calibration
    from edgeq.targets.resolve_lowbit import resolve_lowbit_plan

    profile = load_profile(target)
    scheme = scheme_for(Precision.INT4_WEIGHT, algorithm=algorithm, group_size=group_size,
                        symmetric=profile.quantization.weight_symmetric)
    sequences = token_ids if isinstance(token_ids, (list, tuple)) else [token_ids]
    samples = [{"input_ids": torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]} for ids in sequences]
    return resolve_lowbit_plan(as_float32(hf_model).eval(), profile, Precision.INT4_WEIGHT, scheme, list(keep_float),
                               (samples[0]["input_ids"],), Calibration(samples, ["input_ids"]), overrides=tuple(overrides))


def pack(model, plan):
    """(the HF model with the plan's low-bit layers packed, notes); every layer the target refuses, at once."""
    from edgeq.compress.apply import apply_plan
    from edgeq.compress.qdq import WeightForm
    from edgeq.converters.coreml_lowbit import check_plan, is_lowbit, pack_module, register_frontend
    from edgeq.targets.profile import load_profile

    profile = load_profile(plan.target or "coreml")
    refusals = check_plan(plan, profile, model)
    if refusals:
        raise ConversionError(f"Core ML decoder ({profile.id}) cannot hold the {plan.scheme} plan:\n"
                              + "\n".join(f"  - {r}" for r in refusals))
    count = sum(is_lowbit(layer) for layer in plan.layers.values())
    if not count:
        raise ConversionError("the plan has no low-bit layer; the Core ML decoder takes low-bit plans (int4-weight, palettes)")
    register_frontend()
    packed, rest = pack_module(model, plan)
    if rest.layers:  # int8 per-channel layers of a mixed plan: the converters' int8 route
        packed = apply_plan(packed, rest, WeightForm.CODES)
    return packed, [f"{count} low-bit layer(s) packed from the {plan.scheme} plan (codes and scales verbatim)"]


def name_weights(program) -> int:
    """Name each packed weight's node after its layer's FQN in the HF model (parity_coreml's spelling), in place;
    returns how many. As converters/coreml.py's `_named`, with the wrapper's prefix stripped."""
    import torch

    from edgeq.converters.coreml_lowbit import WEIGHT_OPS
    from edgeq.converters.parity_coreml import mil_name

    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    buffers = program.graph_signature.inputs_to_buffers
    taken = {node.name for node in program.graph.nodes}
    count = 0
    for node in program.graph.nodes:
        if not (node.target in WEIGHT_OPS or node.target == dequantize) or getattr(node.args[0], "name", None) not in buffers:
            continue
        base = mil_name(buffers[node.args[0].name].rpartition(".")[0].removeprefix(WRAPPED))  # <layer>.weight
        name, copies = base, 1
        while name in taken:  # a weight used twice (a tied table and head): one node per use
            copies += 1
            name = f"{base}_{copies}"
        taken.add(name)
        node.name = name
        count += 1
    if count:
        program.graph_module.recompile()
    return count
