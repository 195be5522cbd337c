"""TFLite low-bit packer (int4-dynamic): the plan's codes and scales in the .tflite, bit for bit, run by XNNPACK.

One conversion of a stack of linear layers carries every form the packer writes (blockwise INT4 at groups 32 and
128, 3-bit and blockwise 2-bit codes in INT4 containers, INT4 and INT2 per channel, an int8 hybrid fallback and a
float layer); plans are made with calibration/lowbit (RTN) on the target's grid: block scales rounded up to
bfloat16 (the profile's lowbit_scale_dtype), per-channel int4 codes in [-7, 7].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import TFLITE

pytestmark = TFLITE

BATCH = (1, 16, 128)
# (bits, group size or None per channel) per planned layer, in model order; the last layer stays float.
FORMS = [(4, 32), (4, 128), (3, 64), (4, None), (2, None), (2, 32), (8, None)]
# LiteRT quantizes every input row to int8 per call (~44 dB per layer here); against PyTorch with the same
# (dequantized) weights the 8-layer stack measured 38.3 dB (worst of 3 inputs), and the builtin kernels 37.7 dB
# against XNNPACK (they quantize inputs symmetric per row, XNNPACK asymmetric). A kernel that computes another
# function falls far below (a fused ReLU ignored: 4 dB; per-channel code -8 on the builtin kernel: 7 dB); the
# codes themselves are held by the parity test.
MIN_SQNR_DB = 32.0


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        widths = [128, 256, 128, 128, 128, 64, 64, 64, 32]
        layers = []
        for k, n in zip(widths, widths[1:]):
            layers += [nn.Linear(k, n), nn.ReLU()]
        self.layers = nn.Sequential(*layers[:-1])
        for layer in self.layers:  # He init keeps the signal's size through the ReLUs; small biases keep it the signal
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=(2 / layer.in_features) ** 0.5)
                nn.init.normal_(layer.bias, std=0.01)

    def forward(self, x):
        return self.layers(x)


def stack():
    torch.manual_seed(0)
    return Stack().eval(), (torch.randn(*BATCH),)


def lowbit_layer(fqn: str, weight: torch.Tensor, bits: int, group: int | None):
    """A plan entry on LiteRT's grid: symmetric codes, block scales on the bfloat16 grid."""
    from edgeq.calibration.lowbit.grid import Grid
    from edgeq.calibration.lowbit.rtn import rtn
    from edgeq.calibration.lowbit.to_plan import layer_plan
    from edgeq.calibration.weights import quantize_weight_per_channel
    from edgeq.plan import LayerPlan, OpKind, QDtype

    if bits == 8:
        quant, codes = quantize_weight_per_channel(weight, QDtype.INT8, axis=0)
        return LayerPlan(fqn, OpKind.LINEAR, quant, codes, dynamic_activation=QDtype.INT8)
    grid = Grid(bits, group, symmetric=True, scale_dtype="float32" if group is None else "bfloat16")
    # Per channel, LiteRT's builtin INT4 kernel mis-computes code -8: min-max scales keep codes in [-7, 7].
    fitted = rtn(weight, grid, "minmax" if group is None and bits > 2 else "mse")
    entry = layer_plan(fqn, OpKind.LINEAR, fitted)
    entry.dynamic_activation = QDtype.INT8
    return entry


def linears(module) -> list[tuple[str, nn.Linear]]:
    """(user FQN, layer) of every linear layer: the names plans use (a loaded model is wrapped)."""
    from edgeq.compress.apply import quantizable_layers

    return [(fqn, m) for fqn, m in quantizable_layers(module) if isinstance(m, nn.Linear)]


def make_plan(module, forms=FORMS):
    from edgeq.plan import QuantPlan

    plan = QuantPlan("int4-dynamic", "tflite-xnnpack")
    for (fqn, layer), (bits, group) in zip(linears(module), forms):
        plan.layers[fqn] = lowbit_layer(fqn, layer.weight.detach(), bits, group)
    return plan


