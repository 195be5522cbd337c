"""Exact graph fixes for coremltools' frontend (converters/coreml_graph.py), proved by validating the artifact.

The zoo's GPT-2 and Llama export `alias` nodes and its U-Net calls F.max_pool2d without a stride; coremltools
refused both. Tiny models with the same constructs convert, record the fix and validate in the MIL executor.
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


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_alias_and_default_pool_stride_are_fixed_and_validate(tmp_path, precision):
    outcome = convert_source("tests.converters.test_coreml_graph:alias_and_pool", "coreml", precision, tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    text = json.dumps(json.loads((outcome.path / "manifest.json").read_text()))
    assert "coreml-alias-to-input: 1 node(s)" in text and "coreml-pool-default-stride: 2 node(s)" in text
