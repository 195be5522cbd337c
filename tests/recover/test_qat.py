"""QAT on the plan's grid (edgeq/recover/qat.py): it lowers a 4-bit RTN model's error against FP32, writes codes
within the grid and scales the plan's precision holds, keeps dtype/granularity/zero points, leaves the module's
weights equal to the plan's dequantized values, resumes exactly, and its plan lowers to ONNX with weight parity."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgeq.calibration.lowbit_fallback import dequantized
from edgeq.compress.apply import user_fqn
from edgeq.compress.spec import RecoverSpec
from edgeq.plan import QuantPlan
from edgeq.recover.qat import qat
from tests.conftest import ONNX
from tests.recover.models import relative_error, rtn_plan, samples, simulated, teacher


def _module_holds_plan(module, plan) -> None:
    for name, child in module.named_modules():
        entry = plan.layers.get(user_fqn(name))
        if entry is not None and entry.weight_codes is not None:
            assert torch.equal(child.weight.detach(), dequantized(entry, child.weight.shape)), name


def test_qat_lowers_the_error_of_a_4bit_rtn_mlp():
    reference, calibration, held_out = teacher(), samples(32), samples(16, seed=5)
    plan = rtn_plan(reference, bits=4, group_size=16)
    kept = copy.deepcopy(plan)
    module, new_plan, result = qat(reference, reference, plan, RecoverSpec(steps=60, lr=1e-3, batch_size=8, text="qat"),
                                   calibration, ["x"], ["output"])
    before = relative_error(simulated(reference, plan), reference, held_out)
    after = relative_error(simulated(module, new_plan), reference, held_out)
    assert after < 0.9 * before, (before, after)
    assert all(np.array_equal(e.weight_codes, kept.layers[f].weight_codes) for f, e in plan.layers.items() if e.weight_codes is not None)
    _module_holds_plan(module, new_plan)
    assert set(result.layers) == {f for f, e in plan.layers.items() if e.weight is not None}
    assert any(layer["codes_changed"] > 0 for layer in result.layers.values())
    assert "static activation scales stay as calibrated" in result.notes[1]


@pytest.mark.parametrize("bits, group, symmetric, scale_dtype", [(8, None, True, "float32"), (4, 16, False, "float16"), (2, 16, True, "float16")])
def test_plan_after_qat_keeps_the_grid(tmp_path, bits, group, symmetric, scale_dtype):
    reference = teacher()
    plan = rtn_plan(reference, bits=bits, group_size=group, symmetric=symmetric, scale_dtype=scale_dtype)
    module, new_plan, _ = qat(reference, reference, plan, RecoverSpec(steps=8, lr=1e-3, batch_size=4), samples(8), ["x"], ["output"])
    for fqn, entry in new_plan.layers.items():
        old = plan.layers[fqn]
        if entry.weight is None:
            continue
        assert (entry.weight.dtype, entry.weight.granularity, entry.weight.symmetric) == (old.weight.dtype, old.weight.granularity, old.weight.symmetric)
        assert np.array_equal(entry.weight.zero_point, old.weight.zero_point)
        assert entry.weight_codes.dtype == old.weight_codes.dtype and entry.weight_codes.shape == old.weight_codes.shape
        assert entry.weight_codes.min() >= entry.weight.dtype.qmin and entry.weight_codes.max() <= entry.weight.dtype.qmax
        if scale_dtype == "float16":
            assert np.array_equal(entry.weight.scale.astype(np.float16).astype(np.float32), entry.weight.scale), fqn
    _module_holds_plan(module, new_plan)
    new_plan.save(tmp_path)
    loaded = QuantPlan.load(tmp_path)
    assert all(np.array_equal(loaded.layers[f].weight_codes, e.weight_codes) for f, e in new_plan.layers.items() if e.weight_codes is not None)


def test_a_palette_layer_is_left_out_with_its_values_frozen():
    from edgeq.calibration.lowbit.kmeans import palettize
    from edgeq.plan import LayerPlan, OpKind

    reference = teacher()
    plan = rtn_plan(reference, bits=4, group_size=16)
    weight = reference.inner.head.weight.detach()
    palette = palettize(weight, 2, per="tensor")
    plan.layers["head"] = LayerPlan("head", OpKind.LINEAR, weight_codes=palette.indices.numpy().astype(np.uint8),
                                    palette=palette.lut.numpy().astype(np.float32))
    module, new_plan, result = qat(reference, reference, plan, RecoverSpec(steps=4, lr=1e-3, batch_size=4), samples(8), ["x"], ["output"])
    assert "palette" in result.skipped["head"] and "head" not in result.layers
    assert torch.equal(module.inner.head.weight.detach(), dequantized(new_plan.layers["head"], weight.shape))


def test_qat_resumes_exactly(tmp_path):
    reference, calibration = teacher(), samples(8)
    plan = rtn_plan(reference, bits=4, group_size=16)
    spec = dict(steps=6, lr=1e-3, batch_size=4)
    whole, whole_plan, _ = qat(reference, reference, plan, RecoverSpec(**spec), calibration, ["x"], ["output"])

    def interrupt(step, _loss):
        if step == 5:
            raise KeyboardInterrupt

    folder = str(tmp_path / "ckpt")
    with pytest.raises(KeyboardInterrupt):
        qat(reference, reference, plan, RecoverSpec(**spec, checkpoint_dir=folder), calibration, ["x"], ["output"],
            checkpoint_every=2, on_step=interrupt)
    resumed, resumed_plan, _ = qat(reference, reference, plan, RecoverSpec(**spec, checkpoint_dir=folder, resume=True),
                                   calibration, ["x"], ["output"], checkpoint_every=2)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    for fqn, entry in whole_plan.layers.items():
        if entry.weight is not None:
            assert np.array_equal(entry.weight.scale, resumed_plan.layers[fqn].weight.scale)
            assert np.array_equal(entry.weight_codes, resumed_plan.layers[fqn].weight_codes)


@ONNX
def test_qat_plan_lowers_to_onnx_with_weight_parity(tmp_path):
    import dataclasses

    from edgeq.converters import get_converter
    from edgeq.converters.base import ConversionRequest
    from edgeq.converters.parity import artifact_weights, compare_weights
    from edgeq.load import load_model
    from edgeq.targets import Precision, load_profile
    from edgeq.validate.runners.onnxruntime import OnnxRuntimeRunner

    model = load_model("tests.recover.models:blocks_source")
    plan = rtn_plan(model.module, bits=4, group_size=16)
    plan.scheme = "int4-weight"
    module, new_plan, _ = qat(model.module, model.module, plan, RecoverSpec(steps=10, lr=1e-3, batch_size=4), samples(8),
                              model.input_names, model.outputs)
    profile = load_profile("onnx")
    request = ConversionRequest(dataclasses.replace(model, module=module), profile, Precision.INT4_WEIGHT, new_plan)
    converter = get_converter(profile.runtime)
    assert converter.check(request) == []
    artifact = converter.convert(request, tmp_path / "model.onnx")
    parity = compare_weights(new_plan, artifact_weights(artifact.path, "onnx"))
    assert parity.checked == len(new_plan.quantized()) and parity.mismatches == [] and parity.missing == []
    x = model.example_inputs[0]
    got = next(iter(OnnxRuntimeRunner(artifact.path).run({"x": x.numpy()}).values()))
    with torch.no_grad():
        expected = module(x)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.ci_may_skip("CI machines have no GPU; the device machine runs this test")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the refusal is tested in test_distill.py")
def test_qat_and_lora_train_on_cuda_and_return_cpu_modules():
    from edgeq.recover.lora import lora

    reference, calibration, held_out = teacher(), samples(32), samples(16, seed=5)
    plan = rtn_plan(reference, bits=4, group_size=16)
    spec = RecoverSpec(steps=60, lr=1e-3, batch_size=8, device="cuda")
    module, new_plan, result = qat(reference, reference, plan, spec, calibration, ["x"], ["output"])
    assert next(module.parameters()).device.type == "cpu" and next(reference.parameters()).device.type == "cpu"
    _module_holds_plan(module, new_plan)
    assert relative_error(simulated(module, new_plan), reference, held_out) < 0.9 * relative_error(simulated(reference, plan), reference, held_out)
    module, new_plan, _ = lora(reference, reference, plan, RecoverSpec(steps=4, lr=1e-3, batch_size=8, lora_rank=2, device="cuda"),
                               calibration, ["x"], ["output"])
    _module_holds_plan(module, new_plan)


def test_int8_conv_plan_with_static_activations_and_bias_correction():
    from torch import nn

    from edgeq.calibration.weights import quantize_weight_per_channel
    from edgeq.compress.apply import apply_plan
    from edgeq.compress.qdq import WeightForm
    from edgeq.load.wrap import FlatModel
    from edgeq.plan import LayerPlan, OpKind, PerTensor, QDtype, QuantPlan, TensorQuant

    torch.manual_seed(0)
    net = FlatModel(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 4))).eval()
    rng = np.random.default_rng(0)
    data = [{"image": rng.standard_normal((1, 3, 10, 10)).astype(np.float32)} for _ in range(8)]
    plan = QuantPlan("w8a8", "test")
    for fqn in ("0", "2", "5"):
        quant, codes = quantize_weight_per_channel(net.inner.get_submodule(fqn).weight, scale_dtype="float16")
        activation = TensorQuant(QDtype.UINT8, PerTensor(), False, np.float32(0.05), np.int32(128))
        plan.layers[fqn] = LayerPlan(fqn, OpKind.LINEAR if fqn == "5" else OpKind.CONV, weight=quant, weight_codes=codes,
                                     activation=activation)
    plan.layers["2"].bias_correction = np.full(8, 0.01, np.float32)
    module, new_plan, result = qat(net, net, plan, RecoverSpec(steps=6, lr=1e-3, batch_size=4), data, ["image"], ["output"])
    _module_holds_plan(module, new_plan)
    assert set(result.layers) == {"0", "2", "5"}
    for fqn, entry in new_plan.layers.items():
        assert entry.weight.scale.dtype == np.float32 and np.array_equal(entry.weight.scale.astype(np.float16).astype(np.float32), entry.weight.scale)
        assert entry.activation is plan.layers[fqn].activation or np.array_equal(entry.activation.scale, plan.layers[fqn].activation.scale)
    # what QAT trained through (its fake quantization of the new plan) is what the PyTorch simulation computes
    from edgeq.recover.qat import QatSimulation

    trained_view = copy.deepcopy(module)
    QatSimulation(trained_view, new_plan)
    simulation = apply_plan(module, new_plan, WeightForm.QDQ)
    images = torch.from_numpy(np.concatenate([d["image"] for d in data]))
    with torch.no_grad():
        torch.testing.assert_close(trained_view(images)[0], simulation(images)[0], rtol=1e-4, atol=1e-5)
