"""The ONNX decoder at fp32 for Qwen2 (q/k/v biases, untied head), GPT-2 (learned positions, Conv1D) and
Phi (partial rotary, parallel blocks): teacher-forced and greedy agreement with PyTorch, logits close."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")

from edgeq.llm.onnx_decoder import export_decoder
from tests.llm.test_onnx_decoder import CONTEXT, check_fp32
from tests.llm.tiny import tiny_decoder


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "phi"])
def test_family_fp32_matches_pytorch(family, tmp_path):
    model = tiny_decoder(family)
    check_fp32(model, export_decoder(model, CONTEXT, tmp_path / "model.onnx"))
