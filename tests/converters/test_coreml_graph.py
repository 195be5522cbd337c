"""Exact graph fixes for coremltools (converters/coreml_graph.py, converters/coreml.py), proved by validation.

The zoo's GPT-2 and Llama export `alias` nodes and its U-Net calls F.max_pool2d without a stride; coremltools
refused both. A spatial transformer's affine_grid failed in the frontend, a reduce over all axes after a
transpose crashed an optimization pass, and decomposing the whole model for one missing op (channel_shuffle)
turned torch.roll into an op the frontend lacks. Tiny models with the same constructs convert, record the fix
and validate in the MIL executor.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeq.validate.verdict import Verdict
from tests.conftest import COREML
from tests.helpers import convert_source

pytestmark = COREML


class AliasAndPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = torch.ops.aten.alias.default(torch.relu(self.conv(x)))  # as torch.export leaves views in HF masks
        return F.max_pool2d(y, 2) + F.max_pool2d(y, 2, padding=1)[..., 1:, 1:]  # no stride: torch uses the kernel


def alias_and_pool():
    torch.manual_seed(0)
    return AliasAndPool().eval(), (torch.randn(1, 3, 8, 8),)


class SpatialTransformer(nn.Module):
    """F.affine_grid + F.grid_sample (a spatial transformer): coremltools' fused path failed on exported programs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.localize = nn.Linear(72, 6)

    def forward(self, x):
        y = self.conv(x)
        theta = torch.tanh(self.localize(y.flatten(1))).view(-1, 2, 3)
        grid = F.affine_grid(theta, (1, 2, 5, 5), align_corners=False)
        return F.grid_sample(y, grid, padding_mode="border", align_corners=False)


def spatial_transformer():
    torch.manual_seed(0)
    return SpatialTransformer().eval(), (torch.randn(1, 2, 6, 6),)


def test_affine_grid_is_decomposed_and_grid_sample_validates(tmp_path):
    outcome = convert_source("tests.converters.test_coreml_graph:spatial_transformer", "coreml", "fp32", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    assert "coreml-decomposed: affine_grid_generator" in json.loads((outcome.path / "manifest.json").read_text())["rewrites"]


class ReduceAllAfterTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x).transpose(1, 2)
        return torch.relu(y) * y.max()  # reduce_max without axes: coremltools' reduce_transposes read `axes`


def reduce_all_after_transpose():
    torch.manual_seed(0)
    return ReduceAllAfterTranspose().eval(), (torch.randn(1, 3, 4),)


class ShuffleThenRoll(nn.Module):
    def __init__(self):
        super().__init__()
        self.shuffle = nn.ChannelShuffle(2)  # no converter: decomposed alone, roll stays one gather

    def forward(self, x):
        return torch.roll(self.shuffle(x), 1, -1)


def shuffle_then_roll():
    return ShuffleThenRoll().eval(), (torch.randn(1, 4, 3, 3),)


@pytest.mark.parametrize(
    ("source", "rewrite"),
    [
        ("reduce_all_after_transpose", "coreml-pass-skipped: common::reduce_transposes"),
        ("shuffle_then_roll", "default-decomposition-table: channel_shuffle decomposed"),
    ],
)
def test_toolchain_workarounds_are_recorded_and_validate(tmp_path, source, rewrite):
    outcome = convert_source(f"tests.converters.test_coreml_graph:{source}", "coreml", "fp32", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    rewrites = json.loads((outcome.path / "manifest.json").read_text())["rewrites"]
    assert any(r.startswith(rewrite) for r in rewrites), rewrites


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_alias_and_default_pool_stride_are_fixed_and_validate(tmp_path, precision):
    outcome = convert_source("tests.converters.test_coreml_graph:alias_and_pool", "coreml", precision, tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    text = json.dumps(json.loads((outcome.path / "manifest.json").read_text()))
    assert "coreml-alias-to-input: 1 node(s)" in text and "coreml-pool-default-stride: 2 node(s)" in text
