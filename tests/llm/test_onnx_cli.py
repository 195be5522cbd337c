"""`edgeq convert SRC --task text-generation -t onnx`: bundles with generation metrics, and clean refusals."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

from edgeq.cli import main
from tests.llm.tiny import save_folder, tiny_decoder, word_texts


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_folder(tiny_decoder("llama"), tmp_path_factory.mktemp("hf") / "tiny-llama")


def test_convert_fp32_and_int4(llama_folder, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(word_texts(6, 16, seed=4)) + "\n")
    result = CliRunner().invoke(main, ["convert", str(llama_folder), "--task", "text-generation", "-t", "onnx",
                                       "-p", "fp32,int4-weight", "--max-context", "48", "--data", str(data),
                                       "--samples", "3", "--calibration-samples", "3", "-o", str(tmp_path / "out"),
                                       "--budget", "token_agreement>=0.99"])
    assert result.exit_code == 6, result.output  # fp32 holds the budget; int4 of random weights does not
    fp32 = tmp_path / "out" / "tiny-llama" / "onnx" / "fp32"
    manifest = json.loads((fp32 / "manifest.json").read_text())
    assert manifest["metrics"]["token_agreement"] == 1.0 and manifest["metrics"]["greedy_agreement"] == 1.0
    assert manifest["verdict"] == "ok" and manifest["max_context"] == 48
    assert (fp32 / "model.onnx").exists() and (fp32 / "genai_config.json").exists() and (fp32 / "tokenizer").is_dir()
    report = (fp32 / "report.md").read_text()
    assert "Greedy continuations" in report and "| 0 | 20/20 |" in report
    int4 = json.loads((tmp_path / "out" / "tiny-llama" / "onnx" / "int4-weight" / "manifest.json").read_text())
    assert int4["plan"]["layers"] == 16 and int4["verdict"] == "over-budget"
    assert int4["artifact"]["size_bytes"] < manifest["artifact"]["size_bytes"]
    assert any("MatMulNBits" in note for note in int4["notes"])
    # the LM head and the table default to int8 (pipeline.default_per_layer); the float layers and the share are said
    assert "int8 per channel" in json.dumps(int4["plan"]["notes"]) and 0.9 < int4["plan"]["quantized_weight_share"] <= 1.0
    assert any("8-bit MatMulNBits" in note and "accuracy_level 4" in note for note in int4["notes"])  # the int8 head's fast kernel
    assert "Plan: int4-weight" in (tmp_path / "out" / "tiny-llama" / "onnx" / "int4-weight" / "report.md").read_text()


def test_per_layer_overrides_the_int8_head_default(llama_folder, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(llama_folder), "--task", "text-generation", "-t", "onnx",
                                       "-p", "int4-weight", "--max-context", "32", "--samples", "2", "--calibration-samples", "2",
                                       "--per-layer", "lm_head=int4", "--per-layer", "model.embed_tokens=int4",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    int4 = json.loads((tmp_path / "out" / "tiny-llama" / "onnx" / "int4-weight" / "manifest.json").read_text())
    assert "int8 per channel" not in json.dumps(int4["plan"]["notes"]), int4["plan"]["notes"]


@pytest.mark.parametrize("args, message", [
    (["-t", "onnx", "--max-context", "16"], "--max-context belongs to --task text-generation"),
    (["--task", "text-generation", "-t", "nnapi"], "exports to onnx, tflite, coreml"),
    (["--task", "text-generation", "-p", "int8-weight"], "takes fp32 or int4-weight"),
    (["--task", "text-generation", "--budget", "cosine>=0.9"], "text-generation budgets are"),
    (["-t", "onnx", "--source-grid", "keep"], "--source-grid belongs to --task text-generation"),
    (["--task", "text-generation", "-p", "int4-weight", "--per-layer", "lm_head=int9"], "is not a layer scheme"),
])
def test_option_refusals(llama_folder, args, message):
    result = CliRunner().invoke(main, ["convert", str(llama_folder), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_refuses_an_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(str(folder))
    result = CliRunner().invoke(main, ["convert", str(folder), "--task", "text-generation"])
    assert result.exit_code == 2 and "not a causal LM" in result.output, result.output


def test_refuses_gguf_without_its_packages(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    model = tmp_path / "model.Q4_1.gguf"
    model.write_bytes(b"GGUF")
    result = CliRunner().invoke(main, ["convert", str(model), "--task", "text-generation"])
    assert result.exit_code == 2 and "pip install 'edgeq[llm]'" in result.output, result.output