def request_for(plan, loaded=None, precision="int4-dynamic", target="tflite-xnnpack"):
    from edgeq.converters import ConversionRequest
    from edgeq.load import load_model
    from edgeq.targets import Precision, load_profile

    loaded = loaded or load_model("tests.converters.test_tflite_lowbit:stack")
    return ConversionRequest(loaded, load_profile(target), Precision(precision), plan)


def dequantized_module(module, plan):
    """`module` with the plan's dequantized weights written into its layers (what the artifact should compute)."""
    import copy

    from edgeq.compress.apply import quantizable_layers

    result = copy.deepcopy(module)
    layers = dict(quantizable_layers(result))
    for fqn, entry in plan.layers.items():
        with torch.no_grad():
            layers[fqn].weight.copy_(torch.from_numpy(entry.weight.dequantize(entry.weight_codes)))
    return result


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from edgeq.converters.tflite import TFLiteConverter

    request = request_for(None)
    request.plan = make_plan(request.model.module)
    dest = tmp_path_factory.mktemp("lowbit") / "model.tflite"
    artifact = TFLiteConverter().convert(request, dest)
    return request, artifact


def test_parity_exact_on_every_form(converted):
    from edgeq.converters.parity import artifact_weights, compare_weights

    request, artifact = converted
    parity = compare_weights(request.plan, artifact_weights(artifact.path, "tflite"))
    assert parity.mismatches == [] and parity.missing == [] and parity.removed == []
    assert parity.checked == len(FORMS)


def test_storage_types_sizes_and_notes(converted):
    from edgeq.converters.parity_tflite import INT2, INT4, INT8, read_model, tensor_name

    request, artifact = converted
    model = read_model(artifact.path.read_bytes())
    tensors = {tensor_name(t): t for t in model.subgraphs[0].tensors}
    expected_type = {4: INT4, 3: INT4, 2: INT4, 8: INT8}
    weight_bytes = 0
    for (fqn, entry), (bits, group) in zip(request.plan.layers.items(), FORMS):
        tensor = tensors[f"{fqn}.weight"]
        rows, columns = entry.weight_codes.shape
        stored_bits = 2 if (bits, group) == (2, None) else min(8, max(4, bits))
        assert tensor.type == (INT2 if stored_bits == 2 else expected_type[bits])
        assert len(model.buffers[tensor.buffer].data) == rows * columns * stored_bits // 8
        weight_bytes += rows * columns * stored_bits // 8
        if group is None:
            assert tensor.quantization.detailsType == 0 and len(tensor.quantization.scale) == rows
        else:
            details = tensor.quantization.details
            scales = model.subgraphs[0].tensors[details.scales]
            assert (details.blockSize, details.zeroPoints, scales.type) == (group, -1, 1)  # FLOAT16 table
            assert list(scales.shape) == [rows, columns // group]
            weight_bytes += rows * columns // group * 2
    # Nothing else is stored: the float weights were replaced, not kept beside the codes (a few bytes of shape
    # constants aside); the file adds its tables and tensor names.
    layers = [m for _, m in linears(request.model.module)]
    biases = sum(4 * m.bias.numel() for m in layers)
    float_tail = 4 * layers[-1].weight.numel()  # the layer kept float
    stored = sum(len(buffer.data) for buffer in model.buffers if buffer.data is not None)
    assert weight_bytes + biases + float_tail <= stored <= weight_bytes + biases + float_tail + 64
    fp32_bytes = sum(4 * (m.weight.numel() + m.bias.numel()) for m in layers)
    assert artifact.path.stat().st_size < 0.2 * fp32_bytes
    assert any("INT4 type" in note and "layers.4 (int3)" in note and "layers.10 (int2)" in note for note in artifact.notes)


def test_runs_on_xnnpack_close_to_torch_with_the_plans_weights(converted):
    from edgeq.validate.metrics import sqnr_db
    from edgeq.validate.runners import open_runner
    from edgeq.validate.runners.litert_delegation import op_placements

    request, artifact = converted
    runner = open_runner(artifact.path, "tflite", threads=1)
    reference = dequantized_module(request.model.module, request.plan)
    generator = torch.Generator().manual_seed(3)
    name = request.model.input_names[0]
    worst = np.inf
    for _ in range(3):
        x = torch.randn(*BATCH, generator=generator)
        (output,) = runner.run({name: x.numpy()}).values()
        with torch.no_grad():
            (expected,) = reference(x)  # the loaded (flat) model returns a tuple
        worst = min(worst, sqnr_db(expected.numpy(), output))
    print(f"worst SQNR {worst:.1f} dB")
    assert worst >= MIN_SQNR_DB
    placements = op_placements(runner.interpreter)  # the interpreter that ran: XNNPACK took every FC
    assert [p.delegated for p in placements if p.op_name == "FULLY_CONNECTED"] == [True] * (len(FORMS) + 1)


def test_builtin_kernels_compute_the_same_and_are_seen_undelegated(converted):
    """Without the default delegate every op runs in the builtin kernels, and the reader says so. They compute
    the same function: the packer splits fused ReLUs off blockwise layers, which LiteRT's builtin blockwise
    kernel would ignore."""
    from edgeq.validate.metrics import sqnr_db
    from edgeq.validate.runners import open_runner
    from edgeq.validate.runners.litert_delegation import op_placements

    request, artifact = converted
    builtin = open_runner(artifact.path, "tflite", threads=1, preserve_tensors=True)
    xnnpack = open_runner(artifact.path, "tflite", threads=1)
    x = {request.model.input_names[0]: torch.randn(*BATCH, generator=torch.Generator().manual_seed(4)).numpy()}
    (slow,), (fast,) = builtin.run(x).values(), xnnpack.run(x).values()
    placements = op_placements(builtin.interpreter)
    assert placements and not any(p.delegated for p in placements)
    print(f"builtin vs XNNPACK {sqnr_db(fast, slow):.1f} dB")
    assert sqnr_db(fast, slow) >= MIN_SQNR_DB


def test_pack_layout_is_ai_edge_quantizers():
    """Row-major, lowest bits first: byte for byte what ai-edge-quantizer writes for INT4 and INT2."""
    from ai_edge_quantizer.transformations.transformation_utils import pack_data

    from edgeq.converters.parity_tflite import pack_codes, unpack_codes

    rng = np.random.default_rng(0)
    for bits in (4, 2):
        codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(6, 64), dtype=np.int8)
        packed = pack_codes(codes, bits)
        assert np.array_equal(packed, pack_data(bits, codes.ravel().view(np.uint8)))
        assert np.array_equal(unpack_codes(packed, bits, codes.size).reshape(codes.shape), codes)


