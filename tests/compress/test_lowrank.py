"""Low-rank factorization (edgeq/compress/lowrank.py): exactness, rank selection, skipping, 1x1 convs, the
activation-aware option, and a factorized tiny BERT converted and validated at int8-weight."""

from __future__ import annotations

import copy
import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from edgeq.compress.lowrank import choose_rank, cholesky_factor, factorize, input_moments, low_rank_factors
from edgeq.compress.spec import LowRankSpec, parse_lowrank
from edgeq.errors import UsageError
from tests.conftest import COREML, ONNX, TFLITE


def _rank(matrix_out, matrix_in, rank, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(matrix_out, rank, generator=generator) @ torch.randn(rank, matrix_in, generator=generator)


def _same_parameters(module, before):
    return all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), before.state_dict().values())) and \
        [type(m) for m in module.modules()] == [type(m) for m in before.modules()]


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def test_full_rank_factors_are_exact_plain_and_whitened():
    weight = np.random.default_rng(0).standard_normal((24, 40))
    for whitening in (None, cholesky_factor(np.cov(np.random.default_rng(1).standard_normal((40, 200))))):
        factors = low_rank_factors(weight, lambda s: len(s), whitening)
        assert (factors.rank, factors.full_rank, factors.energy) == (24, 24, 1.0)
        np.testing.assert_allclose(factors.second @ factors.first, weight, atol=1e-10)
        # balanced: each rank component's two halves have equal norms (sqrt(S) on both sides)
        np.testing.assert_allclose(np.linalg.norm(factors.first, axis=1), np.linalg.norm(factors.second, axis=0))


def test_a_low_rank_weight_is_reproduced_by_two_smaller_linears_and_the_input_is_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    with torch.no_grad():
        model[0].weight.copy_(_rank(48, 64, 6))
    before = copy.deepcopy(model)
    result = factorize(model, LowRankSpec("energy", 0.999999, text="energy:0.999999"), [], ["x"])
    assert _same_parameters(model, before)
    pair = result.module[0]
    assert isinstance(pair, nn.Sequential) and [type(m) for m in pair] == [nn.Linear, nn.Linear]
    assert (pair[0].in_features, pair[0].out_features, pair[0].bias) == (64, 6, None)
    assert (pair[1].in_features, pair[1].out_features) == (6, 48) and pair[1].bias is not None
    assert result.layers["0"] == {"rank": 6, "full_rank": 48, "energy": 1.0, "params": [64 * 48 + 48, 6 * 112 + 48]}
    assert result.stage == "lowrank" and result.spec == "energy:0.999999" and not result.module.training
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert _relative(result.module(x), model(x)) < 1e-5
    # the last layer (48 -> 8, full rank 8) is full rank: keeping all its energy saves nothing
    assert "no saving" in result.skipped["2"] and isinstance(result.module[2], nn.Linear)
    assert "3,120 -> 720 parameters in them; model 3,512 -> 1,112 parameters" in result.notes[0]


def test_choose_rank_by_energy_rank_and_params():
    singular = np.array([4.0, 3.0, 2.0, 1.0])  # squared: 16, 9, 4, 1 of 30
    assert choose_rank(singular, "energy", 0.5, 8, 4) == 1  # 16/30 = 0.53
    assert choose_rank(singular, "energy", 0.8, 8, 4) == 2  # 25/30 = 0.83
    assert choose_rank(singular, "energy", 1.0, 8, 4) == 4
    assert choose_rank(singular, "rank", 0.5, 8, 4) == 2
    assert choose_rank(singular, "params", 0.5, 64, 64) == 4  # 0.5 * 4096 / 128 = 16, capped at the full rank
    assert choose_rank(np.ones(64), "params", 0.5, 64, 64) == 16
    assert choose_rank(singular, "rank", 0.01, 8, 4) == 1  # never below one


