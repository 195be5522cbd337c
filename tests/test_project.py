"""edgeq.toml: one command converts every declared model x target; strict keys."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import UsageError
from edgeq.project import load_project
from tests.conftest import ONNX

PROJECT = """
[defaults]
out = "edge"
targets = ["onnx"]
samples = 2
budget = "cosine>=0.999"

[[models]]
source = "edgeq.examples:tiny_mlp"

[[models]]
source = "edgeq.examples:tiny_convnet"
name = "convnet"
precisions = ["fp32", "fp16"]
"""


def test_load_project_applies_defaults_and_paths(tmp_path):
    path = tmp_path / "edgeq.toml"
    path.write_text(PROJECT)
    jobs = load_project(path)
    assert [j.source for j in jobs] == ["edgeq.examples:tiny_mlp", "edgeq.examples:tiny_convnet"]
    assert jobs[0].out == tmp_path / "edge" and jobs[1].precisions == ["fp32", "fp16"]
    assert all(j.budget == "cosine>=0.999" and j.targets == ["onnx"] for j in jobs)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[models]]\nsource = 'a:b'\ncolor = 1\n", "models\\[0\\].color: unknown key"),
        ("[defaults]\nsamples = 'many'\n[[models]]\nsource = 'a:b'\n", "defaults.samples: 'many' is not valid"),
        ("[[models]]\nname = 'x'\n", "'source' is missing"),
        ("[model]\nsource = 'a:b'\n", "unknown table"),
    ],
)
def test_project_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "edgeq.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_project(path)


@ONNX
def test_convert_config_runs_every_model(tmp_path):
    path = tmp_path / "edgeq.toml"
    path.write_text(PROJECT)
    result = CliRunner().invoke(main, ["convert", "-c", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for bundle in ("tiny_mlp/onnx/fp32", "convnet/onnx/fp32", "convnet/onnx/fp16"):
        assert (tmp_path / "edge" / bundle / "manifest.json").is_file()
