"""Structured channel pruning (edgeq/compress/prune_structured.py): the model physically shrinks, stays
consistent through residual adds, concatenations, BatchNorm, depthwise and grouped convs and flatten, keeps its
output width, converts and validates on every runtime, and a group that cannot be pruned safely is refused with
the layer named."""

from __future__ import annotations

import dataclasses
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from edgeq.compress.prune_check import output_tensors, parameter_count
from edgeq.compress.spec import PruneSpec
from edgeq.errors import ConversionError, UsageError
from tests.conftest import COREML, ONNX, TFLITE, requires

pytestmark = requires("torch_pruning")


def _prune(module, importance="l2", ratio=0.5, calibration=(), names=("x",), examples=None, scope="layer"):
    from edgeq.compress.prune_structured import prune_structured

    spec = PruneSpec("channels", ratio, importance=importance, text=f"structured:{ratio}:{importance}")
    if scope != "layer":  # the CLI spec takes global for unstructured only; the stage ranks channels globally too
        spec = SimpleNamespace(**{**dataclasses.asdict(spec), "scope": scope})
    return prune_structured(module, spec, list(calibration), list(names), examples)


def _finite(module, examples):
    with torch.no_grad():
        return all(torch.isfinite(t).all() for t in output_tensors(module(*examples)))


def test_resnet_shrinks_through_residual_adds_and_converts_on_every_runtime(tmp_path):
    from edgeq.load import load_model
    from edgeq.pipeline import ConvertOptions, convert
    from edgeq.validate.verdict import Verdict

    loaded = load_model("tests.zoo.vision:resnet")
    original = loaded.module
    result = _prune(original, "l2", names=loaded.input_names, examples=loaded.example_inputs)
    pruned = result.module
    assert pruned is not original and original.inner.stem[0][0].out_channels == 16  # the input is not touched
    # The residual add ties stem, block 0 and its body's last conv: they shrink together.
    assert result.layers["stem.0.0"] == {"out_channels": [16, 8]}
    assert result.layers["layers.0.body.1.0"] == {"in_channels": [16, 8], "out_channels": [16, 8]}
    assert result.layers["layers.1.shortcut.0"]["out_channels"] == [32, 16] and result.layers["fc"] == {"in_features": [32, 16]}
    assert pruned.inner.stem[0][1].num_features == 8  # BatchNorm follows its conv
    assert "fc" in result.skipped and pruned.inner.fc.out_features == 10  # the output width is the model's
    assert pruned(*loaded.example_inputs)[0].shape == (1, 10) and _finite(pruned, loaded.example_inputs)
    assert parameter_count(pruned) < 0.3 * parameter_count(original)
    assert result.notes[0].startswith("structured channel pruning 0.5 (l2 importance, per layer): parameters 19,994 -> ")

    targets = [t for t, mark in (("onnx", ONNX), ("tflite", TFLITE), ("coreml", COREML)) if not mark.args[0]]
    options = ConvertOptions(targets=targets, out=tmp_path, precisions=["fp32"], samples=2)
    outcomes = convert(dataclasses.replace(loaded, module=pruned), options)
    assert [o.target for o in outcomes] == targets
    for outcome in outcomes:
        assert outcome.verdict == Verdict.PASSED, (outcome.target, outcome.error or outcome.violations)


@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_mobilenet_depthwise_and_squeeze_excite_prune_on_calibration_scores(importance):
    from tests.zoo.vision import mobilenet_v3

    model, examples = mobilenet_v3()
    calibration = [{"x": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)).numpy()} for i in range(2)]
    result = _prune(model, importance, calibration=calibration, examples=examples)
    block = result.module.blocks[0]
    # expand -> depthwise -> squeeze-excite gate -> project: the depthwise conv keeps one filter per channel.
    assert block.depthwise[0].groups == block.depthwise[0].in_channels == block.expand[0].out_channels == 16
    assert block.se.expand.out_channels == 16 and result.layers["blocks.0.se.reduce"] == {"in_channels": [32, 16], "out_channels": [8, 4]}
    assert result.module(*examples)["logits"].shape == (1, 10) and _finite(result.module, examples)
    assert not any(p.grad is not None for p in result.module.parameters())  # Taylor's gradients are not left behind


class Grouped(nn.Module):
    """conv -> grouped conv (4 groups) -> conv, averaged: channels must shrink by the same count in every group."""

    def __init__(self):
        super().__init__()
        self.conv, self.grouped, self.head = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.grouped(torch.relu(self.conv(x))))).mean((2, 3))


