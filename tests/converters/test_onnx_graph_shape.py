"""ONNX int8 graphs shaped for ORT's kernels (converters/onnx_graph_shape.py) on a tiny post-LayerNorm encoder:
tables gathered before dequantization, q/k/v sharing one SmoothQuant scaling and one input quantization, the
attention output projection's scaling folded into the value projection, and the plan's numbers still exact in the
artifact (weight parity)."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn

from edgeq.load import load_model
from edgeq.pipeline import ConvertOptions, convert
from edgeq.plan import QuantPlan
from edgeq.validate.verdict import Verdict
from tests.conftest import ONNX

pytestmark = ONNX
QKV = ("attention.query", "attention.key", "attention.value")


class Encoder(nn.Module):
    """One BERT block (post-LayerNorm: each LayerNorm's output is also the residual) over BERT-style embeddings."""

    def __init__(self, vocab=50, width=32, heads=2):
        super().__init__()
        self.word, self.kind = nn.Embedding(vocab, width), nn.Embedding(2, width)
        self.norm0 = nn.LayerNorm(width)
        self.attention = nn.ModuleDict({name: nn.Linear(width, width) for name in ("query", "key", "value", "output")})
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads = heads

    def forward(self, input_ids, token_type_ids):
        x = self.norm0(self.word(input_ids) + self.kind(token_type_ids))
        batch, seq, width = x.shape
        split = lambda t: t.view(batch, seq, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = (split(self.attention[name](x)) for name in ("query", "key", "value"))
        context = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        x = self.norm1(x + self.attention["output"](context.transpose(1, 2).reshape(batch, seq, width)))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


def encoder():
    torch.manual_seed(0)
    model = Encoder().eval()
    with torch.no_grad():  # an outlier channel, as transformers have, so SmoothQuant has work to do
        model.norm0.weight[3] = 8.0
    ids = torch.randint(1, 50, (1, 12))
    return model, {"input_ids": ids, "token_type_ids": ids % 2}


def _convert(tmp_path, target, precision):
    model = load_model("tests.converters.test_onnx_graph_shape:encoder")
    (outcome,) = convert(model, ConvertOptions(targets=[target], out=tmp_path, precisions=[precision], samples=6))
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    import onnx

    return outcome, manifest, onnx.load(str(outcome.path / "model.onnx")).graph


def test_int8_dynamic_graph_gathers_first_and_quantizes_each_input_once(tmp_path, monkeypatch):
    # every group smoothed (not only where it pays, calibration/smoothquant_select.py): the shared and folded
    # scalings are what this test checks
    monkeypatch.setattr("edgeq.calibration.smoothquant_select.KEEP_RATIO", 0.0)
    outcome, manifest, graph = _convert(tmp_path, "onnx", "int8-dynamic")
    producer = {out: node for node in graph.node for out in node.output}
    ops = [node.op_type for node in graph.node]

    # tables: the int8 rows are gathered, then dequantized; no DequantizeLinear of a whole table remains
    assert [n.input[0].removeprefix("inner.") for n in graph.node if n.op_type == "Gather" and n.input[0].endswith(".weight.codes")] == ["word.weight.codes", "kind.weight.codes"]
    assert not any(n.op_type == "Gather" and producer.get(n.input[0], n).op_type == "DequantizeLinear" for n in graph.node)

    # q, k and v share their SmoothQuant factors (plan), hence one Mul and one DynamicQuantizeLinear (graph)
    plan = QuantPlan.load(outcome.path)
    factors = [plan.layers[name].smooth for name in QKV]
    assert all(np.array_equal(factors[0], f) for f in factors[1:])
    assert not np.array_equal(factors[0], plan.layers["attention.output"].smooth)
    quantized_inputs = [n.input[0] for n in graph.node if n.op_type == "DynamicQuantizeLinear"]
    assert len(quantized_inputs) == len(set(quantized_inputs)) == 4  # qkv, output, up, down: six linears
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == 6
    qkv = [n for n in integer if any(name in n.input[1] for name in QKV)]
    assert len({n.input[0] for n in qkv}) == 1

    # attention.output's SmoothQuant factors go into v's output scale and bias (constant Muls ORT folds at load)
    initializers = {i.name for i in graph.initializer}
    inverse = next(name for name in initializers if name.endswith("attention.output.smooth.inverse"))
    readers = [n for n in graph.node if inverse in n.input]
    assert len(readers) == 2 and all(name in initializers for n in readers for name in n.input)

    # GELU as one kernel; the residual additions before LayerNormalization kept off SkipLayerNormalization
    assert ops.count("Gelu") == 1 and "Erf" not in ops
    assert [producer[n.input[0]].op_type for n in graph.node if n.op_type == "LayerNormalization"] == ["Sum", "Sum", "Sum"]
    assert "SkipLayerNormalization" not in _fused_ops(outcome.path / "model.onnx")

    parity = manifest["weight_parity"]
    assert parity["checked_layers"] == 8 and parity["mismatches"] == [] and parity["missing"] == []
    assert outcome.report.outputs[0].cosine >= 0.99


def _fused_ops(path) -> list[str]:
    """The op types ORT runs after its graph optimizations (QDQ fusions are level 2, 'extended')."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path.with_name("optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    import onnx

    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def test_w8a8_graph_runs_integer_matmuls_in_ort(tmp_path):
    outcome, manifest, graph = _convert(tmp_path, "onnx", "w8a8")
    producer = {out: node for node in graph.node for out in node.output}
    plan = QuantPlan.load(outcome.path)
    assert {str(layer.activation.dtype) for layer in plan.quantized() if layer.activation is not None} == {"uint8"}

    # every linear's weight DequantizeLinear feeds its MatMul directly, per output channel on axis 1
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear"]
    assert len(matmuls) == 6
    assert all(producer[n.input[1]].input[0].endswith(".weight.codes.T") for n in matmuls)
    assert not any(n.op_type == "Transpose" and producer.get(n.input[0], n).op_type == "DequantizeLinear" for n in graph.node)
    # q, k and v read one quantized tensor
    qkv = [n for n in matmuls if any(name in producer[n.input[1]].input[0] for name in QKV)]
    assert len({n.input[0] for n in qkv}) == 1

    fused = _fused_ops(outcome.path / "model.onnx")
    assert fused.count("MatMulIntegerToFloat") == 6, fused  # ORT's integer kernel with float output, one per linear
    assert "GatherBlockQuantized" in fused

    parity = manifest["weight_parity"]
    assert parity["checked_layers"] == 8 and parity["mismatches"] == [] and parity["missing"] == []
    assert outcome.report.outputs[0].cosine >= 0.98
