"""ONNX low-bit weights: the plan's 4/3/2-bit codes in com.microsoft.MatMulNBits, exactly, run by onnxruntime.

Every combination (int4/int3/int2 symmetric, uint4/uint3/uint2 asymmetric x groups of 16..256 or per channel) is
packed by the converter's rewrite into a hand-built float graph (fast: no exporter) and read back with zero parity
mismatches; ORT at accuracy_level 1 then equals the float64 product with the plan's dequantized weights to ~1e-6.
A few go through the whole converter (torch.onnx export, then the rewrite), compared with PyTorch running the
plan's dequantized weights: measured 127-133 dB at accuracy_level 1 (fp32 math) and 43 dB at level 4 (int8
activations, int4-dynamic); the floors below leave room for other CPUs' kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeq.calibration.lowbit import to_plan
from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.rtn import rtn
from edgeq.calibration.weights import quantize_weight_per_channel
from edgeq.plan import LayerPlan, OpKind, PerGroup, PerTensor, QDtype, QuantPlan, TensorQuant
from edgeq.targets import Precision, load_profile
from edgeq.validate.metrics import sqnr_db
from tests.conftest import ONNX

pytestmark = ONNX

FLOAT_MATH_SQNR_DB = 100  # accuracy_level 1: measured 127-133 dB (fp32 rounding of the same product)
INT8_ACTIVATIONS_SQNR_DB = 30  # accuracy_level 4: measured 43 dB (activations quantized per block)


def low_bit(fqn: str, weight: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> LayerPlan:
    return to_plan.layer_plan(fqn, OpKind.LINEAR, rtn(weight, Grid(bits, group, symmetric), "mse"))


def seeded_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5


# -- packing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_rows_round_trips_low_bits_first(bits):
    from edgeq.converters.onnx_lowbit import pack_rows, unpack_rows

    values = np.random.default_rng(bits).integers(0, 2**bits, size=(3, 13), dtype=np.uint8)
    packed = pack_rows(values, bits)
    assert packed.shape == (3, -(-13 * bits // 8))
    assert np.array_equal(unpack_rows(packed, bits, 13), values)
    if bits == 4:  # ContribOperators.md: "the first 4 bits are stored in the lower 4 bits of a byte"
        assert packed[0, 0] == values[0, 0] | (values[0, 1] << 4)


# -- every combination, through the rewrite of a hand-built graph -------------------------------------------


def float_graph(weight: np.ndarray, bias: np.ndarray, op: str):
    """x [1, 3, K] -> MatMul(x, Wᵀ) + b (what the exporter writes for 3-D inputs), or Gemm(x, W, b, transB=1) on [2, K]."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = weight.shape
    if op == "MatMul":
        nodes = [helper.make_node("MatMul", ["x", "w_t"], ["p"]), helper.make_node("Add", ["p", "b"], ["y"])]
        inits = [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w_t"), numpy_helper.from_array(bias, "b")]
        shape_in, shape_out = [1, 3, k], [1, 3, n]
    else:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
        inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
        shape_in, shape_out = [2, k], [2, n]
    graph = helper.make_graph(
        nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), shape_in


COMBINATIONS = [
    (bits, group, symmetric)
    for bits in (4, 3, 2)
    for symmetric in (True, False)
    for group in (32, 128, None)
] + [(4, 16, True), (4, 64, False), (4, 256, True)]


@pytest.mark.parametrize(("bits", "group", "symmetric"), COMBINATIONS)
def test_every_combination_is_exact_in_matmul_nbits(bits, group, symmetric):
    import onnxruntime as ort
    from onnx import numpy_helper

    from edgeq.converters.onnx_lowbit import read_matmul_nbits, rewrite_matmul_nbits
    from edgeq.converters.parity import StoredWeights, compare_weights, onnx_tensors

    k = 192 if group is None else 256  # per channel: K not a power of two (one block of 256, padded)
    n = 48
    layer = low_bit("block.proj", seeded_weight(n, k, seed=bits), bits, group, symmetric)
    dequantized = layer.weight.dequantize(layer.weight_codes)
    bias = np.linspace(-1, 1, n, dtype=np.float32)
    proto, shape = float_graph(dequantized, bias, "MatMul" if bits != 3 else "Gemm")
    rewritten, _ = rewrite_matmul_nbits(proto, {"block.proj": layer}, level=1)
    assert rewritten == ["block.proj"]
    assert [node.op_type for node in proto.graph.node][0] == "MatMulNBits"
    assert not any(i.data_type == 1 and tuple(i.dims) in ((n, k), (k, n)) for i in proto.graph.initializer)  # no float weight left

    stored = read_matmul_nbits(proto.graph, onnx_tensors(proto.graph))
    plan = QuantPlan("int4-weight", "onnx", {"block.proj": layer})
    weights = StoredWeights({f: v[:2] for f, v in stored.items()}, set(), {f: v[2] for f, v in stored.items()})
    parity = compare_weights(plan, weights)
    assert parity.checked == 1 and parity.mismatches == []

    packed = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "block.proj.weight.packed"))
    block = group or 256
    assert packed.shape == (n, -(-k // block), block // 2)  # 4 bits a code for every width (3- and 2-bit in 4-bit containers)

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x})
    exact = x.astype(np.float64) @ dequantized.astype(np.float64).T + bias
    assert np.max(np.abs(got - exact)) / np.max(np.abs(exact)) < 1e-5


