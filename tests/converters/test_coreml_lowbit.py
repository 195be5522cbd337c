"""Core ML low-bit packing (converters/coreml_lowbit.py): the saved .mlpackage holds exactly the plan's codes,
fp16 scales, zero points and palettes, and runs.

For each supported combination a tiny stack (128 -> 256 -> 64 packed, a 64 -> 10 head kept float) is planned
with calibration/lowbit (RTN on the target's fp16 grid, or k-means palettes with fp16 LUTs), converted with the
converter directly, and checked three ways:
- weight parity: the stored data/scale/offset or indices/LUT read back equal the plan's (zero mismatches);
- the MIL reference executor's materialized weight (what the constexpr op computes, fp16) equals the plan's
  dequantized weight rounded to fp16, bit for bit;
- the artifact run through validate/runners (off macOS: the MIL reference executor) against PyTorch run with
  the plan's dequantized weights: the weights are identical, so only fp16 arithmetic differs. Measured here:
  65-68 dB; the band is tests/validate/test_mil_executor.py's for fp16 programs (an fp32 program, or a wrong
  weight, would land outside it).
And the bytes: the weight file grows by the packed bits per weight plus fp16 scales/LUTs, nothing more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.kmeans import palettize
from edgeq.calibration.lowbit.rtn import rtn
from edgeq.calibration.lowbit.to_plan import layer_plan
from edgeq.converters.base import ConversionRequest
from edgeq.errors import ConversionError
from edgeq.load import load_model
from edgeq.plan import OpKind, QDtype, QuantPlan
from edgeq.targets import Precision, load_profile
from tests.conftest import COREML

pytestmark = COREML

PACKED = ("up", "down")  # head stays float
FP16_BAND_DB = (55.0, 85.0)  # tests/validate/test_mil_executor.py: FP16 programs measured 64-71 dB


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def stack():
    torch.manual_seed(0)
    return Stack().eval(), (torch.randn(3, 128),)


@pytest.fixture(scope="module")
def model():
    return load_model("tests.converters.test_coreml_lowbit:stack")


def _weight(model, fqn: str) -> torch.Tensor:
    return dict(model.module.named_modules())[f"inner.{fqn}" if hasattr(model.module, "inner") else fqn].weight.detach()


def affine_plan(model, precision: Precision, bits: int, group: int | None, symmetric: bool = True,
                scale_dtype: str = "float16", target: str = "coreml") -> QuantPlan:
    plan = QuantPlan(precision.value, target)
    for fqn in PACKED:
        plan.layers[fqn] = layer_plan(fqn, OpKind.LINEAR, rtn(_weight(model, fqn), Grid(bits, group, symmetric, scale_dtype), "minmax"))
    return plan


def palette_plan(model, precision: Precision, bits: int, group_channels: int | None, lut_dtype=torch.float16,
                 target: str = "coreml-ane") -> QuantPlan:
    from edgeq.converters.coreml_lowbit import lut_layer

    plan = QuantPlan(precision.value, target)
    per = "tensor" if group_channels is None else "grouped_channels"
    for fqn in PACKED:
        palette = palettize(_weight(model, fqn), bits, per=per, group_channels=group_channels, lut_dtype=lut_dtype, iters=5)
        plan.layers[fqn] = lut_layer(fqn, palette)
    return plan


def _convert(model, profile, precision: Precision, plan: QuantPlan, folder):
    from edgeq.converters import get_converter

    request = ConversionRequest(model, profile, precision, plan)
    converter = get_converter(profile.runtime)
    assert converter.check(request) == []
    return converter.convert(request, folder / "model.mlpackage")


def planned_weight(layer) -> np.ndarray:
    """The plan's dequantized weight, float32 [N, K]."""
    from edgeq.converters.coreml_lowbit import palette_of

    lut = palette_of(layer)
    if lut is None:
        return layer.weight.dequantize(layer.weight_codes)
    rows = layer.weight_codes.shape[0]
    return np.take_along_axis(np.repeat(lut, rows // lut.shape[0], axis=0), layer.weight_codes.astype(np.int64), axis=1)


def _materialized(path) -> dict[str, np.ndarray]:
    """{FQN: the weight the MIL reference executor materializes from each named constexpr op (fp16)}."""
    from edgeq.converters.parity_coreml import fqn_of
    from edgeq.validate.mil import MILExecutor

    executor = MILExecutor(path)
    found = {}
    for op in executor.function.ops:
        decoded = fqn_of(op.name)
        if op.type.startswith("constexpr_") and decoded is not None:
            found[decoded[0].removeprefix("inner.").removesuffix(".weight")] = executor.constant(op.outputs[0][0])
    return found


def _torch_with_plan(model, plan: QuantPlan, x: np.ndarray) -> np.ndarray:
    import copy

    module = copy.deepcopy(model.module)
    with torch.no_grad():
        for fqn in PACKED:
            layer = dict(module.named_modules())[f"inner.{fqn}" if hasattr(module, "inner") else fqn]
            layer.weight.copy_(torch.from_numpy(planned_weight(plan.layers[fqn])))
        (output,) = module(torch.from_numpy(x))  # FlatModel: a tuple of the model's outputs
        return output.numpy()


def assert_exact_and_running(model, plan: QuantPlan, path) -> float:
    """Zero parity mismatches, executor weights == plan weights in fp16, output in the fp16 band; the SQNR."""
    from edgeq.converters.parity import artifact_weights, compare_weights
    from edgeq.validate.metrics import sqnr_db
    from edgeq.validate.runners.coreml import CoreMLRunner

    parity = compare_weights(plan, artifact_weights(path, "coreml"))
    assert (parity.checked, parity.mismatches, parity.missing, parity.removed) == (len(PACKED), [], [], [])
    materialized = _materialized(path)
    assert sorted(materialized) == sorted(PACKED)
    for fqn in PACKED:
        expected = planned_weight(plan.layers[fqn]).astype(np.float16)
        assert materialized[fqn].dtype == np.float16
        np.testing.assert_array_equal(materialized[fqn], expected, err_msg=fqn)
    x = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    runner = CoreMLRunner(path)
    (output,) = runner.run({model.input_names[0]: x}).values()
    sqnr = sqnr_db(_torch_with_plan(model, plan, x), output)
    assert FP16_BAND_DB[0] <= sqnr <= FP16_BAND_DB[1], sqnr
    return sqnr


def _weight_file_bytes(path) -> int:
    return (path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


def _assert_size(plan: QuantPlan, path) -> None:
    """weight.bin = the packed layers' stored bits + the float head's fp16 weight + fp16 biases + blob headers."""
    from edgeq.converters.coreml_lowbit import stored_bits

    packed_bytes = sum(-(-(stored_bits(plan.layers[f]).payload_bits) // 8) + stored_bits(plan.layers[f]).side_bits // 8 for f in PACKED)
    float_bytes = 2 * (64 * 10 + 256 + 64 + 10)
    overhead = _weight_file_bytes(path) - packed_bytes - float_bytes
    assert 0 <= overhead <= 64 * 16 + 64 * 12, overhead  # a 64-byte header per blob (and 64-byte alignment)


AFFINE_CASES = [  # precision, bits, group size (None: per channel), symmetric
    (Precision.INT4_WEIGHT, 4, 32, True),
    (Precision.INT4_WEIGHT, 4, None, True),
    (Precision.INT3_WEIGHT, 3, 64, True),
    (Precision.INT2_WEIGHT, 2, 128, True),
    (Precision.INT4_WEIGHT, 4, 32, False),
    (Precision.INT3_WEIGHT, 3, None, False),
]


@pytest.fixture(scope="module")
def asymmetric_profile(tmp_path_factory):
    """coreml-cpu, with asymmetric low-bit codes allowed (the shipped profiles default to symmetric)."""
    source = load_profile("coreml-cpu").path.read_text()
    text = source.replace('id = "coreml-cpu"', 'id = "coreml-asym"').replace("weight_symmetric = true", "weight_symmetric = false")
    text = text.replace('"int4",', '"int4", "uint4", "uint3", "uint2",')
    path = tmp_path_factory.mktemp("profile") / "coreml-asym.toml"
    path.write_text(text)
    return load_profile(path)


@pytest.mark.parametrize(("precision", "bits", "group", "symmetric"), AFFINE_CASES,
                         ids=[f"{b}bit-{'g' + str(g) if g else 'channel'}-{'sym' if s else 'asym'}" for _, b, g, s in AFFINE_CASES])
def test_affine_codes_and_fp16_scales_are_the_plans(tmp_path, model, asymmetric_profile, precision, bits, group, symmetric):
    from edgeq.validate.mil import read_program

    profile = load_profile("coreml") if symmetric else asymmetric_profile
    plan = affine_plan(model, precision, bits, group, symmetric, target=profile.id)
    artifact = _convert(model, profile, precision, plan, tmp_path)
    assert any("raised from iOS16 to iOS18" in note for note in artifact.notes)
    sqnr = assert_exact_and_running(model, plan, artifact.path)
    print(f"{precision} {f'group {group}' if group else 'per channel'} {'sym' if symmetric else 'asym'}: {sqnr:.1f} dB against PyTorch with the plan's weights")
    ops = {op.name: op for op in read_program(artifact.path).operations() if op.type == "constexpr_blockwise_shift_scale"}
    assert len(ops) == len(PACKED)
    for op in ops.values():
        data_type = dict(op.inputs)["data"][0].vtype.dtype
        assert data_type == ("int4" if symmetric else "uint4")  # 2/3-bit codes in the 4-bit container
        assert dict(op.inputs)["scale"][0].vtype.dtype == "float16"
        assert (op.constant("offset") is None) == symmetric
    _assert_size(plan, artifact.path)


PALETTE_CASES = [  # precision, bits, output channels per LUT (None: per tensor)
    (Precision.LUT4_WEIGHT, 4, 16),
    (Precision.LUT2_WEIGHT, 2, 16),
    (Precision.LUT3_WEIGHT, 3, None),
    (Precision.LUT6_WEIGHT, 6, 32),
    (Precision.LUT8_WEIGHT, 8, None),
]


@pytest.mark.parametrize(("precision", "bits", "group_channels"), PALETTE_CASES,
                         ids=[f"lut{b}-{'g' + str(g) if g else 'tensor'}" for _, b, g in PALETTE_CASES])
def test_palette_indices_and_luts_are_the_plans(tmp_path, model, precision, bits, group_channels):
    from edgeq.validate.mil import read_program

    plan = palette_plan(model, precision, bits, group_channels)
    artifact = _convert(model, load_profile("coreml-ane"), precision, plan, tmp_path)
    sqnr = assert_exact_and_running(model, plan, artifact.path)
    print(f"{precision} {group_channels or 'per tensor'}: {sqnr:.1f} dB against PyTorch with the plan's weights")
    ops = [op for op in read_program(artifact.path).operations() if op.type == "constexpr_lut_to_dense"]
    assert len(ops) == len(PACKED)
    for op in ops:
        inputs = dict(op.inputs)
        assert inputs["indices"][0].vtype.dtype == ("uint8" if bits == 8 else f"uint{bits}")
        assert inputs["lut"][0].vtype.dtype == "float16" and inputs["lut"][0].vtype.shape[1:] == (1, 2**bits, 1)
    _assert_size(plan, artifact.path)


def test_int8_layers_of_a_low_bit_plan_take_the_int8_route(tmp_path, model):
    """Per-layer precision: an int8 head beside int4 layers; every layer's numbers are the plan's."""
    from edgeq.calibration.weights import quantize_weight_per_channel
    from edgeq.converters.parity import artifact_weights, compare_weights
    from edgeq.plan import LayerPlan

    plan = affine_plan(model, Precision.INT4_WEIGHT, 4, 32)
    quant, codes = quantize_weight_per_channel(_weight(model, "head"), QDtype.INT8, axis=0, scale_dtype="float16")
    plan.layers["head"] = LayerPlan("head", OpKind.LINEAR, quant, codes)
    artifact = _convert(model, load_profile("coreml"), Precision.INT4_WEIGHT, plan, tmp_path)
    parity = compare_weights(plan, artifact_weights(artifact.path, "coreml"))
    assert (parity.checked, parity.mismatches) == (3, [])


# ---- refusals, before any work -----------------------------------------------------------------------------


def _refusals(model, profile, precision, plan):
    from edgeq.converters import get_converter

    return [str(r) for r in get_converter(profile.runtime).check(ConversionRequest(model, profile, precision, plan))]


def test_neural_engine_takes_palettes_not_blockwise_int4(model):
    ane = load_profile("coreml-ane")
    assert not any(d.startswith(("int4", "uint4", "int3", "int2")) for d in ane.quantization.weight_dtypes)
    (refusal,) = _refusals(model, ane, Precision.INT4_WEIGHT, None)
    assert "int4-weight is not supported by target coreml-ane" in refusal
    # a palette scheme whose plan has one int4 layer: that layer is named, with the ANE's low-bit form
    plan = palette_plan(model, Precision.LUT4_WEIGHT, 4, 16)
    plan.layers["down"] = affine_plan(model, Precision.INT4_WEIGHT, 4, 32).layers["down"]
    (refusal,) = _refusals(model, ane, Precision.LUT4_WEIGHT, plan)
    assert refusal.startswith("down: int4 weights: target coreml-ane holds int8, lut2") and "palettes" in refusal


def test_scales_or_luts_off_the_fp16_grid_are_refused(model):
    plan = affine_plan(model, Precision.INT4_WEIGHT, 4, 32, scale_dtype="float32")
    refusals = _refusals(model, load_profile("coreml"), Precision.INT4_WEIGHT, plan)
    assert len(refusals) == 2 and all("are not float16 numbers" in r and "scale_dtype float16" in r for r in refusals)
    assert refusals[0].startswith("up: ")
    with pytest.raises(ConversionError, match=r"target coreml refuses int4-weight:\n  - up: \d+ of 1024 scales are not float16"):
        from edgeq.converters.coreml import CoreMLConverter

        CoreMLConverter().convert(ConversionRequest(model, load_profile("coreml"), Precision.INT4_WEIGHT, plan), None)
    plan = palette_plan(model, Precision.LUT4_WEIGHT, 4, None, lut_dtype=torch.float32)
    refusals = _refusals(model, load_profile("coreml-ane"), Precision.LUT4_WEIGHT, plan)
    assert len(refusals) == 2 and all("LUT values are not float16 numbers" in r for r in refusals)


def test_what_the_target_does_not_hold_is_refused_per_layer(model):
    profile = load_profile("coreml")
    plan = affine_plan(model, Precision.INT4_WEIGHT, 4, 16)  # group 16: not a size the profile lists
    assert all("group size 16: target coreml runs groups of 32, 64, 128" in r for r in _refusals(model, profile, Precision.INT4_WEIGHT, plan))
    plan = affine_plan(model, Precision.INT4_WEIGHT, 4, 32, symmetric=False)  # uint4 codes, zero points
    assert all("uint4 weights: target coreml holds int8, int4, int3, int2, lut2" in r for r in _refusals(model, profile, Precision.INT4_WEIGHT, plan))
    plan = affine_plan(model, Precision.INT4_WEIGHT, 4, 32)
    plan.layers["up"].dynamic_activation = QDtype.INT8  # int4-dynamic: Core ML has no run-time activation quantization
    plan.layers["nowhere"] = plan.layers["down"]
    refusals = _refusals(model, profile, Precision.INT4_WEIGHT, plan)
    assert refusals[0].startswith("up: low-bit Core ML weights take float activations (weight-only)")
    assert refusals[1].startswith("nowhere: low-bit weights are lowered for nn.Linear layers and (affine, not palettes) nn.Embedding tables")


def test_int4_weight_through_the_pipeline(tmp_path):
    """edgeq.pipeline: plan (targets/resolve_lowbit.py, on the profile's fp16 grid), pack, weight parity in the
    manifest, validation by the MIL reference executor off macOS."""
    import json

    from edgeq.validate.verdict import Verdict
    from tests.helpers import convert_source

    outcome = convert_source("edgeq.examples:tiny_mlp", "coreml", "int4-weight", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert manifest["weight_parity"]["checked_layers"] >= 1 and manifest["weight_parity"]["mismatches"] == []
    assert any("raised from iOS16 to iOS18" in note for note in manifest["notes"])


# ---- embedding tables and mixed bit widths in one program ------------------------------------------------------


from tests.converters.models import Tokens, tokens  # noqa: E402,F401  (`...test_coreml_lowbit:tokens` sources)


def test_tables_and_mixed_bit_widths_are_the_plans(tmp_path):
    """4-bit tables per group (gathered from constexpr_blockwise_shift_scale), an int8 table per row (the int8
    route), int4 and blockwise int8 linear layers, an int8 per-channel fallback and a float head, in one program:
    zero parity mismatches, the executor's materialized weights are the plan's in fp16, outputs in the fp16 band."""
    from edgeq.calibration.weights import quantize_weight_per_channel
    from edgeq.converters.parity import artifact_weights, compare_weights
    from edgeq.plan import LayerPlan
    from edgeq.validate.metrics import sqnr_db
    from edgeq.validate.runners.coreml import CoreMLRunner

    loaded = load_model("tests.converters.test_coreml_lowbit:tokens")

    def fitted(fqn, op, bits, group):
        return layer_plan(fqn, op, rtn(_weight(loaded, fqn), Grid(bits, group, True, "float16"), "mse"))

    def int8(fqn, op):
        return LayerPlan(fqn, op, *quantize_weight_per_channel(_weight(loaded, fqn), QDtype.INT8, axis=0, scale_dtype="float16"))

    layers = [fitted("word", OpKind.EMBEDDING, 4, 32), fitted("position", OpKind.EMBEDDING, 4, 64), int8("kind", OpKind.EMBEDDING),
              fitted("up", OpKind.LINEAR, 4, 32), fitted("mid", OpKind.LINEAR, 8, 32), int8("down", OpKind.LINEAR)]
    plan = QuantPlan(Precision.INT4_WEIGHT.value, "coreml", {layer.fqn: layer for layer in layers})
    artifact = _convert(loaded, load_profile("coreml"), Precision.INT4_WEIGHT, plan, tmp_path)
    parity = compare_weights(plan, artifact_weights(artifact.path, "coreml"))
    assert (parity.checked, parity.mismatches, parity.missing, parity.removed) == (6, [], [], [])
    materialized = _materialized(artifact.path)
    for fqn in ("word", "position", "up", "mid"):
        expected = plan.layers[fqn].weight.dequantize(plan.layers[fqn].weight_codes).astype(np.float16)
        np.testing.assert_array_equal(materialized[fqn], expected, err_msg=fqn)
    from coremltools.converters.mil.mil import types

    from edgeq.converters.parity_coreml import fqn_of, load_program, operations

    stored = {fqn_of(op.name)[0].removeprefix("inner.").removesuffix(".weight"): types.builtin_to_string(op.data.dtype)
              for op in operations(load_program(artifact.path)) if op.op_type == "constexpr_blockwise_shift_scale"}
    assert stored == {"word": "int4", "position": "int4", "up": "int4", "mid": "int8", "kind": "int8", "down": "int8"}  # iOS18 writes the int8 route so too
    feeds = {name: t.numpy().astype(np.int32) for name, t in zip(loaded.input_names, loaded.example_inputs)}
    (output,) = CoreMLRunner(artifact.path).run(feeds).values()
    import copy

    reference = copy.deepcopy(loaded.module)
    with torch.no_grad():
        for fqn, layer in plan.layers.items():
            dict(reference.named_modules())[f"inner.{fqn}"].weight.copy_(torch.from_numpy(layer.weight.dequantize(layer.weight_codes)))
        (expected,) = reference(*loaded.example_inputs)
    assert FP16_BAND_DB[0] <= sqnr_db(expected.numpy(), output) <= FP16_BAND_DB[1]