@pytest.mark.parametrize("text, rank", [("rank:0.25", 16), ("params:0.5", 16), ("energy:0.5", None)])
def test_factorize_takes_each_mode(text, rank):
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    result = factorize(nn.Sequential(layer), parse_lowrank(text), [], ["x"])
    entry = result.layers["0"]
    assert entry["full_rank"] == 64 and entry["params"][0] == 64 * 64 + 64
    if rank is not None:
        assert entry["rank"] == rank and entry["params"][1] == rank * 128 + 64
    else:  # the smallest rank keeping half the energy: one fewer would keep less
        singular = torch.linalg.svdvals(layer.weight.detach().double()).numpy()
        kept = np.cumsum(singular**2) / np.sum(singular**2)
        assert kept[entry["rank"] - 1] >= 0.5 > kept[entry["rank"] - 2] and entry["energy"] == pytest.approx(kept[entry["rank"] - 1])


def test_patterns_select_layers_and_name_what_they_cannot_factorize():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 32)
            self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(32, 64), "down": nn.Linear(64, 32)}) for _ in range(2))
            self.conv = nn.Conv2d(32, 32, 3)
            self.head = nn.Linear(32, 10, bias=False)
            self.head.weight = self.embed.weight  # tied

    net = Net()
    spec = parse_lowrank("rank:0.25", layers=("blocks.*.up", "re:blocks\\.1\\.down", "conv", "head"))
    result = factorize(net, spec, [], ["x"])
    assert sorted(result.layers) == ["blocks.0.up", "blocks.1.down", "blocks.1.up"]
    assert "only 1x1 convolutions" in result.skipped["conv"] and "tied" in result.skipped["head"]
    assert isinstance(result.module.blocks[0]["down"], nn.Linear) and isinstance(result.module.blocks[1]["down"], nn.Sequential)
    with pytest.raises(UsageError, match="'blocks.*.upp' names no module"):
        factorize(net, parse_lowrank("rank:0.25", layers=("blocks.*.upp",)), [], ["x"])
    unchecked = SimpleNamespace(mode="rank", value=0.25, activation_aware=False, layers=("re:blocks(",), text="")
    with pytest.raises(UsageError, match="'re:blocks\\(': not a valid regular expression"):
        factorize(net, unchecked, [], ["x"])  # LowRankSpec refuses it first; a stage given another spec still does
    with pytest.raises(UsageError, match="did you mean blocks.0.up"):
        factorize(net, LowRankSpec("rank", 0.25, layers=("blocks.0.upp",)), [], ["x"])


def test_a_1x1_conv_becomes_two_1x1_convs_keeping_stride_padding_and_bias():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 1, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.copy_(_rank(32, 16, 3).reshape(32, 16, 1, 1))
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(32, 8, 3))
    result = factorize(model, LowRankSpec("energy", 0.999999), [], ["x"])
    first, second = result.module[0]
    assert (first.weight.shape, first.stride, first.padding, first.bias) == ((3, 16, 1, 1), (2, 2), (1, 1), None)
    assert second.weight.shape == (32, 3, 1, 1) and second.stride == (1, 1) and second.bias is not None
    assert result.layers["0"]["rank"] == 3 and list(result.layers) == ["0"]  # the 3x3 conv is not a candidate
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        assert _relative(result.module(x), model(x)) < 1e-5  # the padded border (bias alone) included


def _anisotropic_calibration(features=64, scales=(-2, 1), samples=4, seed=0):
    """Inputs whose variance spans three decades along random (fixed) directions; `seed` draws other samples."""
    mixing = torch.linalg.qr(torch.randn(features, features, generator=torch.Generator().manual_seed(0)))[0]
    generator = torch.Generator().manual_seed(seed + 1)
    scale = torch.logspace(*scales, features)
    return [{"x": ((torch.randn(16, features, generator=generator) * scale) @ mixing.T).numpy()} for _ in range(samples)]