def test_a_stored_code_changed_is_a_parity_mismatch():
    from onnx import numpy_helper

    from edgeq.converters.parity import StoredWeights, compare_weights, onnx_tensors
    from edgeq.converters.onnx_lowbit import read_matmul_nbits, rewrite_matmul_nbits

    layer = low_bit("proj", seeded_weight(16, 64), 4, 32, False)
    proto, _ = float_graph(layer.weight.dequantize(layer.weight_codes), np.zeros(16, np.float32), "MatMul")
    rewrite_matmul_nbits(proto, {"proj": layer}, level=1)
    for initializer in proto.graph.initializer:
        if initializer.name == "proj.weight.zero_point":
            zero = numpy_helper.to_array(initializer).copy()
            zero[0] ^= 1
            initializer.CopyFrom(numpy_helper.from_array(zero, initializer.name))
    (codes, scale, zero), = read_matmul_nbits(proto.graph, onnx_tensors(proto.graph)).values()
    parity = compare_weights(QuantPlan("int4-weight", "onnx", {"proj": layer}), StoredWeights({"proj": (codes, scale)}, set(), {"proj": zero}))
    assert parity.mismatches == ["proj: zero points differ"]


# -- refusals before any work ---------------------------------------------------------------------------------


def test_check_refuses_what_matmul_nbits_cannot_hold():
    from edgeq.converters.onnx_lowbit import check_plan

    weight = seeded_weight(8, 96)
    odd = low_bit("odd_group", weight, 4, 32, True)
    odd.weight = TensorQuant(QDtype.INT4, PerGroup(1, 24), True, np.ones((8, 4)), np.zeros((8, 4)))
    conv = low_bit("conv", weight, 4, 32, True)
    conv.op = OpKind.CONV
    int8_group = low_bit("int8_group", weight, 8, 32, True)  # held: MatMulNBits bits=8
    static = low_bit("static", weight, 4, 32, True)
    static.activation = TensorQuant(QDtype.UINT8, PerTensor(), False, 0.1, 128)
    plan = QuantPlan("int4-weight", "onnx", {l.fqn: l for l in (odd, conv, int8_group, static, low_bit("fine", weight, 4, 32, True))})
    reasons = {r.layer: r.reason for r in check_plan(plan, Precision.INT4_WEIGHT)}
    assert set(reasons) == {"odd_group", "conv", "static"}
    assert "powers of two >= 16" in reasons["odd_group"]
    assert "linear layers only" in reasons["conv"] and "keep it int8 or float" in reasons["conv"]
    assert "float or dynamic activations" in reasons["static"]


