"""Stored bits per weight (edgeq/footprint.py): hand-built plans against a hand count, per runtime, and the account
against the bytes an ONNX artifact really holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeq.footprint import OTHER, float_bits_of, layer_storage, weight_storage
from edgeq.plan import LayerPlan, OpKind, PerChannel, PerGroup, QDtype, QuantPlan, TensorQuant
from tests.conftest import ONNX


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 64)  # 640 weights
        self.up = nn.Linear(64, 48)  # 3072 weights + 48 bias
        self.down = nn.Linear(48, 16)  # 768 weights + 16 bias

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.emb(ids))))


def codes(dtype: QDtype, shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(dtype.qmin, dtype.qmax + 1, size=shape).astype(dtype.storage)


def grouped(fqn, n, k, dtype=QDtype.INT4, group=32, op=OpKind.LINEAR) -> LayerPlan:
    quant = TensorQuant(dtype, PerGroup(1, group), True, np.full((n, k // group), 0.01), np.zeros((n, k // group)))
    return LayerPlan(fqn, op, quant, codes(dtype, (n, k)))


def per_channel(fqn, n, k, dtype, symmetric=True, zero=0) -> LayerPlan:
    quant = TensorQuant(dtype, PerChannel(0), symmetric, np.full(n, 0.01), np.full(n, zero))
    return LayerPlan(fqn, OpKind.LINEAR, quant, codes(dtype, (n, k)))


def plan_of(*layers) -> QuantPlan:
    return QuantPlan("int4-weight", "onnx", {layer.fqn: layer for layer in layers})


def test_onnx_bits_per_weight_equal_a_hand_count():
    plan = plan_of(
        LayerPlan("emb", OpKind.EMBEDDING, reason="float"),
        grouped("up", 48, 64),  # MatMulNBits: 4-bit codes, a float32 scale per 32
        per_channel("down", 16, 48, QDtype.UINT3, symmetric=False, zero=3),  # 4-bit container, K 48 padded to a block of 64
    )
    storage = weight_storage(Model(), plan, "onnx")
    up_bits = 48 * 64 * 4 + 48 * 2 * 32
    down_bits = 16 * 64 * 4 + 16 * 32 + 16 * 8  # padded codes, float32 scales, one packed zero-point byte a row
    emb_bits, other_bits = 640 * 32, (48 + 16) * 32
    rows = {layer.name: layer for layer in storage.layers}
    assert [layer.name for layer in storage.layers] == ["emb", "up", "down", OTHER]  # the module's order
    assert rows["up"].bits == up_bits and rows["up"].bits_per_weight == 5.0
    assert rows["down"].bits == down_bits and rows["down"].container_bits == 4 and rows["down"].code_width == 3
    assert rows["down"].bits_per_weight == pytest.approx(down_bits / 768)
    assert rows["emb"].bits == emb_bits and rows[OTHER].weights == 64
    assert storage.weights == 640 + 3072 + 768 + 64 == sum(p.numel() for p in Model().parameters())
    assert storage.bits_per_weight == pytest.approx((up_bits + down_bits + emb_bits + other_bits) / 4544)
    assert storage.bytes_by_kind() == {
        "quantized_weights": (48 * 64 * 4 + 16 * 64 * 4) // 8,
        "scales_zero_points_luts": (48 * 2 * 32 + 16 * 32 + 16 * 8) // 8,
        "float_weights": (emb_bits + other_bits) // 8,
    }
    data = storage.to_json()
    assert data["bits_per_weight"] == round(storage.bits_per_weight, 4) and data["float_bits"] == 32
    assert data["layers"][2] == {
        "name": "down", "op": "linear", "dtype": "uint3", "container_bits": 4, "weights": 768,
        "bits_per_weight": round(down_bits / 768, 4), "bytes": {"codes": 512, "scales": 64, "zero_points": 16, "luts": 0},
    }


@pytest.mark.parametrize(("runtime", "layer", "bits_per_weight"), [
    # TFLite: blockwise FLOAT16 scale table, no zero points; per channel float32 scales and int64 zero points
    ("tflite", grouped("up", 48, 64), 4 + 16 / 32),
    ("tflite", per_channel("up", 48, 64, QDtype.INT3), 4 + (32 + 64) / 64),  # INT4 container
    ("tflite", per_channel("up", 48, 64, QDtype.INT2), 2 + (32 + 64) / 64),  # INT2 per channel
    ("tflite", per_channel("up", 48, 64, QDtype.INT8), 8 + (32 + 64) / 64),
    # Core ML: 4-bit containers, fp16 scales, 4-bit offsets only where a zero point is not 0
    ("coreml", grouped("up", 48, 64, QDtype.INT3), 4 + 16 / 32),
    ("coreml", per_channel("up", 48, 64, QDtype.UINT4, symmetric=False, zero=5), 4 + (16 + 4) / 64),
    ("coreml", per_channel("up", 48, 64, QDtype.INT8), 8 + (16 + 8) / 64),
    ("coreml", grouped("emb", 10, 64, QDtype.INT8, op=OpKind.EMBEDDING), 8 + 16 / 32),  # blockwise int8, no offset
    # ONNX: int8 per channel (DequantizeLinear: float32 scale and int8 zero point a row), int2 in a 4-bit container
    ("onnx", per_channel("up", 48, 64, QDtype.INT8), 8 + (32 + 8) / 64),
    ("onnx", grouped("up", 48, 64, QDtype.INT2), 4 + 32 / 32),
    # an int4 embedding table (not a MatMulNBits): packed 4-bit codes, float32 scales
    ("onnx", grouped("emb", 10, 64, op=OpKind.EMBEDDING), 4 + 32 / 32),
])
def test_each_runtime_counts_what_its_packer_stores(runtime, layer, bits_per_weight):
    assert layer_storage(layer, runtime).bits_per_weight == pytest.approx(bits_per_weight)


def test_palettes_count_index_bits_and_fp16_tables_and_match_the_core_ml_packer():
    from edgeq.converters.coreml_lowbit import stored_bits

    indices = np.random.default_rng(0).integers(0, 16, size=(48, 64)).astype(np.uint8)
    palette = np.linspace(-1, 1, 2 * 16, dtype=np.float32).reshape(2, 16)  # one table per 24 output channels
    layer = LayerPlan("up", OpKind.LINEAR, weight_codes=indices, palette=palette)
    stored = layer_storage(layer, "coreml")
    assert (stored.dtype, stored.code_bits, stored.lut_bits) == ("lut4", 48 * 64 * 4, 2 * 16 * 16)
    for other in (layer, grouped("up", 48, 64, QDtype.INT3), per_channel("up", 48, 64, QDtype.UINT4, symmetric=False, zero=5)):
        packer = stored_bits(other)
        assert layer_storage(other, "coreml").bits == packer.payload_bits + packer.side_bits


def test_float_artifacts_and_shared_weights():
    model = Model()
    assert weight_storage(model, None, "onnx").bits_per_weight == 32.0
    assert weight_storage(model, None, "coreml", float_bits_of("coreml", "fp16")).bits_per_weight == 16.0
    assert (float_bits_of("coreml", "int4-weight"), float_bits_of("onnx", "int4-weight"), float_bits_of("coreml", "fp32")) == (16, 32, 32)
    model.down.weight = nn.Parameter(torch.zeros(16, 48))
    model.extra = nn.Linear(48, 16, bias=False)
    model.extra.weight = model.down.weight  # tied: stored once
    storage = weight_storage(model, plan_of(per_channel("down", 16, 48, QDtype.INT8)), "onnx")
    assert storage.weights == sum(p.numel() for p in model.parameters())
    assert [layer.name for layer in storage.layers] == ["down", OTHER]


@ONNX
@pytest.mark.parametrize("layer", [
    per_channel("fc", 16, 48, QDtype.UINT3, symmetric=False, zero=4),  # K 48 padded to one block of 64, zero points
    grouped("fc", 32, 128, QDtype.INT3, group=64),
    grouped("fc", 32, 128, QDtype.INT4, group=16),
])
def test_the_account_equals_the_bytes_the_onnx_packer_writes(layer):
    """The converter's MatMulNBits rewrite (on a hand-built float graph: no exporter) stores exactly the account's
    codes, scales and zero points."""
    from onnx import numpy_helper

    from edgeq.converters.onnx_lowbit import rewrite_matmul_nbits
    from tests.converters.test_onnx_lowbit import float_graph

    weight = layer.weight.dequantize(layer.weight_codes)
    proto, _ = float_graph(weight, np.zeros(weight.shape[0], np.float32), "Gemm")
    rewritten, _ = rewrite_matmul_nbits(proto, {"fc": layer}, 1)
    assert rewritten == ["fc"]
    stored = {i.name: numpy_helper.to_array(i).nbytes for i in proto.graph.initializer}
    sizes = layer_storage(layer, "onnx").to_json()["bytes"]
    assert sizes["codes"] == stored["fc.weight.packed"]
    assert sizes["scales"] == stored["fc.weight.scale"]
    assert sizes["zero_points"] == stored.get("fc.weight.zero_point", 0)
