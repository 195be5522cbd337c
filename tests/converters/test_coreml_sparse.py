"""Core ML sparse weights (converters/coreml_sparse.py): a 2:4-pruned stack (128 -> 256 -> 64 pruned, a 64 -> 10
head left dense by the pruning stage) converted int8-weight, int4-weight and fp16, checked four ways:
- the stored ops: constexpr_sparse_blockwise_shift_scale -> constexpr_sparse_to_dense (quantized) or
  constexpr_sparse_to_dense (fp16) for the pruned layers, the head dense;
- weight parity: the codes read back (masked weights at their zero point) equal the plan's, zero mismatches;
- the MIL reference executor: every pruned weight materializes as exactly 0, and the program's output is in the
  fp16 band against PyTorch running the plan's dequantized weights (the weights are identical);
- size: weight.bin of the 2:4 int8 artifact against the int8-only (dense) one of the same model: 2:4 stores
  1 mask bit + half of the 8-bit codes per weight, 5/8 of dense. Measured: 33.5 kB against 52.4 kB (0.64x, with the
  dense int8 head, fp16 scales and biases).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.rtn import rtn
from edgeq.calibration.lowbit.to_plan import layer_plan
from edgeq.calibration.weights import quantize_weight_per_channel
from edgeq.compress.sparsity import prune_sparse
from edgeq.compress.spec import PruneSpec
from edgeq.converters.base import ConversionRequest
from edgeq.load import load_model
from edgeq.plan import LayerPlan, OpKind, QDtype, QuantPlan
from edgeq.targets import Precision, load_profile
from tests.conftest import COREML

pytestmark = COREML

PRUNED = ("up", "down")
FP16_BAND_DB = (55.0, 85.0)  # tests/validate/test_mil_executor.py: FP16 programs measured 64-71 dB


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def dense_stack():
    torch.manual_seed(0)
    return Stack().eval(), (torch.randn(3, 128),)


def pruned_stack():
    module, example = dense_stack()
    result = prune_sparse(module, PruneSpec("nm", 0.5, n=2, m=4, text="2:4"), None, None, example)
    assert sorted(result.layers) == sorted(PRUNED) and "head" in result.skipped
    return result.module, example


def _modules(model) -> dict[str, nn.Module]:
    return {name.removeprefix("inner."): child for name, child in model.module.named_modules()}


def int8_plan(model) -> QuantPlan:
    plan = QuantPlan(Precision.INT8_WEIGHT.value, "coreml")
    for fqn in (*PRUNED, "head"):
        quant, codes = quantize_weight_per_channel(_modules(model)[fqn].weight, QDtype.INT8, scale_dtype="float16")
        plan.layers[fqn] = LayerPlan(fqn, OpKind.LINEAR, quant, codes)
    return plan


def int4_plan(model, symmetric: bool) -> QuantPlan:
    plan = QuantPlan(Precision.INT4_WEIGHT.value, "coreml")
    for fqn in PRUNED:
        grid = Grid(4, 32, symmetric, "float16")
        plan.layers[fqn] = layer_plan(fqn, OpKind.LINEAR, rtn(_modules(model)[fqn].weight.detach(), grid, "mse"))
    return plan


def convert(model, precision: Precision, plan: QuantPlan | None, path, profile=None):
    from edgeq.converters import get_converter

    request = ConversionRequest(model, profile or load_profile("coreml"), precision, plan)
    converter = get_converter(request.profile.runtime)
    assert converter.check(request) == []
    return converter.convert(request, path)


def weight_bytes(path) -> int:
    return (path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


def op_types(path) -> dict[str, set[str]]:
    """{layer FQN: the constexpr op types stored for its weight}."""
    from edgeq.converters.parity_coreml import fqn_of
    from edgeq.validate.mil import read_program

    found: dict[str, set[str]] = {}
    for op in read_program(path).operations():
        decoded = fqn_of(op.name)
        if op.type.startswith("constexpr_") and decoded is not None:
            found.setdefault(decoded[0].removeprefix("inner.").removesuffix(".weight"), set()).add(op.type)
    return found


def materialized(path) -> dict[str, np.ndarray]:
    """{FQN: the dense weight the MIL reference executor materializes for each layer (the op named after it)}."""
    from edgeq.converters.parity_coreml import fqn_of
    from edgeq.validate.mil import MILExecutor

    executor = MILExecutor(path)
    found = {}
    for op in executor.function.ops:
        decoded = fqn_of(op.name)
        if op.type.startswith("constexpr_") and decoded is not None and not decoded[1].startswith("_sparse"):
            found[decoded[0].removeprefix("inner.").removesuffix(".weight")] = executor.constant(op.outputs[0][0])
    return found


def output_sqnr(model, weights: dict[str, np.ndarray], path) -> float:
    """SQNR of the artifact run by the MIL reference executor against PyTorch running `weights`."""
    from edgeq.validate.metrics import sqnr_db
    from edgeq.validate.runners.coreml import CoreMLRunner

    module = copy.deepcopy(model.module)
    x = np.random.default_rng(1).standard_normal((3, 128)).astype(np.float32)
    with torch.no_grad():
        for fqn, weight in weights.items():
            _modules_of(module)[fqn].weight.copy_(torch.from_numpy(weight))
        (expected,) = module(torch.from_numpy(x))
    (output,) = CoreMLRunner(path).run({model.input_names[0]: x}).values()
    return sqnr_db(expected.numpy(), output)


def _modules_of(module) -> dict[str, nn.Module]:
    return {name.removeprefix("inner."): child for name, child in module.named_modules()}


@pytest.fixture(scope="module")
def models():
    return load_model("tests.converters.test_coreml_sparse:dense_stack"), load_model("tests.converters.test_coreml_sparse:pruned_stack")


def test_2_4_int8_is_stored_sparse_exactly_and_smaller_than_int8_only(tmp_path, models):
    from edgeq.converters.parity import artifact_weights, compare_weights

    dense, pruned = models
    dense_artifact = convert(dense, Precision.INT8_WEIGHT, int8_plan(dense), tmp_path / "dense.mlpackage")
    plan = int8_plan(pruned)
    artifact = convert(pruned, Precision.INT8_WEIGHT, plan, tmp_path / "sparse.mlpackage")

    stored = op_types(artifact.path)
    for fqn in PRUNED:
        assert stored[fqn] == {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"}, stored
    assert "sparse" not in " ".join(stored["head"])
    assert any("up: weight stored sparse (int8 non-zeros + a 1-bit mask; 50.0% zeros)" in n for n in artifact.notes)
    assert any("raised from iOS16 to iOS18" in n for n in artifact.notes)

    parity = compare_weights(plan, artifact_weights(artifact.path, "coreml"))
    assert (parity.checked, parity.mismatches, parity.missing, parity.removed) == (3, [], [], [])

    weights = {fqn: plan.layers[fqn].weight.dequantize(plan.layers[fqn].weight_codes) for fqn in plan.layers}
    executed = materialized(artifact.path)
    for fqn in PRUNED:
        zeros = _modules(pruned)[fqn].weight.detach().numpy() == 0
        assert np.all(weights[fqn][zeros] == 0) and np.all(executed[fqn][zeros] == 0)  # pruned: 0 in plan and artifact
        np.testing.assert_array_equal(executed[fqn], weights[fqn].astype(np.float16))
    sqnr = output_sqnr(pruned, weights, artifact.path)
    assert FP16_BAND_DB[0] <= sqnr <= FP16_BAND_DB[1], sqnr

    sparse_size, dense_size = weight_bytes(artifact.path), weight_bytes(dense_artifact.path)
    assert sparse_size < 0.66 * dense_size, (sparse_size, dense_size)

    from edgeq.footprint import layer_storage

    for fqn, (n, k) in {"up": (256, 128), "down": (64, 256)}.items():  # the report's account: mask + non-zero codes
        assert layer_storage(plan.layers[fqn], "coreml", 16).code_bits == n * k + n * k // 2 * 8
        assert layer_storage(plan.layers[fqn], "onnx").code_bits == n * k * 8  # ONNX stores them dense
    assert layer_storage(plan.layers["head"], "coreml", 16).code_bits == 640 * 8


@pytest.fixture(scope="module")
def asymmetric_profile(tmp_path_factory):
    """coreml-cpu with uint4 codes allowed (as tests/converters/test_coreml_lowbit.py: shipped profiles are symmetric)."""
    text = load_profile("coreml-cpu").path.read_text().replace('id = "coreml-cpu"', 'id = "coreml-asym"')
    text = text.replace("weight_symmetric = true", "weight_symmetric = false").replace('"int4",', '"int4", "uint4",')
    path = tmp_path_factory.mktemp("profile") / "coreml-asym.toml"
    path.write_text(text)
    return load_profile(path)


@pytest.mark.parametrize("symmetric", [True, False])
def test_2_4_int4_joint_form_keeps_codes_and_zero_points(tmp_path, models, asymmetric_profile, symmetric):
    from edgeq.converters.parity import artifact_weights, compare_weights

    _, pruned = models
    plan = int4_plan(pruned, symmetric)
    artifact = convert(pruned, Precision.INT4_WEIGHT, plan, tmp_path / "model.mlpackage", None if symmetric else asymmetric_profile)
    assert op_types(artifact.path)["up"] == {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"}
    parity = compare_weights(plan, artifact_weights(artifact.path, "coreml"))
    assert (parity.checked, parity.mismatches, parity.missing) == (2, [], [])
    executed = materialized(artifact.path)
    weights = {fqn: plan.layers[fqn].weight.dequantize(plan.layers[fqn].weight_codes) for fqn in PRUNED}
    for fqn in PRUNED:
        zeros = _modules(pruned)[fqn].weight.detach().numpy() == 0
        assert np.all(executed[fqn][zeros] == 0)
        np.testing.assert_array_equal(executed[fqn], weights[fqn].astype(np.float16))
    weights["head"] = _modules(pruned)["head"].weight.detach().numpy()
    sqnr = output_sqnr(pruned, weights, artifact.path)
    assert FP16_BAND_DB[0] <= sqnr <= FP16_BAND_DB[1], sqnr


def test_fp16_pruned_layers_are_sparse_to_dense_and_a_dense_model_is_unchanged(tmp_path, models):
    dense, pruned = models
    artifact = convert(pruned, Precision.FP16, None, tmp_path / "sparse.mlpackage")
    stored = op_types(artifact.path)
    assert stored["up"] == {"constexpr_sparse_to_dense"} and stored["down"] == {"constexpr_sparse_to_dense"}
    executed = materialized(artifact.path)
    weights = {fqn: _modules(pruned)[fqn].weight.detach().numpy() for fqn in PRUNED}
    for fqn in PRUNED:
        assert executed[fqn].dtype == np.float16
        np.testing.assert_array_equal(executed[fqn], weights[fqn].astype(np.float16))
    sqnr = output_sqnr(pruned, {}, artifact.path)
    assert FP16_BAND_DB[0] <= sqnr <= FP16_BAND_DB[1], sqnr
    plain = convert(dense, Precision.FP16, None, tmp_path / "dense.mlpackage")
    assert not any("sparse" in note for note in plain.notes) and weight_bytes(artifact.path) < 0.62 * weight_bytes(plain.path)  # 9/16 of dense
