"""int4-weight (per group of 32) ONNX decoder on a tiny Llama with tied embeddings: the plan's codes and scales
read back verbatim from MatMulNBits / GatherBlockQuantized, the artifact equal to PyTorch running the plan's
dequantized weights, and measurably apart from FP32 (random weights at 4 bits)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edgeq.errors import ConversionError
from edgeq.llm.onnx_decoder import export_with_notes, open_runner
from edgeq.llm.onnx_lowbit_decoder import int4_plan, read_codes, simulated
from edgeq.llm.reference import TorchStepRunner
from edgeq.validate import generation
from tests.llm.tiny import tiny_decoder, token_sequences

CONTEXT = 40


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory):
    model = tiny_decoder("llama")
    plan = int4_plan(model, token_sequences(2, 24, seed=3))
    path, notes = export_with_notes(model, CONTEXT, tmp_path_factory.mktemp("onnx4") / "model.onnx", plan=plan)
    return model, plan, path, notes


def test_codes_and_scales_verbatim(llama_int4):
    model, plan, path, notes = llama_int4
    planned = {fqn: layer for fqn, layer in plan.layers.items() if layer.weight is not None}
    assert "lm_head" in planned and "model.embed_tokens" in planned  # tied in the model, each with its own codes
    found = read_codes(path)
    assert set(found) == set(planned)
    for fqn, (codes, scale, _) in found.items():
        layer = planned[fqn]
        np.testing.assert_array_equal(np.asarray(codes).reshape(layer.weight_codes.shape), layer.weight_codes, err_msg=fqn)
        np.testing.assert_array_equal(np.asarray(scale, np.float32).reshape(np.shape(layer.weight.scale)),
                                      np.asarray(layer.weight.scale, np.float32), err_msg=fqn)
    assert any("MatMulNBits" in n for n in notes) and any("GatherBlockQuantized" in n for n in notes)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the caller's model stays tied


def test_artifact_computes_the_plan(llama_int4):
    model, plan, path, _ = llama_int4
    runner = open_runner(path, CONTEXT)
    seqs, prompts = token_sequences(3, 20, seed=2), token_sequences(2, 6, seed=3)
    own = generation.compare(TorchStepRunner(simulated(model, plan), CONTEXT), runner, seqs, prompts, 10).metrics()
    assert own["token_agreement"] == 1.0 and own["greedy_agreement"] == 1.0, own
    assert own["logit_cosine_min"] >= 0.9999, own
    fp32 = generation.teacher_forced(TorchStepRunner(model, CONTEXT), runner, seqs)
    assert fp32.logit_cosine_min < 0.999 and fp32.ppl_delta != 0.0  # 4 bits of random weights do change logits


def test_refuses_a_plan_for_another_model(llama_int4, tmp_path):
    _, plan, _, _ = llama_int4
    with pytest.raises(ConversionError, match="does not have"):
        export_with_notes(tiny_decoder("gpt2"), CONTEXT, tmp_path / "m.onnx", plan=plan)
