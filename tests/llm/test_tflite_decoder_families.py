"""TFLite decoders of the other families against FP32 PyTorch (tests/llm/test_tflite_decoder.py checks Llama):
Qwen2 (GQA with q/k/v biases, untied head), GPT-2 (learned positions, Conv1D, fused qkv, MHA), Phi (partial
rotary, parallel attention and MLP, LM head bias)."""

from __future__ import annotations

import pytest

from tests.llm.test_tflite_decoder import MAX_CONTEXT, check_fp32
from tests.llm.tiny import tiny_decoder

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "phi"])
def test_fp32_matches_pytorch(family, tmp_path):
    from edgeq.llm.tflite_decoder import export_decoder

    model = tiny_decoder(family)
    check_fp32(model, export_decoder(model, MAX_CONTEXT, tmp_path / f"{family}.tflite"))
