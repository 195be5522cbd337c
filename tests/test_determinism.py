"""Same model, data and options give byte-identical bundles, also when the project sits in another folder.

Each test copies one tiny project (a model module and its data) into two folders, runs `edgeq convert` from
each (with absolute paths to the data and, for ONNX, to the weights) and compares every bundle file byte for
byte: the artifact (every file inside an .mlpackage), golden.npz, plan.json, scales.npz, and manifest.json
and report.json with their timing fields blanked (edgeq.manifest.TIMING_FIELDS). Two separate conversions
also show what changes between runs in one folder (dates, random identifiers, protobuf map order).
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.manifest import without_timings
from edgeq.reproducible import recorded_path, source_file_label
from tests.conftest import COREML, ONNX, TFLITE

MODULE = "determinism_proj"  # the same module name in both folders, as in two checkouts of one project
MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TinyMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))

        def forward(self, x):
            return self.layers(x)


    def build():
        torch.manual_seed(0)
        return TinyMLP().eval(), (torch.zeros(1, 16),)
    """
)
JSON_WITH_TIMINGS = ("manifest.json", "report.json")


def _project(folder):
    """A project folder: the model module, its weights as a state dict and validation data."""
    folder.mkdir(parents=True)
    (folder / f"{MODULE}.py").write_text(MODEL_SOURCE)
    generator = torch.Generator().manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    state = {f"layers.{k}": torch.randn(v.shape, generator=generator) * 0.3 for k, v in module.state_dict().items()}
    torch.save(state, folder / "weights.pt")
    samples = np.random.default_rng(0).standard_normal((8, 1, 16)).astype(np.float32)
    np.savez(folder / "data.npz", x=samples)
    return folder


def _convert(folder, monkeypatch, source: str, target: str, precisions: str, extra=()) -> None:
    """`edgeq convert` run from `folder`, importing the project's module from there (not a cached copy)."""
    with monkeypatch.context() as patch:
        patch.chdir(folder)
        patch.syspath_prepend(str(folder))
        patch.delitem(sys.modules, MODULE, raising=False)
        importlib.invalidate_caches()
        result = CliRunner().invoke(main, [
            "convert", source, *extra, "-t", target, "-p", precisions, "--data", str(folder / "data.npz"),
            "--samples", "2", "--calibration-samples", "4", "-o", "out",
        ], catch_exceptions=False)
        sys.modules.pop(MODULE, None)
    assert result.exit_code == 0, result.output


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _first_json_difference(a, b, where: str = "") -> str | None:
    """The first key path at which two JSON values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"key {where}{key}: only in {'the first' if key in a else 'the second'}"
            found = _first_json_difference(a[key], b[key], f"{where}{key}.")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            found = _first_json_difference(x, y, f"{where}{index}.")
            if found:
                return found
        return None
    return None if a == b else f"key {where.rstrip('.')}: {json.dumps(a)[:200]} != {json.dumps(b)[:200]}"


def _difference(name: str, a: bytes, b: bytes) -> str | None:
    if name.rsplit("/", 1)[-1] in JSON_WITH_TIMINGS:
        return _first_json_difference(without_timings(json.loads(a)), without_timings(json.loads(b)))
    if a == b:
        return None
    offset = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at byte {offset} (sizes {len(a)} and {len(b)}): {a[offset:offset + 40]!r} vs {b[offset:offset + 40]!r}"


def assert_same_bundles(tmp_path, monkeypatch, source: str, target: str, precisions: str, extra=()) -> dict[str, bytes]:
    """Convert from two folders; every file of every bundle is the same (timing fields aside)."""
    folders = [_project(tmp_path / "a" / "proj"), _project(tmp_path / "b" / "other")]
    bundles = []
    for folder in folders:
        _convert(folder, monkeypatch, source.format(folder=folder), target, precisions, extra)
        (model,) = [p for p in (folder / "out").iterdir() if p.is_dir()]
        bundles.append(_files(model / target))
    first, second = bundles
    assert sorted(first) == sorted(second), f"the bundles hold different files: {sorted(set(first) ^ set(second))}"
    assert {name.split("/")[0] for name in first} == set(precisions.split(","))
    problems = [f"{target}/{name}: {found}" for name in first if (found := _difference(name, first[name], second[name]))]
    assert not problems, "bundles converted from two folders differ:\n" + "\n".join(problems)
    leaks = [f"{target}/{name}" for name, data in first.items() if str(tmp_path).encode() in data]
    assert not leaks, f"the project's folder {tmp_path} is written into {leaks}"
    return first


@ONNX
def test_onnx_bundles_are_identical_from_two_folders(tmp_path, monkeypatch):
    files = assert_same_bundles(
        tmp_path, monkeypatch, "{folder}/weights.pt", "onnx", "fp32,w8a8,int4-weight", extra=("--factory", f"{MODULE}:build")
    )
    import onnx

    node = onnx.load_from_string(files["fp32/model.onnx"]).graph.node[0]
    meta = {prop.key: prop.value for prop in node.metadata_props}
    assert "pkg.torch.onnx.name_scopes" in meta  # the per-layer taps read these
    assert not set(meta) & {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace"}  # debug records dropped


@TFLITE
def test_tflite_bundles_are_identical_from_two_folders(tmp_path, monkeypatch):
    assert_same_bundles(tmp_path, monkeypatch, f"{MODULE}:build", "tflite", "fp32,int8-weight")


@COREML
def test_coreml_bundles_are_identical_from_two_folders(tmp_path, monkeypatch):
    files = assert_same_bundles(tmp_path, monkeypatch, f"{MODULE}:build", "coreml", "fp32,int8-weight")
    import coremltools as ct
    from coremltools.proto import Model_pb2

    # Protobuf maps (user metadata, MIL op attributes) are written in an order that can change from process
    # to process, which one process cannot show: the spec must be in protobuf's deterministic (sorted) form.
    for precision in ("fp32", "int8-weight"):
        written = files[f"{precision}/model.mlpackage/Data/com.apple.CoreML/model.mlmodel"]
        spec = Model_pb2.Model()
        spec.ParseFromString(written)
        assert written == spec.SerializeToString(deterministic=True), f"coreml/{precision}: model.mlmodel is not in deterministic form"

    package = tmp_path / "b" / "other" / "out" / "build" / "coreml" / "int8-weight" / "model.mlpackage"
    model = ct.models.MLModel(str(package), skip_model_load=True)  # the rewritten package still loads
    assert "com.github.apple.coremltools.conversion_date" not in model.user_defined_metadata
    assert model.user_defined_metadata["com.github.apple.coremltools.version"] == ct.__version__


def test_recorded_paths_do_not_name_the_project_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert recorded_path(str(tmp_path / "data" / "calib.npz")) == "data/calib.npz"
    assert recorded_path("data/calib.npz") == "data/calib.npz"  # as typed
    assert recorded_path("mypkg.models:build") == "mypkg.models:build"
    outside = str(tmp_path.parent / "elsewhere.pt2")
    assert recorded_path(outside) == outside  # nothing better to say than where it is
    assert source_file_label(torch.nn.modules.linear.__file__) == "torch/nn/modules/linear.py"
    assert source_file_label("/somewhere/not/imported.py") == "imported.py"
    assert source_file_label("<string>") == "<string>"
