"""Core ML converter robustness: names Core ML reserves, ceil-mode pooling with PReLU, and toolchain exceptions.

Models users ship that once failed: a streaming voice-activity detector (an LSTM whose recurrent state is an
input named `state`, a word MIL reserves: coremltools raised a raw ValueError) and an MTCNN-style face
detector (PReLU and max pooling with ceil_mode=True, converted but not runnable by the MIL executor). Both go
through the whole pipeline at fp32 and fp16 and are validated by the MIL reference executor against PyTorch.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from edgeq.converters.coreml_names import core_ml_name, feature_names
from edgeq.errors import ConversionError
from edgeq.validate.verdict import Verdict
from tests.conftest import COREML
from tests.helpers import convert_source

pytestmark = COREML


class VoiceActivity(nn.Module):
    """Silero-VAD-like: a strided conv front end, an LSTM carried across calls through `state`, a sigmoid head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv1d(1, 16, 8, stride=4)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, input, state):  # input: (1, 64) audio; state: (2, 1, 1, 16) h and c
        features = torch.relu(self.encoder(input.unsqueeze(1))).transpose(1, 2)
        out, (h, c) = self.lstm(features, (state[0], state[1]))
        return {"output": torch.sigmoid(self.head(out[:, -1])), "stateN": torch.stack([h, c])}


def voice_activity():
    torch.manual_seed(0)
    return VoiceActivity().eval(), {"input": torch.randn(1, 64), "state": torch.randn(2, 1, 1, 16) * 0.5}


class FaceProposals(nn.Module):
    """MTCNN P-Net-like: conv + per-channel PReLU + max pooling with ceil_mode=True on odd sizes (25 -> 23 -> 12)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.classify, self.boxes = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, image):
        x = self.pool1(self.prelu1(self.conv1(image)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        return {"probabilities": torch.softmax(self.classify(x), 1), "boxes": self.boxes(x)}


def face_proposals():
    torch.manual_seed(0)
    model = FaceProposals().eval()
    with torch.no_grad():
        for prelu in (model.prelu1, model.prelu2, model.prelu3):
            prelu.weight.uniform_(0.05, 0.5)  # distinct slopes per channel: a shared one would hide a mix-up
    return model, {"image": torch.randn(1, 3, 25, 25)}


class ReservedNames(nn.Module):
    """An input and outputs named with MIL words and a non-identifier: all keep their names outside the artifact."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, tensor):
        y = self.linear(tensor)
        return {"state": y * 2, "fp16": torch.relu(y), "out.1": y + 1}


def reserved_names():
    torch.manual_seed(0)
    return ReservedNames().eval(), {"tensor": torch.randn(1, 4)}


class DilatedPool(nn.Module):
    """Max pooling with dilation: coremltools refuses it with a ValueError that does not name the torch op."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 2, 1)
        self.pool = nn.MaxPool2d(3, 2, dilation=2)

    def forward(self, x):
        return self.pool(self.stem(x))


def dilated_pool():
    torch.manual_seed(0)
    return DilatedPool().eval(), (torch.randn(1, 2, 9, 9),)


def _manifest(outcome) -> dict:
    return json.loads((outcome.path / "manifest.json").read_text())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_input_named_state_converts_and_validates(tmp_path, precision):
    source = "tests.converters.test_coreml_robustness:voice_activity"
    outcome = convert_source(source, "coreml", precision, tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    assert "MIL reference executor" in outcome.report.executor
    manifest = _manifest(outcome)
    text = json.dumps(manifest)
    assert "coreml-feature-name: state -> state_workaround" in text
    # the bundle speaks the model's names; only the artifact itself holds Core ML's spelling
    assert [spec["name"] for spec in manifest["signature"]["inputs"]] == ["input", "state"], manifest["signature"]
    import coremltools as ct

    spec = ct.utils.load_spec(str(outcome.path / "model.mlpackage"))
    assert [i.name for i in spec.description.input] == ["input", "state_workaround"]
    if precision == "fp32":  # the bundle checks again as a device would, golden inputs keyed by the model's names
        from edgeq.validate.bundle_check import check_bundle

        assert check_bundle(outcome.path).verdict == Verdict.PASSED


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_prelu_and_ceil_mode_max_pool_validate(tmp_path, precision):
    outcome = convert_source("tests.converters.test_coreml_robustness:face_proposals", "coreml", precision, tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    assert "MIL reference executor" in outcome.report.executor
    floor = 120.0 if precision == "fp32" else 55.0
    assert all(o.sqnr_db > floor for o in outcome.report.outputs), [(o.name, o.sqnr_db) for o in outcome.report.outputs]


def test_reserved_output_names_keep_the_models_names(tmp_path):
    outcome = convert_source("tests.converters.test_coreml_robustness:reserved_names", "coreml", "fp32", tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    assert [o.name for o in outcome.report.outputs] == ["state", "fp16", "out.1"]
    import coremltools as ct

    description = ct.utils.load_spec(str(outcome.path / "model.mlpackage")).description
    assert [i.name for i in description.input] == ["tensor_workaround"]
    assert [o.name for o in description.output] == ["state_workaround", "fp16_workaround", "out_1"]


def test_a_coremltools_value_error_names_op_module_and_target(tmp_path):
    from edgeq.converters.base import ConversionRequest
    from edgeq.converters.coreml import CoreMLConverter
    from edgeq.load import load_model
    from edgeq.targets import Precision, load_profile

    model = load_model("tests.converters.test_coreml_robustness:dilated_pool")
    request = ConversionRequest(model, load_profile("coreml"), Precision.FP32)
    with pytest.raises(ConversionError) as caught:
        CoreMLConverter().convert(request, tmp_path / "model.mlpackage")
    message = str(caught.value)
    assert "target coreml" in message and "'max_pool2d'" in message and "module 'pool'" in message, message


def test_feature_names_core_ml_cannot_take_get_coremltools_spelling():
    assert core_ml_name("state") == "state_workaround"
    assert core_ml_name("input.1") == "input_1" and core_ml_name("0") == "_0"
    mapping = feature_names(["x", "state", "fp16"], ["state_workaround", "logits"])
    # `state_workaround` is taken by an output already: the input gets a suffix, never a duplicate
    assert mapping == {"inputs": {"state": "state_workaround_1", "fp16": "fp16_workaround"}, "outputs": {}}
