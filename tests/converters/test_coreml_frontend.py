"""Corrections to coremltools' torch op converters (converters/coreml_frontend.py), proved by validation.

SELU under the default decomposition table is `aten.elu` with scale 1.0507, which coremltools converted as a
plain elu: 26 dB against PyTorch. A model that needs the default table (CELU has no converter) and uses SELU
and a scaled ELU now validates at FP32 precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeq.validate.verdict import Verdict
from tests.conftest import COREML
from tests.helpers import convert_source

pytestmark = COREML


class SelfNormalizing(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        y = self.linear(x)
        return {"selu": F.selu(y), "celu": F.celu(y, alpha=0.5), "elu": F.elu(y, 0.7)}


def self_normalizing():
    torch.manual_seed(0)
    return SelfNormalizing().eval(), (torch.randn(2, 8) * 2,)


def test_selu_and_scaled_elu_match_pytorch(tmp_path):
    outcome = convert_source("tests.converters.test_coreml_frontend:self_normalizing", "coreml", "fp32", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    assert all(o.sqnr_db > 120 for o in outcome.report.outputs), [(o.name, o.sqnr_db) for o in outcome.report.outputs]