def _refusals(plan, precision="int4-dynamic"):
    from edgeq.converters.tflite import TFLiteConverter

    return TFLiteConverter().check(request_for(plan, precision=precision))


def test_refuses_what_litert_cannot_hold_naming_layer_and_remedy():
    import dataclasses

    from edgeq.load import load_model
    from edgeq.plan import PerGroup, QDtype, QuantPlan, TensorQuant

    loaded = load_model("tests.converters.test_tflite_lowbit:stack")
    weight = dict(linears(loaded.module))["layers.0"].weight.detach()
    good = lowbit_layer("layers.0", weight, 4, 32)
    cases = {}
    # Asymmetric codes: LiteRT's low-bit kernels have no zero point.
    from edgeq.calibration.lowbit.grid import Grid
    from edgeq.calibration.lowbit.rtn import rtn
    from edgeq.calibration.lowbit.to_plan import layer_plan
    from edgeq.plan import OpKind

    cases["asymmetric"] = layer_plan("layers.0", OpKind.LINEAR, rtn(weight, Grid(4, 32, symmetric=False)))
    # Blocks of 16 columns: XNNPACK takes multiples of 32.
    wide = good.weight
    scale16 = np.repeat(wide.scale, 2, axis=1)
    cases["group 16"] = dataclasses.replace(good, weight=TensorQuant(QDtype.INT4, PerGroup(1, 16), True, scale16, np.zeros_like(scale16, np.int32)))
    # Scales off the bfloat16 grid: XNNPACK would round them.
    off = wide.scale.copy()
    off.view(np.uint32)[0, 0] |= 1
    cases["not bf16"] = dataclasses.replace(good, weight=TensorQuant(QDtype.INT4, wide.granularity, True, off, wide.zero_point))
    # Below float16's normal range.
    tiny = np.full_like(wide.scale, 2.0**-20)
    cases["subnormal"] = dataclasses.replace(good, weight=TensorQuant(QDtype.INT4, wide.granularity, True, tiny, wide.zero_point))
    cases["static"] = dataclasses.replace(good, activation=wide)
    # Per-channel int4 with code -8 (MSE clipping reaches it): LiteRT's builtin kernel computes it wrongly.
    clipped = layer_plan("layers.0", OpKind.LINEAR, rtn(weight, Grid(4, None), "mse"))
    assert clipped.weight_codes.min() == -8
    cases["per-channel -8"] = clipped
    expected = {
        "asymmetric": "no zero point", "group 16": "multiple of 32", "not bf16": "bfloat16 grid",
        "subnormal": "normal values", "static": "plan no activation scales", "per-channel -8": "[-7, 7]",
    }
    for case, entry in cases.items():
        plan = QuantPlan("int4-dynamic", "tflite-xnnpack", {"layers.0": entry})
        refusals = _refusals(plan)
        assert [r.layer for r in refusals] == ["layers.0"], case
        assert expected[case] in refusals[0].reason, (case, refusals[0].reason)
    assert _refusals(QuantPlan("int4-dynamic", "tflite-xnnpack", {"layers.0": good})) == []