# -- the whole converter ----------------------------------------------------------------------------------------


class Stack(nn.Module):
    """K = 128 and 256 (multiples of 32 and 128); the head stays float in every plan below."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.act = nn.ReLU()
        self.down = nn.Linear(256, 64)
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        return self.head(self.down(self.act(self.up(x))))


def flat_stack():
    torch.manual_seed(0)
    return Stack().eval(), (torch.randn(2, 128),)  # 2-D input: the exporter writes Gemm


def sequence_stack():
    torch.manual_seed(0)
    return Stack().eval(), (torch.randn(1, 6, 128),)  # 3-D input: MatMul + Add


def convert_with_plan(tmp_path, source, precision, layers):
    from edgeq.converters import get_converter
    from edgeq.converters.base import ConversionRequest
    from edgeq.load import load_model

    model = load_model(f"tests.converters.test_onnx_lowbit:{source}")
    profile = load_profile("onnx")
    plan = QuantPlan(precision.value, profile.id, {layer.fqn: layer for layer in layers(model)})
    converter = get_converter(profile.runtime)
    request = ConversionRequest(model, profile, precision, plan)
    assert converter.check(request) == []
    artifact = converter.convert(request, tmp_path / "model.onnx")
    return model, plan, artifact


def torch_reference(model, plan):
    """PyTorch with the plan's dequantized weights written into the layers (int8 layers as their QDQ form)."""
    from edgeq.compress.apply import apply_plan
    from edgeq.compress.qdq import WeightForm
    from edgeq.converters.onnx_lowbit import dequantized_weights, split_plan

    lowbit, rest = split_plan(plan)
    module = apply_plan(dequantized_weights(model.module, lowbit), rest, WeightForm.CODES)
    with torch.no_grad():
        output = module(*model.example_inputs)
    return (output[0] if isinstance(output, (tuple, list)) else output).numpy()


def run_ort(path, model, level=None):
    import onnx

    from edgeq.converters.onnx_lowbit import with_accuracy_level
    from edgeq.validate.runners.onnxruntime import OnnxRuntimeRunner

    if level is not None:
        onnx.save(with_accuracy_level(onnx.load(str(path)), level), str(path.with_name(f"level{level}.onnx")))
        path = path.with_name(f"level{level}.onnx")
    feeds = {name: tensor.numpy() for name, tensor in zip(model.input_names, model.example_inputs)}
    return next(iter(OnnxRuntimeRunner(path).run(feeds).values()))


