"""4-bit stateful Core ML decoder: int4 per group of 32 on every linear layer and the embedding table, packed by
converters/coreml_lowbit.py (constexpr_blockwise_shift_scale with the plan's codes and fp16 scales verbatim),
run by edgeq's MIL executor (fp16 compute emulated) against the PyTorch model holding the plan's weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.llm.test_coreml_decoder import MAX_CONTEXT, cosine, reference_logits, runner_logits
from tests.llm.tiny import token_sequences, tiny_decoder

pytest.importorskip("coremltools")


def test_llama_int4_g32_parity_and_agreement(tmp_path):
    from edgeq.converters.parity import artifact_weights, compare_weights
    from edgeq.llm.coreml_decoder import export_decoder, open_runner
    from edgeq.llm.coreml_lowbit_decoder import int4_plan
    from edgeq.validate.mil import read_program

    model = tiny_decoder("llama")
    plan = int4_plan(model, token_sequences(2, 24, seed=3))
    path = export_decoder(model, MAX_CONTEXT, tmp_path / "llama_int4.mlpackage", plan=plan)
    parity = compare_weights(plan, artifact_weights(path, "coreml"))
    planned = [fqn for fqn, layer in plan.layers.items() if layer.weight is not None]
    assert parity.checked == len(planned) and not parity.mismatches and not parity.missing
    ops = [op.type for op in read_program(path).main.ops]
    assert ops.count("constexpr_blockwise_shift_scale") == len(planned) and ops.count("write_state") == 2
    simulated = simulate_plan(model, plan)
    runner = open_runner(path, MAX_CONTEXT)
    vs_plan, vs_fp32, cos = [], [], []
    for ids in token_sequences(2, 40):
        got, want = runner_logits(runner, ids), reference_logits(simulated, ids)
        vs_plan.append(np.mean(got.argmax(-1) == want.argmax(-1)))
        vs_fp32.append(np.mean(got.argmax(-1) == reference_logits(model, ids).argmax(-1)))
        cos.append(cosine(got, want).min())
    print(f"int4 g32 tiny llama (Core ML, MIL executor, fp16 compute) teacher-forced top-1: {np.mean(vs_plan):.3f} vs "
          f"PyTorch plan (cosine >= {min(cos):.5f}), {np.mean(vs_fp32):.3f} vs FP32")
    assert np.mean(vs_plan) >= 0.95 and min(cos) >= 0.999


def simulate_plan(model, plan):
    """A float copy of `model` holding the plan's dequantized weights (a tied LM head gets its own)."""
    import copy

    import torch

    simulated = copy.deepcopy(model)
    modules = dict(simulated.named_modules())
    with torch.no_grad():
        for fqn, layer in plan.layers.items():
            if layer.weight is not None:
                weight = torch.from_numpy(layer.weight.dequantize(layer.weight_codes)).float()
                modules[fqn].weight = torch.nn.Parameter(weight)  # a new Parameter: unties a shared table
    return simulated
