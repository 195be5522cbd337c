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

    def __init__(self, expand_mask: bool, vocab=50, width=32, heads=2, where_mask: bool = False):
        super().__init__()
        self.word = nn.Embedding(vocab, width)
        self.norm0, self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key, self.value, self.output = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads, self.expand_mask, self.where_mask = heads, expand_mask, where_mask

    def forward(self, input_ids, attention_mask):
        x = self.norm0(self.word(input_ids))
        batch, seq, width = x.shape
        mask = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        if self.where_mask:  # transformers' sdpa mask: a bool [batch, 1, seq, seq] (padding AND bidirectional), then Where
            keep = torch.ones(1, 1, seq, 1, dtype=torch.bool) & attention_mask.bool()[:, None, None, :]
            mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        elif self.expand_mask:  # [batch, 1, seq, seq], as transformers' BERT builds it
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


def where_mask():
    torch.manual_seed(0)
    return SdpaEncoder(expand_mask=True, where_mask=True).eval(), _example()


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


def _masks(length=12):
    """Attention masks a batch-1 sentence model meets: no padding, right padding, a hole, left padding, all padding."""
    masks = {"full": np.ones(length), "right": np.r_[np.ones(9), np.zeros(3)], "one token": np.r_[1, np.zeros(length - 1)],
             "hole": np.r_[np.ones(4), np.zeros(3), np.ones(5)], "left": np.r_[np.zeros(5), np.ones(length - 5)]}
    return {name: mask.astype(np.int64)[None] for name, mask in masks.items()}


def test_attention_over_the_real_keys_only_computes_what_the_mask_did(tmp_path):
    """converters/onnx_key_compress.py: a batch-1 key-padding mask (transformers' Where form) becomes Compress of k
    and v, no attention_bias; the outputs match the masked kernel's for every mask, padded queries included."""
    import onnx

    from edgeq.converters.onnx_fusion import fuse_multi_head_attention
    from edgeq.converters.onnx_key_compress import skip_padded_keys

    outcome = _convert(tmp_path, "where_mask", "fp32")
    exported = onnx.load(str(outcome.path / "model.onnx"))
    fused = onnx.ModelProto()
    fused.CopyFrom(exported)
    assert fuse_multi_head_attention(fused) == 1
    compressed = onnx.ModelProto()
    compressed.CopyFrom(fused)
    assert skip_padded_keys(compressed) == 1
    onnx.checker.check_model(compressed)
    (attention,) = [n for n in compressed.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(attention.input) == 3  # no attention_bias: ORT's flash-attention path
    assert [n.op_type for n in compressed.graph.node].count("Compress") == 2
    assert "Where" not in {n.op_type for n in compressed.graph.node}  # the bias chain is gone
    ids = _example()["input_ids"].numpy()
    for name, mask in _masks().items():
        feed = {"input_ids": ids, "attention_mask": mask}
        np.testing.assert_allclose(_run(compressed, feed), _run(exported, feed), rtol=0, atol=2e-5, err_msg=name)
    everything_masked = _run(compressed, {"input_ids": ids, "attention_mask": np.zeros((1, 12), np.int64)})
    assert np.isfinite(everything_masked).all()  # all keys kept then: no empty attention


def test_key_compression_leaves_other_masks_and_batches_alone(tmp_path):
    """An additive float mask (not a Where of a bool) and a batch of 2 keep the bias: a row-dependent number of keys
    cannot be compressed, and a float mask's values are not known to be 0 / -inf."""
    import onnx

    from edgeq.converters.onnx_fusion import fuse_multi_head_attention
    from edgeq.converters.onnx_key_compress import skip_padded_keys

    proto = onnx.load(str(_convert(tmp_path / "expanded", "expanded", "fp32").path / "model.onnx"))
    assert fuse_multi_head_attention(proto) == 1 and skip_padded_keys(proto) == 0

    model, example = where_mask()
    example = {name: value.repeat(2, 1) for name, value in example.items()}
    path = tmp_path / "batch2.onnx"
    torch.onnx.export(model, (example["input_ids"], example["attention_mask"]), str(path), dynamo=True,
                      input_names=["input_ids", "attention_mask"])
    proto = onnx.load(str(path))
    if fuse_multi_head_attention(proto):
        assert skip_padded_keys(proto) == 0


def test_int8_dynamic_artifact_reads_only_the_real_keys(tmp_path):
    """The pipeline applies it after the fusion (int8-dynamic, CPU profile): notes say so, the plan's codes still
    match, the artifact validates, and it agrees with the same graph run through the masked kernel."""
    import onnx

    outcome = _convert(tmp_path, "where_mask", "int8-dynamic")
    proto = onnx.load(str(outcome.path / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Compress") == 2 and ops.count("MatMulInteger") == 6
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert "keys attention_mask keeps" in json.dumps(manifest)
    parity = manifest["weight_parity"]
    assert parity["mismatches"] == [] and parity["missing"] == [] and parity["checked_layers"] == 7
    assert outcome.report.outputs[0].cosine >= 0.99