def test_activation_aware_has_lower_output_error_than_plain_svd_at_the_same_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96))
    calibration = _anisotropic_calibration()
    held_out = torch.from_numpy(_anisotropic_calibration(seed=1)[0]["x"])  # same distribution, other samples
    errors = {}
    for aware in (False, True):
        result = factorize(model, LowRankSpec("rank", 0.25, activation_aware=aware), calibration, ["x"])
        assert result.layers["0"]["rank"] == 16
        with torch.no_grad():
            errors[aware] = _relative(result.module(held_out), model(held_out))
    print(f"output error at rank 16 of 64: plain SVD {errors[False]:.3f}, activation-aware {errors[True]:.3f}")
    assert errors[True] < 0.5 * errors[False], errors
    assert "activation-aware" in result.notes[0] and "4 calibration samples" in result.notes[0]


def test_activation_aware_whitens_a_1x1_conv_by_the_pixels_it_reads_and_skips_unreached_layers():
    torch.manual_seed(0)
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.unused = nn.Conv2d(8, 32, 1, stride=2), nn.Linear(64, 64)

        def forward(self, x):
            return self.conv(x)

    model = Net()
    x = torch.randn(2, 8, 6, 6) * torch.logspace(-2, 1, 8)[:, None, None]
    result = factorize(model, LowRankSpec("rank", 0.25, activation_aware=True), [{"x": x.numpy()}], ["x"])
    assert result.layers["conv"]["rank"] == 2 and "not reached" in result.skipped["unused"]
    plain = factorize(model, LowRankSpec("rank", 0.25), [], ["x"])
    with torch.no_grad():
        assert _relative(result.module(x), model(x)) < _relative(plain.module(x), model(x))


def test_activation_moments_leave_out_padding_tokens():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(4, 4)

        def forward(self, x, attention_mask):
            return self.dense(x) * attention_mask[..., None]

    x = torch.randn(1, 6, 4)
    x[0, 4:] = 1000.0  # padding positions: large, and never read
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    model = Encoder()
    moments, samples = input_moments(model, {"dense": model.dense}, [{"x": x.numpy(), "attention_mask": mask.numpy()}],
                                     ["x", "attention_mask"], None)
    real = x[0, :4].double()
    np.testing.assert_allclose(moments["dense"], (real.T @ real / 4).numpy(), rtol=1e-5)
    assert samples == 1


def _minimal_bert():
    from edgeq.load import load_model

    return load_model("tests.zoo.huggingface:bert")


@pytest.mark.parametrize("target", [pytest.param("onnx", marks=ONNX), pytest.param("tflite", marks=TFLITE),
                                    pytest.param("coreml", marks=COREML)])
def test_a_factorized_bert_converts_and_validates_at_int8_weight_with_both_factors_quantized(tmp_path, target):
    from edgeq.pipeline import ConvertOptions, convert

    model = _minimal_bert()
    calibration = [{n: t.numpy() for n, t in zip(model.input_names, model.example_inputs)}]
    spec = parse_lowrank("rank:0.5:activation", layers=("*.intermediate.dense", "*.output.dense"))
    result = factorize(model.module, spec, calibration, model.input_names, model.example_inputs)
    prefix = "model.encoder.layer.0"  # user FQNs: the plan's, without edgeq's wrapper prefix
    assert sorted(result.layers) == [f"{prefix}.intermediate.dense", f"{prefix}.output.dense"]
    assert "no saving" in result.skipped[f"{prefix}.attention.output.dense"]  # 32x32 at rank 16 holds as many
    factored = dataclasses.replace(model, module=result.module)
    options = ConvertOptions(targets=[target], out=tmp_path, precisions=["int8-weight"], samples=4)
    (outcome,) = convert(factored, options)
    assert outcome.verdict.value == "passed", (outcome.error, outcome.violations)
    plan = json.loads((outcome.path / "plan.json").read_text())["layers"]
    for layer in result.layers:  # both factors planned int8 (and weight parity held, or the verdict would not pass)
        for factor in (f"{layer}.0", f"{layer}.1"):
            assert plan[factor]["weight"]["dtype"] == "int8", (factor, plan[factor])
