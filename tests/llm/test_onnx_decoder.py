"""ONNX decoder (edgeq/llm/onnx_decoder.py) against FP32 PyTorch on a tiny Llama (GQA, rope, tied embeddings):
the ONNX Runtime GenAI layout, prefill and decode in one graph, agreement and logits at fp32, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edgeq.errors import ConversionError, UsageError
from edgeq.llm.onnx_decoder import export_decoder, open_runner
from edgeq.llm.reference import TorchStepRunner
from edgeq.validate import generation
from tests.llm.tiny import tiny_decoder, token_sequences

CONTEXT = 48


def check_fp32(model, path) -> None:
    """Teacher-forced agreement 100%, every greedy decode full length, logits at cosine >= 0.9999."""
    runner = open_runner(path, CONTEXT)
    report = generation.compare(TorchStepRunner(model, CONTEXT), runner, token_sequences(3, 24, seed=2),
                                token_sequences(3, 6, seed=3), 12)
    m = report.metrics()
    assert m["token_agreement"] == 1.0, m
    assert report.greedy.full_matches == 3, report.greedy.summary()
    assert m["logit_cosine_min"] >= 0.9999 and m["step_cosine_min"] >= 0.9999, m
    assert abs(m["ppl_delta"]) < 1e-3 * m["ppl_reference"]


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory):
    model = tiny_decoder("llama")
    return model, export_decoder(model, CONTEXT, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_llama_fp32_matches_pytorch(llama_fp32):
    check_fp32(*llama_fp32)


def test_layout_is_onnxruntime_genai(llama_fp32):
    import onnx

    _, path = llama_fp32
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    outputs = [o.name for o in graph.output]
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["past_key_values.1.value"][1:] == [2, inputs["past_key_values.1.value"][2], 16]  # kv_heads 2 (GQA), head_dim 16
    assert isinstance(inputs["past_key_values.0.key"][2], str)  # dynamic past length
    assert outputs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    genai = json.loads((path.parent / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert genai["model"]["context_length"] == CONTEXT and genai["model"]["decoder"]["num_key_value_heads"] == 2


def test_prefill_in_chunks_equals_one_prefill(llama_fp32):
    _, path = llama_fp32
    runner = open_runner(path, CONTEXT)
    ids = token_sequences(1, 20, seed=5)[0]
    whole = runner.prefill(ids)
    runner.reset()
    parts = np.concatenate([runner.prefill(ids[:7]), runner.prefill(ids[7:15]), np.stack([runner.decode(t) for t in ids[15:]])])
    np.testing.assert_allclose(parts, whole, atol=1e-4)


def test_runner_refuses_past_the_context(llama_fp32):
    _, path = llama_fp32
    runner = open_runner(path, CONTEXT)
    runner.prefill(np.zeros(CONTEXT - 1, np.int64))
    runner.decode(1)
    with pytest.raises(UsageError, match="maximum context"):
        runner.decode(1)
    with pytest.raises(UsageError, match="1-D"):
        runner.prefill(np.zeros((1, 2), np.int64))


def test_export_refusals(tmp_path):
    model = tiny_decoder("llama")
    with pytest.raises(UsageError, match="exceeds the model's 128 positions"):
        export_decoder(model, 4096, tmp_path / "m.onnx")
    from transformers import BertConfig, BertModel

    with pytest.raises(ConversionError, match="not a transformers causal LM"):
        export_decoder(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64)), 16, tmp_path / "b.onnx")


def test_onnxruntime_genai_generates_the_reference_continuation(llama_fp32):
    """ONNX Runtime GenAI's own generate loop (genai_config.json beside the graph) decodes what PyTorch does."""
    og = pytest.importorskip("onnxruntime_genai")
    model, path = llama_fp32
    prompt = token_sequences(1, 6, seed=3)[0]
    params = og.GeneratorParams(og.Model(str(path.parent)))
    params.set_search_options(do_sample=False, max_length=30)
    generator = og.Generator(og.Model(str(path.parent)), params)
    generator.append_tokens(prompt.astype(np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    reference = TorchStepRunner(model, CONTEXT)
    expected = [int(reference.prefill(prompt)[-1].argmax())]
    while len(expected) < len(tokens):
        expected.append(int(reference.decode(expected[-1]).argmax()))
    assert len(tokens) == 24 and tokens == expected