@pytest.mark.parametrize("precision", ["int4-weight", "int3-weight", "int2-weight", "lut4-weight"])
def test_float_activation_low_bit_is_refused_naming_int4_dynamic(precision):
    (refusal,) = _refusals(None, precision)
    assert "use int4-dynamic" in refusal.reason and "int8-weight" in refusal.reason


class Small(nn.Module):
    """128 -> 256 -> 64 planned, a float head kept with --keep-float."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 32)

    def forward(self, x):
        return self.head(self.body(x))


def small():
    torch.manual_seed(0)
    return Small().eval(), (torch.randn(1, 8, 128),)


def test_pipeline_plans_on_the_bf16_grid_and_validates_with_parity(tmp_path):
    import json

    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions
    from edgeq.validate.verdict import Verdict

    model = load_model("tests.converters.test_tflite_lowbit:small")
    options = ConvertOptions(
        targets=["tflite"], out=tmp_path, precisions=["int4-dynamic"], samples=2, keep_float=["head"],
        quantize=QuantizeOptions(algorithm="rtn", group_size=32, calibration_samples=2),
    )
    (outcome,) = convert(model, options)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert manifest["weight_parity"]["checked_layers"] == 2 and manifest["weight_parity"]["mismatches"] == []
    assert any("low-bit FULLY_CONNECTED" in note for note in manifest["notes"])


# -- embedding tables (EMBEDDING_LOOKUP) beside low-bit and int8 layers --------------------------------------------


class Lookup(nn.Module):
    """Word and token-type tables looked up by inputs, position rows through a buffer (a constant lookup)."""

    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(100, 64, padding_idx=0)
        self.position = nn.Embedding(16, 64)
        self.kind = nn.Embedding(2, 64)
        self.register_buffer("positions", torch.arange(16).unsqueeze(0), persistent=False)
        self.norm = nn.LayerNorm(64)  # BERT's: the converter folds its affine into a following FC unless kept apart
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 8)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.2, 0.2)

    def forward(self, input_ids, token_type_ids):
        x = self.norm(self.word(input_ids) + self.position(self.positions[:, : input_ids.shape[1]]) + self.kind(token_type_ids))
        return self.head(self.down(torch.relu(self.up(x)))) + x[..., :8]  # the normalized tensor also feeds a residual


def lookup():
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (1, 8))
    return Lookup().eval(), {"input_ids": ids, "token_type_ids": ids % 2}


def table_entry(fqn: str, table: torch.Tensor, bits: int):
    """A table on LiteRT's grid: 4-bit blocks of 32 with bfloat16 scales, or int8 per row."""
    from edgeq.calibration.lowbit.grid import Grid
    from edgeq.calibration.lowbit.rtn import rtn
    from edgeq.calibration.lowbit.to_plan import layer_plan
    from edgeq.calibration.weights import quantize_weight_per_channel
    from edgeq.plan import LayerPlan, OpKind, QDtype

    if bits == 8:
        return LayerPlan(fqn, OpKind.EMBEDDING, *quantize_weight_per_channel(table, QDtype.INT8, axis=0))
    return layer_plan(fqn, OpKind.EMBEDDING, rtn(table, Grid(4, 32, True, "bfloat16"), "mse"))