def stored_arrays(path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


CONVERTER_CASES = [  # (source, precision, up: bits/group/symmetric, down: same or "int8" per-channel fallback)
    ("flat_stack", Precision.INT4_WEIGHT, (4, 32, True), "int8"),
    ("sequence_stack", Precision.INT3_WEIGHT, (3, 128, False), (3, 32, True)),
    ("sequence_stack", Precision.INT2_WEIGHT, (2, None, True), (2, 32, False)),
]


@pytest.mark.parametrize(("source", "precision", "up", "down"), CONVERTER_CASES)
def test_converter_lowers_the_plan_exactly(tmp_path, source, precision, up, down):
    from edgeq.converters.parity import artifact_weights, compare_weights

    def layers(model):
        modules = dict(model.module.inner.named_children())
        first = low_bit("up", modules["up"].weight.detach(), *up)
        if down == "int8":  # a sensitive layer's fallback: int8 per channel, MatMulNBits bits=8 (padded rows)
            quant, codes = quantize_weight_per_channel(modules["down"].weight, QDtype.INT8)
            return [first, LayerPlan("down", OpKind.LINEAR, quant, codes)]
        return [first, low_bit("down", modules["down"].weight.detach(), *down)]

    model, plan, artifact = convert_with_plan(tmp_path, source, precision, layers)
    parity = compare_weights(plan, artifact_weights(artifact.path, "onnx"))
    assert parity.checked == 2 and parity.mismatches == [] and parity.missing == []
    assert any("accuracy_level=1 (fp32 math)" in note for note in artifact.notes)
    if up[0] < 4:
        assert any(f"{up[0]}-bit codes are stored in 4-bit" in note for note in artifact.notes)

    import onnx

    graph = onnx.load(str(artifact.path)).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2  # an int8 fallback too (bits=8): see onnx_lowbit.EIGHT_BIT
    assert {p.key: p.value for p in nbits[0].metadata_props}["pkg.torch.onnx.name_scopes"].endswith("'inner.up', 'linear']")
    stored = stored_arrays(artifact.path)
    assert stored["up.weight.packed"].nbytes * 8 == 4 * 128 * 256  # 4 bits a weight
    head = [v for v in stored.values() if v.dtype == np.float32 and v.shape in ((8, 64), (64, 8))]
    assert len(head) == 1  # the layer the plan keeps float (named inner.head.weight, or val_* once transposed)

    reference = torch_reference(model, plan)
    assert sqnr_db(reference, run_ort(artifact.path, model)) >= FLOAT_MATH_SQNR_DB


def test_int4_dynamic_runs_at_accuracy_level_4_and_separates_kernel_error(tmp_path):
    def layers(model):
        modules = dict(model.module.inner.named_children())
        return [low_bit(fqn, modules[fqn].weight.detach(), 4, 32, True) for fqn in ("up", "down")]

    model, plan, artifact = convert_with_plan(tmp_path, "sequence_stack", Precision.INT4_DYNAMIC, layers)
    assert any("accuracy_level=4 (int8 activations" in note for note in artifact.notes)
    reference = torch_reference(model, plan)
    deployed = sqnr_db(reference, run_ort(artifact.path, model))
    weight_exact = sqnr_db(reference, run_ort(artifact.path, model, level=1))
    assert weight_exact >= FLOAT_MATH_SQNR_DB  # the weights are the plan's: level 1 leaves only fp32 rounding
    assert INT8_ACTIVATIONS_SQNR_DB <= deployed < weight_exact  # level 4's error is the kernel's int8 activations
    (note,) = [note for note in artifact.notes if note.startswith("example input vs FP32 PyTorch")]
    assert "at accuracy_level 4 (deployed)" in note and "at level 1 (the plan's weights in fp32 math)" in note


def test_profiles_list_what_the_packer_lowers():
    for name in ("onnx", "onnx-x86-avx2", "onnx-arm64"):
        profile = load_profile(name)
        assert {Precision.INT4_WEIGHT, Precision.INT3_WEIGHT, Precision.INT2_WEIGHT, Precision.INT4_DYNAMIC} <= set(profile.precisions)
        caps = profile.quantization
        assert {"int4", "int3", "int2", "uint4", "uint3", "uint2"} <= set(caps.weight_dtypes)
        assert set(caps.group_sizes) == {16, 32, 64, 128, 256} and caps.scale_dtype == "float32"
    assert Precision.INT4_WEIGHT not in load_profile("onnx-qnn-htp").precisions  # HTP takes no MatMulNBits


def test_pipeline_validates_int4_weight_with_parity_and_records_the_accuracy_level(tmp_path):
    import json

    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions
    from edgeq.validate.verdict import Verdict

    model = load_model("tests.converters.test_onnx_lowbit:sequence_stack")
    options = ConvertOptions(
        targets=["onnx"], out=tmp_path, precisions=["int4-weight"], samples=2, keep_float=["head"],
        quantize=QuantizeOptions(algorithm="rtn", group_size=32, calibration_samples=2),
    )
    (outcome,) = convert(model, options)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert manifest["weight_parity"]["checked_layers"] == 2 and manifest["weight_parity"]["mismatches"] == []
    assert any("MatMulNBits" in note and "accuracy_level=1" in note for note in manifest["notes"])


# -- embedding tables (GatherBlockQuantized) and mixed bit widths ------------------------------------------------


def table_plan(fqn: str, weight: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> LayerPlan:
    return to_plan.layer_plan(fqn, OpKind.EMBEDDING, rtn(weight, Grid(bits, group, symmetric), "mse"))


TABLE_CASES = [(4, 32, True), (4, 16, False), (3, 64, True), (8, 32, True), (8, 128, False), (8, None, True)]


@pytest.mark.parametrize(("bits", "group", "symmetric"), TABLE_CASES)
def test_every_table_form_is_exact_in_gather_block_quantized(bits, group, symmetric):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.converters.onnx_lowbit import DOMAIN, DTYPE_KEY, PACKED, SCALE, ZERO, read_matmul_nbits
    from edgeq.converters.onnx_lowbit_gather import rewrite_gathers
    from edgeq.converters.parity import StoredWeights, compare_weights, onnx_tensors

    dim = 96 if group is None else 128  # per row: one block of 128 over 96 columns (the op takes ceil(D / block))
    layer = table_plan("emb", seeded_weight(40, dim, seed=bits), bits, group, symmetric)
    table = layer.weight.dequantize(layer.weight_codes)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, dim])], [numpy_helper.from_array(table, "table")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    assert rewrite_gathers(proto, {"emb": layer}, (PACKED, SCALE, ZERO), DTYPE_KEY, DOMAIN) == ["emb"]
    del proto.graph.initializer[0]  # the float table: nothing reads it any more
    (node,) = proto.graph.node
    assert node.op_type == "GatherBlockQuantized" and node.domain == DOMAIN

    stored = read_matmul_nbits(proto.graph, onnx_tensors(proto.graph))
    weights = StoredWeights({f: v[:2] for f, v in stored.items()}, set(), {f: v[2] for f, v in stored.items()})
    parity = compare_weights(QuantPlan("int4-weight", "onnx", {"emb": layer}), weights)
    assert parity.checked == 1 and parity.mismatches == []

    ids = np.random.default_rng(bits).integers(0, 40, size=(2, 5))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"ids": ids})
    assert np.array_equal(got, table[ids])  # a lookup: bit-exact, not just close


