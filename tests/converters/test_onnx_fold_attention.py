"""Self-attention as one ORT kernel (converters/onnx_fusion.py) on a tiny post-LayerNorm encoder whose attention is
written as transformers' eager BERT attention writes it (q kᵀ times the scale, plus an additive padding mask): the exporter's
~11 ops a layer become one com.microsoft.MultiHeadAttention, the outputs stay the same, the int8-dynamic artifact
still validates and carries the plan's numbers; a mask the op cannot take as attention_bias is left unfused."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from edgeq.load import load_model
from edgeq.pipeline import ConvertOptions, convert
from edgeq.validate.verdict import Verdict
from tests.conftest import ONNX

pytestmark = ONNX


class SdpaEncoder(nn.Module):
    """Embeddings, one BERT block (post-LayerNorm), attention as transformers' eager_attention_forward computes it
    (the form all-MiniLM-L6-v2's export has)."""

    def __init__(self, expand_mask: bool, vocab=50, width=32, heads=2):
        super().__init__()
        self.word = nn.Embedding(vocab, width)
        self.norm0, self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value, self.output = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads, self.expand_mask = heads, expand_mask

    def forward(self, input_ids, attention_mask):
        x = self.norm0(self.word(input_ids))
        batch, seq, width = x.shape
        mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        if self.expand_mask:  # [batch, 1, seq, seq], as transformers' BERT builds it
            mask = mask.expand(batch, 1, seq, seq)
        split = lambda t: t.view(batch, seq, -1, width // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(2, 3)) * (width // self.heads) ** -0.5 + mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        x = self.norm1(x + self.output(context.transpose(1, 2).reshape(batch, seq, width)))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


def _example():
    ids = torch.randint(1, 50, (1, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # padding: masked keys
    return {"input_ids": ids, "attention_mask": mask}


def expanded():
    torch.manual_seed(0)
    return SdpaEncoder(expand_mask=True).eval(), _example()


def broadcast():
    torch.manual_seed(0)
    return SdpaEncoder(expand_mask=False).eval(), _example()


def _convert(tmp_path, factory, precision):
    model = load_model(f"tests.converters.test_onnx_fold_attention:{factory}")
    (outcome,) = convert(model, ConvertOptions(targets=["onnx"], out=tmp_path, precisions=[precision], samples=6))
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    return outcome


def _run(proto, feed):
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0]


def test_fused_attention_computes_what_the_exporter_wrote(tmp_path):
    import onnx

    from edgeq.converters.onnx_fusion import fuse_multi_head_attention

    feed = {name: value.numpy() for name, value in _example().items()}
    for factory, fusions in (("expanded", 1), ("broadcast", 0)):
        outcome = _convert(tmp_path / factory, factory, "fp32")
        proto = onnx.load(str(outcome.path / "model.onnx"))
        assert "MultiHeadAttention" not in {n.op_type for n in proto.graph.node}  # FP32 graphs are left as exported
        reference = _run(proto, feed)
        assert fuse_multi_head_attention(proto) == fusions  # a [1, 1, 1, seq] mask is not an attention_bias: left alone
        ops = [n.op_type for n in proto.graph.node]
        if fusions:
            assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops and "Transpose" not in ops
        onnx.checker.check_model(proto)
        np.testing.assert_allclose(_run(proto, feed), reference, rtol=0, atol=1e-5)


def test_int8_dynamic_artifact_runs_attention_as_one_kernel_with_the_plans_numbers(tmp_path):
    import onnx

    outcome = _convert(tmp_path, "expanded", "int8-dynamic")
    graph = onnx.load(str(outcome.path / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MultiHeadAttention") == 1 and "Softmax" not in ops
    assert ops.count("MatMulInteger") == 6  # the projections in front stay ORT's dynamic int8 kernels
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert any("MultiHeadAttention" in note for note in json.dumps(manifest).split('"'))
    parity = manifest["weight_parity"]
    assert parity["mismatches"] == [] and parity["missing"] == [] and parity["checked_layers"] == 7
    assert outcome.report.outputs[0].cosine >= 0.99