@pytest.fixture(scope="module")
def tables_converted(tmp_path_factory):
    from edgeq.converters.tflite import TFLiteConverter
    from edgeq.load import load_model
    from edgeq.plan import QuantPlan

    loaded = load_model("tests.converters.test_tflite_lowbit:lookup")
    modules = dict(loaded.module.inner.named_children())
    plan = QuantPlan("int4-dynamic", "tflite", {
        "word": table_entry("word", modules["word"].weight.detach(), 4),
        "position": table_entry("position", modules["position"].weight.detach(), 4),
        "kind": table_entry("kind", modules["kind"].weight.detach(), 8),
        "up": lowbit_layer("up", modules["up"].weight.detach(), 4, 32),
        "down": lowbit_layer("down", modules["down"].weight.detach(), 8, None),  # an int8 fallback (hybrid)
    })
    request = request_for(plan, loaded, target="tflite")
    assert TFLiteConverter().check(request) == []
    artifact = TFLiteConverter().convert(request, tmp_path_factory.mktemp("tables") / "model.tflite")
    return request, artifact


def test_tables_are_packed_exactly_beside_low_bit_and_int8_layers(tables_converted):
    from edgeq.converters.parity import artifact_weights, compare_weights
    from edgeq.converters.parity_tflite import INT4, INT8, read_model, tensor_name

    request, artifact = tables_converted
    parity = compare_weights(request.plan, artifact_weights(artifact.path, "tflite"))
    assert parity.mismatches == [] and parity.missing == [] and parity.checked == 4
    # A lookup of constant positions is folded by litert-torch into float rows (the plan's, see below): said, not hidden.
    assert parity.removed == ["position"]
    assert any("folded by the converter" in note and note.endswith("position") for note in artifact.notes)
    model = read_model(artifact.path.read_bytes())
    tensors = {tensor_name(t): t for t in model.subgraphs[0].tensors}
    assert (tensors["word.weight"].type, tensors["kind.weight"].type) == (INT4, INT8)
    assert len(model.buffers[tensors["word.weight"].buffer].data) == 100 * 64 // 2  # 4 bits a code
    float_tables = [tensor_name(t) for t in model.subgraphs[0].tensors if t.type == 0 and list(t.shape) in ([100, 64], [16, 64], [2, 64])]
    assert float_tables == []  # no float table left beside the codes


