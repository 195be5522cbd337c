"""Stateful Core ML decoders of the other families against FP32 PyTorch (method: test_coreml_decoder.py).

Qwen2: GQA with q/k/v biases, untied head. GPT-2: learned positions (read at cache_position), Conv1D
projections, fused qkv. Phi: partial rotary (half the head dim), parallel attention and MLP, LM head bias.
"""

from __future__ import annotations

import pytest

from tests.llm.test_coreml_decoder import MAX_CONTEXT, check_fp32
from tests.llm.tiny import tiny_decoder

pytest.importorskip("coremltools")


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "phi"])
def test_family_fp32_agrees_with_pytorch(family, tmp_path):
    from edgeq.llm.coreml_decoder import export_decoder

    model = tiny_decoder(family)
    check_fp32(model, export_decoder(model, MAX_CONTEXT, tmp_path / f"{family}.mlpackage"))
