"""4-bit weights in the ONNX decoder: a low-bit plan of the HF model's linears, lowered to MatMulNBits.

Nothing new is packed here. The plan comes from edgeq's low-bit resolver (targets/resolve_lowbit.py: RTN, GPTQ
or AWQ per group on the target's grid, calibrated on token sequences), the planned linears export as the plan's
dequantized floats (converters/onnx_lowbit.py `dequantized_weights`) and `lower_lowbit` rewrites each into a
com.microsoft.MatMulNBits holding the plan's codes exactly (read back by `read_matmul_nbits`).

Tied embeddings: the input table and the LM head share one parameter; a plan may give them different codes
(a 4-bit table per row block, the head per group along K), and the exporter would write one initializer for
both. The head gets its own copy of the weight before dequantizing, so each keeps its plan.
"""

from __future__ import annotations

import numpy as np

from edgeq.errors import ConversionError

TARGET = "onnx decoder"


def int4_plan(hf_model, token_ids, *, group_size: int = 32, algorithm: str = "rtn", keep_float: tuple = (),
              precision=None, target: str = "onnx", overrides: tuple = ()):
    """The low-bit QuantPlan (default int4-weight: 4-bit symmetric codes per group of `group_size` along K) of
    every linear layer of `hf_model` on an ONNX profile. `token_ids`: int [n] or a list of them, the
    calibration samples (GPTQ/AWQ fit on them; RTN runs them only to find the executed layers)."""
    import copy

    import torch

    from edgeq.scheme import scheme_for
    from edgeq.targets import Precision
    from edgeq.targets.profile import load_profile
    from edgeq.targets.resolve import Calibration
    from edgeq.targets.resolve_lowbit import resolve_lowbit_plan

    precision = precision or Precision.INT4_WEIGHT
    profile = load_profile(target)
    scheme = scheme_for(precision, algorithm=algorithm, group_size=group_size,
                        symmetric=profile.quantization.weight_symmetric)
    sequences = token_ids if isinstance(token_ids, (list, tuple)) else [token_ids]
    samples = [{"input_ids": torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]} for ids in sequences]
    # a copy: untying and AWQ's folds change the module in place, and the caller's model is the reference
    return resolve_lowbit_plan(untied(torch.nn.Module.float(copy.deepcopy(hf_model)).eval()), profile, precision, scheme, list(keep_float),
                               (samples[0]["input_ids"],), Calibration(samples, ["input_ids"]), overrides=tuple(overrides))


def untied(model):
    """`model` with its LM head holding its own copy of a tied input embedding (in place; returns it)."""
    import torch

    from edgeq.footprint import tied_head

    if (head := tied_head(model)) is not None:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False  # else a later tie_weights() would share them again
    return model


def prepare_lowbit(model, plan):
    """(model with the plan's low-bit layers as dequantized floats, those layers by FQN) for export; refuses
    a plan with layers this route cannot hold (int8 per channel, activation quantization)."""
    from edgeq.converters.onnx_lowbit import check_plan, dequantized_weights, split_plan
    from edgeq.targets import Precision

    refusals = check_plan(plan, Precision(plan.scheme)) if plan.scheme in {p.value for p in Precision} else []
    lowbit, rest = split_plan(plan)
    left = sorted(fqn for fqn, layer in rest.layers.items() if layer.weight is not None)
    if refusals or left or rest.tensors:
        reasons = [f"  - {r}" for r in refusals] + [f"  - {fqn}: not a low-bit layer" for fqn in left[:5]]
        if rest.tensors:
            reasons.append("  - activation quantization points (the decoder export keeps activations float)")
        raise ConversionError(f"target {TARGET} cannot hold the {plan.scheme} plan:\n" + "\n".join(reasons))
    if not lowbit:
        raise ConversionError(f"target {TARGET}: the plan quantizes no layer")
    return dequantized_weights(untied(model), lowbit), lowbit


def simulated(hf_model, plan):
    """A float copy of `hf_model` with the plan's dequantized weights: the PyTorch model the 4-bit artifact
    computes (its own reference: the artifact's logits against it are the export's error, apart from the plan's)."""
    import copy

    import torch

    model, _ = prepare_lowbit(torch.nn.Module.float(copy.deepcopy(hf_model)).eval(), plan)
    return model


def read_codes(path) -> dict:
    """FQN -> (codes, scales, zero points) of every MatMulNBits in a decoder .onnx (converters/onnx_lowbit.py)."""
    import onnx

    from edgeq.converters.onnx_lowbit import read_matmul_nbits

    graph = onnx.load(str(path)).graph
    return read_matmul_nbits(graph, {i.name: i for i in graph.initializer})
