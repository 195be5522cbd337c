"""Every layer kind quantized or honestly float (issue 11, item 2).

Recurrent layers and nn.MultiheadAttention are rebuilt from nn.Linear layers before a quantized plan
(edgeq.linearize); the rebuilt modules equal the originals; a GRU, an LSTM and an nn.TransformerEncoderLayer
model at int8-weight quantize every weight matrix on onnx, tflite and coreml (parity checked by the pipeline) at
<= 0.3x the FP32 parameter bytes; the plan counts every weight tensor and lists the float ones with a reason.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from edgeq.coverage import account_weights
from edgeq.linearize import linearize
from edgeq.plan import QuantPlan
from edgeq.rewrite_attention import LinearAttention
from edgeq.rewrite_recurrent import LinearCell, LinearRecurrent
from edgeq.validate.verdict import Verdict
from tests.conftest import COREML, ONNX, TFLITE
from tests.helpers import convert_source


def _flat(value):
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flat(item)]
    return [value]


def _same(a, b, tolerance=1e-5):
    a, b = _flat(a), _flat(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.shape == y.shape and (x - y).abs().max().item() < tolerance


RECURRENT_CASES = [
    (nn.GRU, {}), (nn.GRU, {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}), (nn.LSTM, {"proj_size": 3, "batch_first": True}),
    (nn.LSTM, {"bias": False}), (nn.RNN, {"nonlinearity": "relu", "num_layers": 2}), (nn.RNN, {"bidirectional": True}),
]


@pytest.mark.parametrize(("kind", "options"), RECURRENT_CASES)
def test_rebuilt_recurrent_layers_equal_the_originals(kind, options):
    torch.manual_seed(0)
    original = kind(5, 7, **options).eval()
    rebuilt = LinearRecurrent(original).eval()
    x = torch.randn(4, 3, 5)
    directions = 2 if original.bidirectional else 1
    state = torch.randn(original.num_layers * directions, 3 if not original.batch_first else 4, getattr(original, "proj_size", 0) or 7)
    hx = (state, torch.randn(state.shape[0], state.shape[1], 7)) if kind is nn.LSTM else state
    with torch.no_grad():
        for args in ((x,), (x[:, 0],), (x, hx)):  # batched, one unbatched sequence, with an initial state
            _same(original(*args), rebuilt(*args))
    assert {name for name, _ in rebuilt.named_modules()} >= {"l0.ih", "l0.hh"}


@pytest.mark.parametrize("kind", [nn.GRUCell, nn.LSTMCell, nn.RNNCell])
def test_rebuilt_cells_equal_the_originals(kind):
    torch.manual_seed(0)
    original = kind(5, 7).eval()
    rebuilt = LinearCell(original)
    x = torch.randn(3, 5)
    hx = (torch.randn(3, 7), torch.randn(3, 7)) if kind is nn.LSTMCell else torch.randn(3, 7)
    with torch.no_grad():
        for args in ((x,), (x[0],), (x, hx)):
            _same(original(*args), rebuilt(*args))


@pytest.mark.parametrize("options", [{}, {"batch_first": True, "bias": False}, {"kdim": 6, "vdim": 5}])
def test_rebuilt_attention_equals_multihead_attention_with_masks_and_weights(options):
    torch.manual_seed(0)
    original = nn.MultiheadAttention(8, 2, **options).eval()
    rebuilt = LinearAttention(original)
    first = options.get("batch_first", False)
    query, key, value = (torch.randn(*((2, n) if first else (n, 2)), d) for n, d in ((4, 8), (3, options.get("kdim", 8)), (3, options.get("vdim", 8))))
    padding = torch.tensor([[False, False, True], [False, True, False]])
    with torch.no_grad():
        for extra in ({}, {"need_weights": False}, {"average_attn_weights": False}, {"key_padding_mask": padding, "attn_mask": torch.randn(4, 3)}):
            _same(original(query, key, value, **extra), rebuilt(query, key, value, **extra))


def test_transformer_layers_take_their_plain_path_with_rebuilt_attention():
    """The fast paths read self_attn.in_proj_weight; the rebuilt attention sends them to the plain path."""
    torch.manual_seed(0)
    stack = nn.Sequential(
        nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2),
    ).eval()
    decoder = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    rebuilt = linearize(stack, (x,))
    rebuilt_decoder = linearize(decoder, (x, memory))
    assert not rebuilt.module[0].use_nested_tensor and not stack[0].layers[0].self_attn.__class__ is LinearAttention
    with torch.no_grad():
        _same(stack(x), rebuilt.module(x))
        _same(decoder(x, memory), rebuilt_decoder.module(x, memory))
    names = {name for name, _ in rebuilt.module.named_modules()}
    assert {"0.layers.1.self_attn.q_proj", "0.layers.1.self_attn.out_proj"} <= names
    assert any("MultiheadAttention rebuilt" in note for note in rebuilt.notes)


def test_dynamic_sequence_axis_keeps_recurrent_weights_float_with_the_reason():
    from edgeq.signature import Dim, TensorSpec

    gru = nn.Sequential(nn.GRU(5, 7, batch_first=True)).eval()
    x = torch.randn(1, 4, 5)
    static = [TensorSpec("x", (Dim(1), Dim(4), Dim(5)))]
    dynamic = [TensorSpec("x", (Dim(1), Dim(4, "time"), Dim(5)))]
    assert isinstance(linearize(gru, (x,), static, dynamic_shapes=True).module[0], LinearRecurrent)
    assert isinstance(linearize(gru, (x,), dynamic, dynamic_shapes=False).module[0], LinearRecurrent)  # frozen anyway
    kept = linearize(gru, (x,), dynamic, dynamic_shapes=True)
    assert kept.module is gru and "0.weight_hh_l0" in kept.floats
    assert "dynamic input axis" in kept.floats["0.weight_hh_l0"] and "'time'" in kept.floats["0.weight_hh_l0"]
    by_name = linearize(gru, (x,), static, keep_float=["0"])
    assert by_name.module is gru and by_name.floats["0.weight_ih_l0"] == "kept float: --keep-float 0" and by_name.keep_float == []


def test_every_weight_tensor_counts_and_float_ones_say_why():
    """A transposed convolution and a bare nn.Parameter stay float, listed; tied weights count once."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 6)
            self.up = nn.ConvTranspose1d(6, 6, 2, stride=2)
            self.position = nn.Parameter(torch.zeros(4, 6))
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.embed.weight  # tied

    module = Mixed()
    plan = QuantPlan("int8-weight", "onnx")
    from edgeq.calibration.weights import quantize_weight_per_channel
    from edgeq.plan import LayerPlan, OpKind, QDtype

    for fqn in ("embed", "head"):
        quant, codes = quantize_weight_per_channel(module.embed.weight, QDtype.INT8, axis=0, scale_dtype="float32")
        plan.layers[fqn] = LayerPlan(fqn, OpKind.EMBEDDING if fqn == "embed" else OpKind.LINEAR, quant, codes)
    account_weights(module, plan)
    assert set(plan.other_weights) == {"up.weight", "position"}
    assert "transposed convolutions" in plan.other_weights["up.weight"]
    assert "Mixed" in plan.other_weights["position"]
    total = 60 + 6 * 6 * 2 + 6 + 24
    assert plan.quantized_share == pytest.approx(60 / total)
    summary = plan.summary()
    assert summary["weights"] == 4 and summary["quantized_weights"] == 2
    notes = plan.coverage_notes()
    assert notes[0] == f"2 of 4 weights quantized ({100 * 60 / total:.1f}% of the parameter bytes)"
    assert any(note.startswith("float: up.weight (transposed") for note in notes)


