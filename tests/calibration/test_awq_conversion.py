"""AWQ in conversion (calibration/lowbit/awq_fold.py through edgeq.quantize and the pipeline): scales fold into
the previous LayerNorm or linear only where the whole model's function is unchanged (the folded FP32 model
computes bit for bit what the original does: power-of-two scales), every other layer keeps s = 1 with the
reason in the plan, the plan's codes are of the folded weights and the ONNX artifact carries them with zero
parity mismatches; `--device cuda` is refused clearly where there is no CUDA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgeq.errors import UsageError
from tests.conftest import ONNX


class Block(nn.Module):
    """Each way a layer's input can come: from a norm read only by it (folds), from a linear through ReLU
    (folds), from a norm whose output is also a residual (must not fold), from functional ops (no producer),
    through GELU (not scale-equivariant)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up, self.act, self.down = nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)
        self.norm2 = nn.LayerNorm(64)
        self.mix = nn.Linear(64, 64)
        self.fc1, self.gelu, self.fc2 = nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)

    def forward(self, x):
        h = self.down(self.act(self.up(self.norm(x))))
        r = self.norm2(h + x)
        r = self.mix(r) + r
        return self.fc2(self.gelu(self.fc1(r)))


def block():
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        model.norm.weight[:4] = 12.0  # a few input channels of `up` ~12x the rest: where AWQ's scales pay
    return model, (torch.randn(1, 8, 64),)


LAYERS = ("up", "down", "mix", "fc1", "fc2")


def samples(count=4):
    generator = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(2, 8, 64, generator=generator).numpy()} for _ in range(count)]


def awq_plan(algorithm="awq", precision="int4-weight", device="cpu"):
    from edgeq.load import load_model
    from edgeq.quantize import QuantizeOptions, quantization_plan
    from edgeq.targets import Precision, load_profile
    from edgeq.validate.budget import parse_budget

    model = load_model("tests.calibration.test_awq_conversion:block")
    options = QuantizeOptions(algorithm=algorithm, group_size=32, device=device)
    folded, plan, _ = quantization_plan(model, load_profile("onnx"), Precision(precision), options, [], samples(), parse_budget(None))
    return model, folded, plan


def test_groups_fold_only_where_the_model_is_unchanged():
    from edgeq.calibration.lowbit.awq_fold import check_exact, find_groups

    module, (x,) = block()
    groups = find_groups(module, {"x": x}, ["x"], dict.fromkeys(LAYERS))
    check_exact(module, groups, {"x": x}, ["x"])
    found = {group.consumers: (group.producer, group.between, group.reason) for group in groups}
    assert found[("up",)] == ("norm", None, None)
    assert found[("down",)] == ("up", "act", None)
    assert "folding into norm2 changes the model's outputs" in found[("mix",)][2] and "residual" in found[("mix",)][2]
    assert "no module's output" in found[("fc1",)][2]
    assert "GELU between the linears is not scale-equivariant" in found[("fc2",)][2]


@pytest.mark.parametrize("algorithm", ["awq", "awq+gptq"])
def test_the_folded_model_computes_the_same_and_the_plan_holds_its_codes(algorithm):
    model, folded, plan = awq_plan(algorithm)
    assert folded.module is not model.module
    inner, original = folded.module.inner, model.module.inner
    assert not torch.equal(inner.norm.weight, original.norm.weight)  # the outlier channels' scales went into the norm
    with torch.no_grad():
        for sample in samples(3):
            x = torch.from_numpy(sample["x"])
            assert torch.equal(folded.module(x)[0], model.module(x)[0])  # powers of two: the same floats, not just close
    # the codes are of the folded weights: with the folded norm and biases they compute the model; with the
    # original ones they do not
    folded_error, unfolded_error = (simulated_error(module, plan, model.module) for module in (folded.module, model.module))
    assert folded_error < 0.1 and unfolded_error > 2 * folded_error, (folded_error, unfolded_error)
    notes = "\n".join(plan.notes)
    assert f"by {algorithm} (" in notes
    assert "AWQ up: input scales (alpha" in notes and "folded into norm" in notes
    assert "AWQ mix: input scale 1 (clip search only): folding into norm2 changes the model's outputs" in notes
    assert "AWQ fc2: input scale 1 (clip search only): GELU between" in notes


def test_a_per_layer_awq_entry_folds_only_that_layers_group():
    """--algo gptq for the model, `up=int4:awq` for one layer: only up's scales fold, into the norm."""
    from edgeq.layer_overrides import parse_per_layer
    from edgeq.load import load_model
    from edgeq.quantize import QuantizeOptions, quantization_plan
    from edgeq.targets import Precision, load_profile
    from edgeq.validate.budget import parse_budget

    model = load_model("tests.calibration.test_awq_conversion:block")
    options = QuantizeOptions(algorithm="rtn", group_size=32, layer_overrides=parse_per_layer({"up": "int4:awq"}, "--per-layer"))
    folded, plan, _ = quantization_plan(model, load_profile("onnx"), Precision.INT4_WEIGHT, options, [], samples(), parse_budget(None))
    inner, original = folded.module.inner, model.module.inner
    assert not torch.equal(inner.norm.weight, original.norm.weight)
    assert torch.equal(inner.mix.weight, original.mix.weight) and torch.equal(inner.fc1.weight, original.fc1.weight)
    notes = "\n".join(plan.notes)
    assert "AWQ up: input scales (alpha" in notes and "AWQ mix" not in notes
    assert "awq" in plan.layers["up"].reason and "by rtn" in notes