from tests.converters.models import Tokens, tokens  # noqa: E402,F401  (`...test_onnx_lowbit:tokens` sources)


def mixed_layers(model) -> list[LayerPlan]:
    """Every form a mixed low-bit plan holds: 4-bit tables (symmetric, asymmetric), an 8-bit table per group,
    int4 / int8-per-group linear layers, an int8 per-channel fallback; `head` stays float."""
    modules = dict(model.module.inner.named_children())

    def weight(name):
        return modules[name].weight.detach()

    quant, codes = quantize_weight_per_channel(modules["down"].weight, QDtype.INT8)
    return [
        table_plan("word", weight("word"), 4, 32, True), table_plan("position", weight("position"), 4, 16, False),
        table_plan("kind", weight("kind"), 8, 32, True), low_bit("up", weight("up"), 4, 32, True),
        LayerPlan("down", OpKind.LINEAR, quant, codes), low_bit("mid", weight("mid"), 8, 32, True),
    ]


def test_converter_lowers_tables_and_mixed_bit_widths_exactly(tmp_path):
    import onnx

    from edgeq.converters.parity import artifact_weights, compare_weights

    model, plan, artifact = convert_with_plan(tmp_path, "tokens", Precision.INT4_WEIGHT, mixed_layers)
    parity = compare_weights(plan, artifact_weights(artifact.path, "onnx"))
    assert parity.checked == 5 and parity.mismatches == [] and parity.missing == []
    # Static shapes: the exporter folds the lookup of constant positions into a constant of the looked-up rows,
    # which are the plan's dequantized rows (the table it read was the plan's); the artifact notes it.
    assert parity.removed == ["position"]
    assert any("folded by the exporter): position" in note for note in artifact.notes)
    rows = plan.layers["position"].weight.dequantize(plan.layers["position"].weight_codes)[:8]
    assert any(np.array_equal(np.squeeze(value), rows) for value in stored_arrays(artifact.path).values())
    graph = onnx.load(str(artifact.path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("GatherBlockQuantized") == 2 and "Gather" not in ops  # no float table left, no whole-table dequantize
    bits = {node.input[1].removesuffix(".weight.packed"): {a.name: a.i for a in node.attribute}["bits"]
            for node in graph.node if node.op_type == "MatMulNBits"}
    assert bits == {"up": 4, "mid": 8, "down": 8}  # int8 per channel too: not DequantizeLinear, which ORT fuses at level 4
    assert not any(node.op_type == "DequantizeLinear" for node in graph.node)
    assert any("2 embedding table(s) run as com.microsoft.GatherBlockQuantized" in note for note in artifact.notes)
    assert sqnr_db(torch_reference(model, plan), run_ort(artifact.path, model)) >= FLOAT_MATH_SQNR_DB


def test_pipeline_plans_tables_at_4_bits_and_validates_with_parity(tmp_path):
    import json

    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions
    from edgeq.validate.verdict import Verdict

    model = load_model("tests.converters.test_onnx_lowbit:tokens")
    options = ConvertOptions(
        targets=["onnx"], out=tmp_path, precisions=["int4-weight"], samples=2,
        quantize=QuantizeOptions(algorithm="rtn", group_size=32, calibration_samples=2),
    )
    (outcome,) = convert(model, options)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    parity = manifest["weight_parity"]
    assert parity["mismatches"] == [] and parity["checked_layers"] == 6 and parity["removed_as_unused"] == ["position"]
    notes = json.loads((outcome.path / "plan.json").read_text())["notes"]
    (note,) = [note for note in notes if note.startswith("embedding tables: ")]
    assert "word, position: 4-bit per group of 32" in note and "kind: int8 per row (under 1% of the model's weights" in note
    assert any("folded by the exporter): position" in note for note in manifest["notes"])


@pytest.mark.parametrize(("target", "precision", "group", "expected"), [
    ("onnx", Precision.INT3_WEIGHT, 32, {"word": "int4 per_group", "position": "int4 per_group", "kind": "int8 per_channel"}),
    ("onnx", Precision.INT4_WEIGHT, 128, {"word": "64 embedding columns are not a multiple of the group size 128"}),
    ("coreml-ane", Precision.LUT4_WEIGHT, None, {"word": "int8 per_channel", "position": "int8 per_channel"}),
])
def test_tables_are_planned_at_4_bits_where_the_target_holds_them(target, precision, group, expected):
    """int3 schemes still give 4-bit tables (the gathers' width), small tables int8 per row, a dim that is not a
    multiple of the group stays float, and the Neural Engine's palette scheme gives int8 rows."""
    from edgeq.load import load_model
    from edgeq.scheme import scheme_for
    from edgeq.targets.resolve import Calibration
    from edgeq.targets.resolve_lowbit import resolve_lowbit_plan

    model = load_model("tests.converters.test_onnx_lowbit:tokens")
    profile = load_profile(target)
    scheme = scheme_for(precision, algorithm=None if precision.value.startswith("lut") else "rtn", group_size=group)
    plan = resolve_lowbit_plan(model.module, profile, precision, scheme, [], model.example_inputs, Calibration([], model.input_names))
    for fqn, form in expected.items():
        layer = plan.layers[fqn]
        got = layer.reason if layer.weight is None else f"{layer.weight.dtype} {layer.weight.granularity.to_json()['kind']}"
        assert got == form, (fqn, got)
    assert any(note.startswith("embedding tables: ") for note in plan.notes)