MODELS = {"keyword_gru": 5, "keyword_lstm": 5, "tiny_encoder": 8}  # weight matrices, each quantized


@pytest.mark.parametrize("target", [pytest.param("onnx", marks=ONNX), pytest.param("tflite", marks=TFLITE), pytest.param("coreml", marks=COREML)])
@pytest.mark.parametrize("name", list(MODELS))
def test_recurrent_and_attention_models_quantize_every_weight_matrix(tmp_path, name, target):
    """Core ML runs in the MIL reference executor on Linux."""
    outcome = convert_source(f"tests.coverage_models:{name}", target, "int8-weight", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations  # drift within the default budget
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    plan = manifest["plan"]
    assert plan["weights"] == plan["quantized_weights"] == plan["layers"] == MODELS[name]
    assert plan["other_weights"] == {} and plan["float_layers"] == [] and plan["quantized_weight_share"] > 0.98
    parity = manifest["weight_parity"]
    assert parity["checked_layers"] == MODELS[name] and parity["mismatches"] == [] and parity["missing"] == []
    assert outcome.plan_notes[0].startswith(f"{MODELS[name]} of {MODELS[name]} weights quantized")
    assert any("rebuilt from nn.Linear" in note for note in outcome.plan_notes)
    from tests import coverage_models

    module, _ = getattr(coverage_models, name)()
    fp32_bytes = 4 * sum(p.numel() for p in module.parameters())
    assert outcome.size_bytes <= 0.3 * fp32_bytes, f"{outcome.size_bytes / fp32_bytes:.3f}x the FP32 weights"


@pytest.mark.parametrize("target", [pytest.param("onnx", marks=ONNX), pytest.param("tflite", marks=TFLITE), pytest.param("coreml", marks=COREML)])
def test_grouped_depthwise_embedding_and_tied_weights_quantize_and_transposed_conv_says_why(tmp_path, target):
    outcome = convert_source("tests.coverage_models:layer_kinds", target, "int8-weight", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    plan = QuantPlan.load(outcome.path)
    assert {layer.fqn for layer in plan.quantized()} == {"embed", "grouped", "depthwise", "grouped2d", "depthwise2d", "head"}
    assert list(plan.other_weights) == ["up.weight"] and "transposed convolutions" in plan.other_weights["up.weight"]
    assert (plan.layers["embed"].weight_codes == plan.layers["head"].weight_codes).all()  # tied: the same numbers
    assert outcome.plan_notes[0].startswith("6 of 7 weights quantized")
    parity = json.loads((outcome.path / "manifest.json").read_text())["weight_parity"]
    assert parity["mismatches"] == [] and parity["missing"] == []
    # TFLite and Core ML store the tied tensor once (parity reads it as the embedding's); ONNX keeps both uses
    assert parity["checked_layers"] + len(parity["removed_as_unused"]) == 6