def simulated_error(module, plan, reference) -> float:
    """Relative output error of `module` with `plan`'s codes in its layers against FP32 `reference`."""
    from edgeq.converters.onnx_lowbit import dequantized_weights

    simulated = dequantized_weights(module, plan.layers)  # every layer of these plans is low-bit
    inputs = [torch.from_numpy(s["x"]) for s in samples(3)]
    with torch.no_grad():
        error = sum(float((simulated(x)[0] - reference(x)[0]).pow(2).sum()) for x in inputs)
        return (error / sum(float(reference(x)[0].pow(2).sum()) for x in inputs)) ** 0.5


def test_awq_beats_round_to_nearest_at_the_output():
    model, folded, plan = awq_plan("awq", "int3-weight")
    rtn_model, rtn_folded, rtn_plan = awq_plan("rtn", "int3-weight")
    assert rtn_folded.module is rtn_model.module  # nothing to fold without AWQ: no copy
    assert simulated_error(folded.module, plan, model.module) < simulated_error(rtn_folded.module, rtn_plan, model.module)


@pytest.mark.skipif(not ONNX, reason="onnx toolchain not installed")
def test_awq_through_the_pipeline_to_onnx_with_weight_parity(tmp_path):
    import onnx
    from onnx import numpy_helper

    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.quantize import QuantizeOptions
    from edgeq.validate.verdict import Verdict

    model = load_model("tests.calibration.test_awq_conversion:block")
    options = ConvertOptions(
        targets=["onnx"], out=tmp_path, precisions=["int4-weight"], samples=2,
        quantize=QuantizeOptions(algorithm="awq", group_size=32, calibration_samples=4),
    )
    (outcome,) = convert(model, options)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    manifest = json.loads((outcome.path / "manifest.json").read_text())
    assert manifest["weight_parity"]["checked_layers"] == len(LAYERS) and manifest["weight_parity"]["mismatches"] == []
    plan = json.loads((outcome.path / "plan.json").read_text())
    assert any(note.startswith("AWQ up: input scales") for note in plan["notes"])
    # the artifact carries the folded norm: the original weight divided by powers of two, not all of them 1
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(outcome.path / "model.onnx")).graph.initializer}
    ratios = model.module.inner.norm.weight.detach().numpy() / stored["inner.norm.weight"]
    assert np.array_equal(np.exp2(np.round(np.log2(ratios))), ratios) and not np.all(ratios == 1), ratios


def test_device_cuda_is_refused_clearly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is accepted here")
    from edgeq.cli import main
    from edgeq.quantize import check_calibration_device

    result = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "int4-weight",
                                       "--device", "cuda", "-o", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert "--device cuda" in result.output and "use --device cpu" in result.output
    assert not any(tmp_path.iterdir())  # refused before any work
    project = tmp_path / "edgeq.toml"
    project.write_text('[defaults]\ndevice = "cuda"\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\ntargets = ["onnx"]\n')
    result = CliRunner().invoke(main, ["convert", "-c", str(project)], catch_exceptions=False)
    assert result.exit_code == 2 and "defaults.device cuda" in result.output, result.output
    with pytest.raises(UsageError, match="--device cuda: torch .* sees no CUDA device"):
        check_calibration_device("cuda")  # the check at calibration, for a CUDA build on a machine without a GPU
    check_calibration_device("cpu")


def test_a_device_typo_is_refused_by_the_option():
    from edgeq.cli import main

    result = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", "--device", "gpu"])
    assert result.exit_code == 2 and "'gpu' is not one of 'cpu', 'cuda'" in result.output


@pytest.mark.ci_may_skip("CI machines have no GPU; the device machine runs this test")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (the suite never needs one)")
@pytest.mark.parametrize("algorithm", ["awq", "awq+gptq", "gptq"])
def test_awq_plan_on_cuda_means_the_same_as_on_cpu(algorithm):
    model, folded_cpu, on_cpu = awq_plan(algorithm)
    _, folded_gpu, on_gpu = awq_plan(algorithm, device="cuda")
    assert next(folded_gpu.module.parameters()).device.type == "cpu"  # the converted model stays where it was
    assert torch.equal(folded_gpu.module.inner.norm.weight, folded_cpu.module.inner.norm.weight)  # the same scales
    if algorithm == "awq":  # rounding with a clip search: the same codes
        for fqn in LAYERS:
            assert (on_gpu.layers[fqn].weight_codes == on_cpu.layers[fqn].weight_codes).mean() >= 0.98, fqn
    # GPTQ solves in float32 on a GPU and float64 on a CPU: on these 64 rows per layer up to ~10% of the codes
    # differ (measured on the H200), the model's output error does not
    on_gpu_error = simulated_error(folded_gpu.module, on_gpu, model.module)
    assert on_gpu_error == pytest.approx(simulated_error(folded_cpu.module, on_cpu, model.module), rel=0.1)