def test_lookups_return_the_plans_rows_bit_for_bit(tables_converted):
    """Every EMBEDDING_LOOKUP output (default delegates; XNNPACK leaves lookups to the builtin kernel) equals the
    plan's dequantized rows exactly, and the folded position rows are the plan's too."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeq.converters.parity_tflite import constant, op_names, read_model, tensor_name

    request, artifact = tables_converted
    plan, (ids, kinds) = request.plan, (t.numpy() for t in request.model.example_inputs)
    rows = {f: plan.layers[f].weight.dequantize(plan.layers[f].weight_codes) for f in ("word", "position", "kind")}
    interpreter = Interpreter(model_path=str(artifact.path), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    interpreter.get_signature_runner()(input_ids=ids.astype(np.int32), token_type_ids=kinds.astype(np.int32))
    model = read_model(artifact.path.read_bytes())
    names, subgraph = op_names(model), model.subgraphs[0]
    looked_up = {}
    for op in subgraph.operators:
        if names[op.opcodeIndex] == "EMBEDDING_LOOKUP":
            table = tensor_name(subgraph.tensors[op.inputs[1]]).removesuffix(".weight")
            looked_up[table] = interpreter.get_tensor(int(op.outputs[0]))
    assert np.array_equal(looked_up["word"], rows["word"][ids[0]]) and np.array_equal(looked_up["kind"], rows["kind"][kinds[0]])
    folded = [constant(model, t) for t in subgraph.tensors if t.type == 0 and list(t.shape) == [1, 8, 64]]
    assert any(v is not None and np.array_equal(v[0], rows["position"][:8]) for v in folded)


def test_tables_litert_cannot_hold_are_refused():
    import dataclasses

    from edgeq.calibration.lowbit.grid import Grid
    from edgeq.calibration.lowbit.rtn import rtn
    from edgeq.calibration.lowbit.to_plan import layer_plan
    from edgeq.converters.tflite import TFLiteConverter
    from edgeq.load import load_model
    from edgeq.plan import OpKind, QuantPlan

    loaded = load_model("tests.converters.test_tflite_lowbit:lookup")
    table = dict(loaded.module.inner.named_children())["word"].weight.detach()
    asymmetric = layer_plan("word", OpKind.EMBEDDING, rtn(table, Grid(4, 32, False, "bfloat16")))
    int8_blocks = layer_plan("word", OpKind.EMBEDDING, rtn(table, Grid(8, 32, True)))
    off_grid = table_entry("word", table, 4)
    scale = off_grid.weight.scale.copy()
    scale.view(np.uint32)[0, 0] |= 1  # no longer a float16 value
    off_grid = dataclasses.replace(off_grid, weight=dataclasses.replace(off_grid.weight, scale=scale))
    expected = {"zero point 0": asymmetric, "int8 per row": int8_blocks, "normal float16": off_grid}
    for words, entry in expected.items():
        request = request_for(QuantPlan("int4-dynamic", "tflite", {"word": entry}), loaded, target="tflite")
        (refusal,) = TFLiteConverter().check(request)
        assert refusal.layer == "word" and words in refusal.reason, refusal


class DeadBranch(nn.Module):
    """`pooler` runs but its output is unused (as BERT's pooler under a mean-pooled sentence embedding)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 64)
        self.pooler = nn.Linear(64, 64)

    def forward(self, x):
        y = self.body(x)
        self.pooler(y[:, 0])
        return y


def dead_branch():
    torch.manual_seed(0)
    return DeadBranch().eval(), (torch.randn(1, 4, 64),)


def test_a_planned_layer_removed_as_dead_code_is_noted_not_refused(tmp_path):
    from edgeq.converters.parity import artifact_weights, compare_weights
    from edgeq.converters.tflite import TFLiteConverter
    from edgeq.load import load_model
    from edgeq.plan import QuantPlan

    loaded = load_model("tests.converters.test_tflite_lowbit:dead_branch")
    modules = dict(linears(loaded.module))
    plan = QuantPlan("int4-dynamic", "tflite", {f: lowbit_layer(f, modules[f].weight.detach(), 4, 32) for f in ("body", "pooler")})
    artifact = TFLiteConverter().convert(request_for(plan, loaded, target="tflite"), tmp_path / "model.tflite")
    assert "not in the converted model (removed by litert-torch as unused): pooler" in artifact.notes
    parity = compare_weights(plan, artifact_weights(artifact.path, "tflite"))
    assert (parity.checked, parity.mismatches, parity.removed) == (1, [], ["pooler"])


def test_tables_and_layers_compute_the_plans_function(tables_converted):
    """Against PyTorch with the plan's dequantized weights: only the int8 activations of the low-bit FCs differ.
    A packer that wrote the plan's codes over weights the converter had folded a LayerNorm's affine into (what
    litert-torch does to a float FC after a LayerNorm) lands near 0 dB."""
    from edgeq.validate.metrics import sqnr_db
    from edgeq.validate.runners import open_runner

    request, artifact = tables_converted
    reference = dequantized_module(request.model.module, request.plan)
    with torch.no_grad():
        (expected,) = reference(*request.model.example_inputs)
    feeds = {n: t.numpy() for n, t in zip(request.model.input_names, request.model.example_inputs)}
    (output,) = open_runner(artifact.path, "tflite", threads=1).run(feeds).values()
    print(f"SQNR {sqnr_db(expected.numpy(), output):.1f} dB")  # measured 59.6 dB; 26 dB with the affine folded in
    assert sqnr_db(expected.numpy(), output) >= MIN_SQNR_DB
