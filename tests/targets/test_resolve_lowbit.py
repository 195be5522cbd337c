"""Low-bit plans: the target's grid checked before any work, codes and scales decided by GPTQ or RTN on it,
layers that cannot take it float with their reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeq.errors import ConversionError, UsageError
from edgeq.load import load_model
from edgeq.quantize import QuantizeOptions, quantization_plan
from edgeq.targets import Precision, load_profile
from edgeq.validate.budget import parse_budget

PROFILE = """
id = "lowbit-test"
runtime = "onnx"
hardware = "test"
summary = "a target holding 4-bit symmetric weights per group of 32 or 128, fp16 scales"
precisions = ["fp32", "int8-weight", "int4-weight", "int3-weight", "int4-dynamic", "lut4-weight", "lut2-weight"]
default_precision = "fp32"
dynamic_shapes = true
[quantization]
weight_dtypes = ["int8", "int4", "int3", "lut4"]
weight_granularity = ["per_channel", "per_group"]
weight_symmetric = true
group_sizes = [32, 128]
ops = ["linear", "conv"]
scale_dtype = "float16"
"""


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 32)
        self.odd = nn.Linear(32, 8)  # 32 columns: one group of 32, none of 128
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        return self.odd(torch.relu(self.down(torch.relu(self.up(x))))).sum() + self.conv(x[:, :4].unsqueeze(-1)).sum()


def stack():
    torch.manual_seed(0)
    x = torch.randn(2, 64) @ torch.randn(64, 64)  # correlated inputs: a non-diagonal Hessian
    return Stack(), (x,)


@pytest.fixture(scope="module")
def model():
    return load_model("tests.targets.test_resolve_lowbit:stack")


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "lowbit-test.toml"
    path.write_text(PROFILE)
    return load_profile(path)


def samples(count=16):
    generator = torch.Generator().manual_seed(1)
    mix = torch.randn(64, 64, generator=generator)
    return [{"x": (torch.randn(2, 64, generator=generator) @ mix).numpy()} for _ in range(count)]


def plan_for(model, profile, precision=Precision.INT4_WEIGHT, keep=(), **options):
    _, plan, _ = quantization_plan(model, profile, precision, QuantizeOptions(**options), list(keep), samples(), parse_budget(None))
    return plan


def output_error(model, plan, fqn="up"):
    """||X W^T - X Q^T||^2 of the first layer on the calibration inputs (its inputs are the model's)."""
    from edgeq.compress.apply import user_fqn

    layer = {user_fqn(name): module for name, module in model.module.named_modules()}[fqn]
    w = layer.weight.detach().numpy()
    q = plan.layers[fqn].weight.dequantize(plan.layers[fqn].weight_codes)
    x = np.concatenate([s["x"] for s in samples()])
    return float(np.square(x @ (w - q).T).sum())


def test_gptq_plan_holds_exact_fp16_scales_and_beats_round_to_nearest(model, profile):
    gptq = plan_for(model, profile, group_size=32)
    rtn = plan_for(model, profile, group_size=32, algorithm="rtn")
    for plan in (gptq, rtn):
        layer = plan.layers["up"]
        assert layer.weight.dtype == "int4" and layer.weight.granularity.size == 32
        assert layer.weight.scale.shape == (128, 2) and layer.weight_codes.shape == (128, 64)
        assert np.array_equal(layer.weight.scale.astype(np.float16).astype(np.float32), layer.weight.scale)
        assert layer.weight_codes.min() >= -8 and layer.weight_codes.max() <= 7
    assert output_error(model, gptq, "up") <= output_error(model, rtn, "up")
    assert "by gptq (act-order, static groups, MSE clipping) on 16 calibration samples" in " ".join(gptq.notes)
    # ONNX MatMulNBits holds scales as float32 (its input dtype): 4 + 32/32 = 5 bits; only the 1x1 conv stays float
    assert "5.00 bits per weight on the 3 quantized layers (codes, float16 scales held as float32), which hold 99.9%" in gptq.notes[-1]


def test_layers_that_cannot_take_the_grid_stay_float_with_the_reason(model, profile):
    plan = plan_for(model, profile, group_size=128, keep=["down"])
    assert plan.layers["up"].weight is None and "64 input features are not a multiple of the group size 128" in plan.layers["up"].reason
    assert plan.layers["down"].reason == "kept float: --keep-float down"
    assert plan.layers["odd"].reason.startswith("32 input features")
    assert "conv layers stay float" in plan.layers["conv"].reason


def test_per_channel_3_bit_and_dynamic(model, profile):
    plan = plan_for(model, profile, Precision.INT3_WEIGHT, group_size=None, algorithm="rtn")
    layer = plan.layers["down"]
    assert layer.weight.dtype == "int3" and layer.weight.scale.shape == (32,) and layer.weight_codes.min() >= -4
    dynamic = plan_for(model, profile, Precision.INT4_DYNAMIC, algorithm="rtn")
    assert dynamic.layers["up"].dynamic_activation == "int8"


def test_palettes_hold_fp16_tables_and_survive_the_plan_files(model, profile, tmp_path):
    from edgeq.plan import QuantPlan

    plan = plan_for(model, profile, Precision.LUT4_WEIGHT, group_size=32)
    layer = plan.layers["up"]  # 128 output channels: 4 tables of 16 entries
    assert layer.weight is None and not layer.is_float and layer.palette.shape == (4, 16)
    assert layer.weight_codes.dtype == np.uint8 and layer.weight_codes.max() < 16
    assert np.array_equal(layer.palette.astype(np.float16).astype(np.float32), layer.palette)
    assert plan.layers["odd"].palette.shape == (1, 16)  # 8 output channels: one table
    plan.save(tmp_path)
    again = QuantPlan.load(tmp_path).layers["up"]
    assert np.array_equal(again.palette, layer.palette) and np.array_equal(again.weight_codes, layer.weight_codes)


@pytest.mark.parametrize(
    "precision, options, error, words",
    [
        (Precision.INT4_WEIGHT, {"group_size": 64}, ConversionError, "group size 64 is not one it runs (it runs 32, 128)"),
        (Precision.INT2_WEIGHT, {}, ConversionError, "does not hold int2 weights"),
        (Precision.LUT2_WEIGHT, {}, ConversionError, "does not hold lut2 weights"),
    ],
)
def test_requests_the_target_cannot_hold_are_refused_before_any_work(model, profile, precision, options, error, words):
    with pytest.raises(error, match=words.replace("(", "\\(").replace(")", "\\)")):
        plan_for(model, profile, precision, **options)


class Lookup(nn.Module):
    """A table, then a linear: the linear's GPTQ must see the lookups the artifact makes (4-bit rows)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(64, 32)
        self.proj = nn.Linear(32, 16)

    def forward(self, ids):
        return self.proj(self.table(ids))


def lookup():
    torch.manual_seed(0)
    return Lookup().eval(), (torch.arange(16).reshape(1, 16),)


def test_layers_after_a_quantized_table_are_solved_on_its_planned_rows():
    from edgeq.calibration.lowbit.driver import gptq_solver, quantize_layers
    from edgeq.calibration.lowbit.grid import Grid

    loaded = load_model("tests.targets.test_resolve_lowbit:lookup")
    module = loaded.module.inner if hasattr(loaded.module, "inner") else loaded.module
    before = module.table.weight.detach().clone()
    generator = torch.Generator().manual_seed(2)
    ids = [{"ids": torch.randint(0, 64, (2, 16), generator=generator).numpy()} for _ in range(4)]
    options = QuantizeOptions(algorithm="gptq", group_size=32)
    _, plan, _ = quantization_plan(loaded, load_profile("onnx"), Precision.INT4_WEIGHT, options, [], ids, parse_budget(None))
    table = plan.layers["table"]
    assert table.weight is not None and torch.equal(module.table.weight, before)  # planned, and the model untouched

    # the reference: GPTQ on a copy whose table already holds the plan's rows
    import copy

    reference = copy.deepcopy(loaded.module)
    inner = reference.inner if hasattr(reference, "inner") else reference
    with torch.no_grad():
        inner.table.weight.copy_(torch.from_numpy(table.weight.dequantize(table.weight_codes)))
    grid = Grid(4, 32, True, "float32")
    solved = quantize_layers(reference, ids, ["proj"], gptq_solver(grid, actorder=True, static_groups=True, clip="mse"),
                             input_names=["ids"])
    assert np.array_equal(plan.layers["proj"].weight_codes, solved.weights["proj"].codes.numpy().astype(np.int8))