def test_removing_dead_channels_through_a_grouped_conv_leaves_the_outputs_unchanged():
    torch.manual_seed(0)
    model, examples = Grouped().eval(), (torch.randn(2, 3, 8, 8),)
    with torch.no_grad():  # channels 0-3 of every group of 8 carry nothing: pruning exactly those changes nothing
        dead = torch.tensor([block * 8 + i for block in range(4) for i in range(4)])
        for layer in (model.conv, model.grouped):
            layer.weight[dead] = 0
            layer.bias[dead] = 0
        model.grouped.weight[:, :4] = 0
        model.head.weight[:, dead] = 0
    result = _prune(model, "l2", examples=examples)
    pruned = result.module
    assert pruned.conv.out_channels == pruned.grouped.in_channels == pruned.grouped.out_channels == 16 and pruned.grouped.groups == 4
    torch.testing.assert_close(pruned(*examples), model(*examples), rtol=0, atol=1e-6)


class Concat(nn.Module):
    """Two branches concatenated, BatchNorm over the concatenation, flatten into a linear."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1)
        self.norm, self.mix = nn.BatchNorm2d(32), nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32 * 4 * 4, 5)

    def forward(self, x):
        y = self.mix(torch.relu(self.norm(torch.cat([self.left(x), self.right(x)], 1))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 4), 1))


def test_concatenation_batchnorm_and_flatten_stay_consistent():
    torch.manual_seed(0)
    model, examples = Concat().eval(), (torch.randn(1, 3, 8, 8),)
    result = _prune(model, "l1", examples=examples)
    pruned = result.module
    assert pruned.left.out_channels == pruned.right.out_channels == 8 and pruned.norm.num_features == pruned.mix.in_channels == 16
    assert pruned.fc.in_features == pruned.mix.out_channels * 16 == 256 and pruned.fc.out_features == 5
    assert pruned(*examples).shape == (1, 5) and _finite(pruned, examples)


def test_a_frozen_model_under_no_grad_still_prunes_on_taylor_scores():
    torch.manual_seed(0)
    model, examples = Concat().eval().requires_grad_(False), (torch.randn(1, 3, 8, 8),)
    with torch.no_grad():  # how a pipeline may call it: Torch-Pruning's tracing and the Taylor scores need autograd
        result = _prune(model, "taylor", examples=examples)
    assert result.layers["left"] == {"out_channels": [16, 8]}
    assert not any(p.requires_grad for p in result.module.parameters()) and not any(p.requires_grad for p in model.parameters())


def test_global_ranking_prunes_the_share_asked_over_the_whole_model():
    from tests.compress.digits import train_digits

    trained = train_digits()
    result = _prune(trained.model, "l2", names=["pixels"], examples=(trained.x_test[:1],), scope="global")
    widths = [result.module.features[0].out_channels, result.module.features[3].out_channels]
    assert sum(widths) < 0.6 * (32 + 64) and all(w % 8 == 0 and w >= 8 for w in widths)
    assert result.module.classifier.in_features == widths[1] * 16 and "one ranking across the model" in result.notes[0]


class HardCodedView(nn.Module):
    """conv2's channels feed a view whose sizes are literals: no pruner can follow that."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(y.view(1, 32, 64).mean(-1))


class ChannelMix(torch.autograd.Function):
    """A custom op mixing channels with a fixed matrix: Torch-Pruning takes it for an element-wise op."""

    @staticmethod
    def forward(ctx, x, mix):
        return torch.einsum("bchw,dc->bdhw", x, mix)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class CustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.register_buffer("mix", torch.eye(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(ChannelMix.apply(self.conv(x), self.mix)).mean((2, 3))


class GroupedAfterConcat(nn.Module):
    """A grouped conv reading a concatenation: Torch-Pruning cannot keep its groups equal."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 16, 3, padding=1)
        self.grouped, self.head = nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(self.grouped(torch.cat([self.left(x), self.right(x)], 1))).mean((2, 3))


@pytest.mark.parametrize("model, layer", [(HardCodedView, "conv2"), (CustomOp, "conv"), (GroupedAfterConcat, "left")])
def test_a_group_that_cannot_be_pruned_safely_is_refused_with_the_layer_named(model, layer):
    torch.manual_seed(0)
    module = model().eval()
    with pytest.raises(ConversionError) as refused:
        _prune(module, examples=(torch.randn(1, 3, 8, 8),))
    message = str(refused.value)
    assert f"refused at layer '{layer}'" in message and "Nothing was exported" in message, message
    assert refused.value.exit_code == 4


def test_without_torch_pruning_the_user_is_told_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # what `import torch_pruning` meets when it is absent
    with pytest.raises(UsageError, match=r"pip install 'edgeq\[prune\]'"):
        _prune(nn.Sequential(nn.Linear(4, 4)), examples=(torch.randn(1, 4),))
