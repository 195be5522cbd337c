"""Malicious files of every source kind edgeq accepts: none runs code unless --trust-pickle is given.
And broken (not malicious) sources: each gets a clear early error, not a traceback.

Each payload, if executed, creates a marker file (`pathlib.Path.touch`, no shell). Every refused case asserts:
the marker is absent, exit code 3, no traceback, the message names the file and mentions --trust-pickle, and a
good bundle already at the destination (same --out and --name) is byte-identical afterwards. Where
--trust-pickle is meant to load a file, a test shows that it does (and that the payload ran: that is the point).
"""

from __future__ import annotations

import hashlib
import io
import json
import operator
import pathlib
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import SourceError
from edgeq.examples import tiny_mlp
from edgeq.load import load_model
from tests.conftest import ONNX

MLP = "edgeq.examples:tiny_mlp"


class Touch:
    """Unpickles to `Path(marker).touch()`: proof that unpickling ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class Passthrough:
    """Unpickles to `value`, touching the marker on the way: a payload hidden in a file that still loads."""

    def __init__(self, value, marker: Path):
        self.value, self.marker = value, marker

    def __reduce__(self):
        return (operator.getitem, ((Touch(self.marker), self.value), 1))


# --- a good bundle at the destination, which no failing run may touch -------------------------------------


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def good_bundle(tmp_path_factory):
    """OUT holding tiny_mlp's ONNX bundle, and its digest: failing runs use --out OUT --name tiny_mlp."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("good") / "out"
    result = CliRunner().invoke(main, ["convert", MLP, "-t", "onnx", "--samples", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, tree_digest(out)


def convert(good_bundle, *args: str):
    """Run `edgeq convert ARGS` into the good bundle's place; assert the bundle is untouched afterwards."""
    out, digest = good_bundle
    result = CliRunner().invoke(main, ["convert", *args, "-t", "onnx", "--samples", "2", "--out", str(out), "--name", "tiny_mlp"])
    assert tree_digest(out) == digest, f"a failing run changed the bundle at {out}: {result.output}"
    return result


def assert_refused(result, path: Path, marker: Path, *words: str) -> None:
    assert not marker.exists(), "the payload ran"
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output, result.output
    text = " ".join(result.output.split())
    assert path.name in text and all(word in text for word in words), result.output


# --- torch.save files: state dicts and whole models ------------------------------------------------------


def poisoned_state_dict(path: Path, marker: Path) -> Path:
    state = dict(tiny_mlp()[0].state_dict())
    state["layers.0.weight"] = Passthrough(state["layers.0.weight"], marker)  # still a tensor once unpickled
    torch.save(state, path)
    return path


@ONNX
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
@pytest.mark.parametrize("factory", [True, False], ids=["with-factory", "without-factory"])
def test_pickled_weights_never_run(tmp_path, good_bundle, suffix, factory):
    marker = tmp_path / "ran"
    path = poisoned_state_dict(tmp_path / f"weights{suffix}", marker)
    result = convert(good_bundle, str(path), *(["--factory", MLP] if factory else []))
    assert_refused(result, path, marker, "--trust-pickle", "pickled Python objects")


@ONNX
def test_pickled_whole_model_never_runs(tmp_path, good_bundle):
    marker = tmp_path / "ran"
    model = tiny_mlp()[0]
    model.payload = Touch(marker)
    torch.save(model, tmp_path / "whole.pt")
    result = convert(good_bundle, str(tmp_path / "whole.pt"), "--input", "x:1x16")
    assert_refused(result, tmp_path / "whole.pt", marker, "--trust-pickle")


def test_trusted_pickles_load(tmp_path):
    """--trust-pickle is the explicit flag: a whole model and a checkpoint with objects beside its tensors load."""
    marker = tmp_path / "ran"
    model = tiny_mlp()[0]
    model.payload = Touch(marker)
    torch.save(model, tmp_path / "whole.pt")
    loaded = load_model(str(tmp_path / "whole.pt"), trust_pickle=True, inputs=[_spec("x:1x16")])
    assert loaded.source.kind == "pickle" and marker.exists()

    marker.unlink()
    checkpoint = {"state_dict": dict(tiny_mlp()[0].state_dict()), "hyper": Touch(marker)}
    torch.save(checkpoint, tmp_path / "run.ckpt")
    with pytest.raises(SourceError, match="--trust-pickle"):
        load_model(str(tmp_path / "run.ckpt"), factory=MLP)
    assert not marker.exists()
    loaded = load_model(str(tmp_path / "run.ckpt"), factory=MLP, trust_pickle=True)
    assert loaded.source.kind == "state_dict" and marker.exists()


def _spec(text: str):
    from edgeq.signature import parse_input_spec

    return parse_input_spec(text)


# --- torch.export archives (.pt2) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """tiny_mlp saved the normal way with torch.export.save."""
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    module, examples = tiny_mlp()
    torch.export.save(torch.export.export(module, examples), str(path))
    return path


def rewrite(source: Path, target: Path, edit=lambda member, data: data, add: dict[str, bytes] | None = None) -> Path:
    """A copy of the archive `source` with members changed by `edit(member, bytes)` and members added (in its
    top folder, or at the zip's top for a name starting with '../')."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        root = old.namelist()[0].split("/", 1)[0]
        for info in old.infolist():
            new.writestr(info, edit(info.filename.split("/", 1)[1], old.read(info.filename)))
        for member, data in (add or {}).items():
            new.writestr(member[3:] if member.startswith("../") else f"{root}/{member}", data)
    return target


def saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _pickle_in_sample_inputs(exported, marker):
    def edit(member, data):
        if member == "data/sample_inputs/model.pt":
            return saved(Passthrough(torch.load(io.BytesIO(data), weights_only=True), marker))
        return data

    return edit, None, "data/sample_inputs/model.pt"


def _pickled_weight(exported, marker):
    def edit(member, data):
        if member == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["layers.0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        if member == "data/weights/weight_0":
            return saved(Touch(marker))
        return data

    return edit, None, "as a pickle"


def _opaque_constant(exported, marker):
    def edit(member, data):
        if member == "data/constants/model_constants_config.json":
            entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
            return json.dumps({"config": {"payload": entry}}).encode()
        return data

    return edit, {"data/constants/opaque_obj_0": pickle.dumps(Touch(marker))}, "'payload'"


def _shape_expression(exported, marker):
    """torch reads symbolic sizes with sympy.sympify, which is Python eval."""

    def edit(member, data):
        if member == "models/model.json":
            program = json.loads(data)
            values = program["graph_module"]["graph"]["tensor_values"]
            first = next(iter(values))
            code = f"__import__('pathlib').Path({str(marker)!r}).touch() or 1"
            values[first]["sizes"][0] = {"as_expr": {"expr_str": code, "hint": {"as_int": 1}}}
            return json.dumps(program).encode()
        return data

    return edit, None, "shape expression"


def _compiled_code(exported, marker):
    return (lambda member, data: data), {"data/aotinductor/model/model.so": b"\x7fELF"}, "AOTInductor"


def _old_layout_pickle(exported, marker):
    """The older layout torch falls back to: top-level serialized_*.pt read with a weights_only=False fallback."""
    return (lambda member, data: data), {"../serialized_state_dict.pt": saved(Touch(marker))}, "serialized_state_dict.pt"


def _unknown_member(exported, marker):
    return (lambda member, data: data), {"data/extra_payload.pkl": pickle.dumps(Touch(marker))}, "data/extra_payload.pkl"


@ONNX
@pytest.mark.parametrize(
    "attack",
    [
        _pickle_in_sample_inputs, _pickled_weight, _opaque_constant, _shape_expression, _compiled_code,
        _old_layout_pickle, _unknown_member,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_export_archives_never_run_code(tmp_path, good_bundle, exported, attack):
    marker = tmp_path / "ran"
    edit, add, words = attack(exported, marker)
    path = rewrite(exported, tmp_path / "evil.pt2", edit, add)
    result = convert(good_bundle, str(path))
    assert_refused(result, path, marker, "--trust-pickle", words)


def test_normal_export_archive_loads_and_trust_loads_a_pickle(tmp_path, exported):
    plain = load_model(str(exported))
    assert plain.source.kind == "export" and plain.outputs == ["output"]

    marker = tmp_path / "ran"
    edit, _, _ = _pickle_in_sample_inputs(exported, marker)
    path = rewrite(exported, tmp_path / "evil.pt2", edit)
    trusted = load_model(str(path), trust_pickle=True)
    assert marker.exists()
    torch.testing.assert_close(trusted.example_inputs[0], plain.example_inputs[0])


def test_export_guards_code_never_runs(tmp_path, exported):
    """ExportedProgram.module() turns `guards_code` strings into Python run on every call: edgeq never asks."""
    marker = tmp_path / "ran"

    def edit(member, data):
        if member == "models/model.json":
            program = json.loads(data)
            program["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch() or True"]
            return json.dumps(program).encode()
        return data

    model = load_model(str(rewrite(exported, tmp_path / "guarded.pt2", edit)))
    model.module(*model.example_inputs)
    assert not marker.exists()


def test_export_graph_calls_only_operators(tmp_path, exported):
    """A deserialized graph may name any callable reachable from torch (torch.save, torch.os.system...)."""
    from edgeq.load.export_archive import check_program_calls

    program = torch.export.load(str(exported))
    check_program_calls(exported, program)  # a normal program passes
    graph = program.graph_module.graph
    with graph.inserting_before(next(iter(graph.nodes)).next):
        graph.call_function(torch.save, ("payload", str(tmp_path / "ran")))
    with pytest.raises(SourceError, match=r"torch\.serialization\.save.*not a PyTorch operator.*--trust-pickle"):
        check_program_calls(exported, program)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_export_archive_with_a_duplicated_member_is_refused(tmp_path, exported):
    """Python's zipfile reads the last of two same-named members, torch's reader the first: refuse both."""
    path = rewrite(exported, tmp_path / "twice.pt2", add={"data/sample_inputs/model.pt": saved(((torch.zeros(1, 16),), {}))})
    with pytest.raises(SourceError, match="is named twice.*--trust-pickle"):
        load_model(str(path))


# --- TorchScript -----------------------------------------------------------------------------------------


@ONNX
def test_torchscript_pickle_is_not_python_pickle(tmp_path, good_bundle):
    """TorchScript's own unpickler resolves no Python globals: a Python pickle in data.pkl fails to load."""
    marker = tmp_path / "ran"
    module, examples = tiny_mlp()
    torch.jit.trace(module, examples).save(str(tmp_path / "good.ts"))
    path = rewrite(
        tmp_path / "good.ts", tmp_path / "evil.ts",
        lambda member, data: pickle.dumps(Touch(marker), protocol=2) if member == "data.pkl" else data,
    )
    result = convert(good_bundle, str(path), "--input", "x:1x16")
    assert_refused(result, path, marker, "TorchScript")


# --- Hugging Face folders --------------------------------------------------------------------------------


@ONNX
def test_hugging_face_pickled_bin_weights_never_run(tmp_path, good_bundle):
    """Checked before transformers loads (so a tiny config and poisoned weights are enough)."""
    marker = tmp_path / "ran"
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    poisoned_state_dict(folder / "pytorch_model.bin", marker)
    for trusted in ([], ["--trust-pickle"]):  # transformers reads .bin weights-only even when trusted
        result = convert(good_bundle, str(folder), "--task", "feature-extraction", *trusted)
        assert_refused(result, folder / "pytorch_model.bin", marker, "--trust-pickle", "safetensors")


@ONNX
def test_hugging_face_remote_code_never_runs(tmp_path, good_bundle):
    marker = tmp_path / "ran"
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {"AutoModel": "modeling_custom.Custom"}}))
    (folder / "modeling_custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    (folder / "model.safetensors").write_bytes(b"")
    result = convert(good_bundle, str(folder), "--task", "feature-extraction")
    assert_refused(result, folder / "config.json", marker, "--trust-pickle", "auto_map")


# --- data files ------------------------------------------------------------------------------------------


@ONNX
@pytest.mark.parametrize("suffix", [".npz", ".npy"])
def test_object_arrays_in_data_are_never_unpickled(tmp_path, good_bundle, suffix):
    marker = tmp_path / "ran"
    payload = np.array([Touch(marker), 1.0], dtype=object)
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, x=payload)
    else:
        np.save(path, payload, allow_pickle=True)
    result = convert(good_bundle, MLP, "--data", str(path))
    assert_refused(result, path, marker, "Python objects", "unpickl")


# --- broken sources: plausible user mistakes, each a clear early error ---------------------------------------

FACTORIES = """
import torch
from edgeq.examples import tiny_mlp

def garbage():
    return "not a model"

def explodes():
    raise ValueError("no weights for this config")

def bad_examples():
    return torch.nn.Linear(2, 2), "x"

def returns_text():
    class Text(torch.nn.Module):
        def forward(self, x):
            return "text"
    return Text(), (torch.zeros(1, 2),)
"""


def _module(tmp_path: Path, monkeypatch, text: str) -> str:
    """Write `text` as a uniquely named module importable from tmp_path; return its name."""
    name = f"edgeq_case_{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:10]}"
    (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _state(tmp_path: Path, **changes) -> Path:
    state = dict(tiny_mlp()[0].state_dict())
    state.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del state[key]
    torch.save(state, tmp_path / "w.pt")
    return tmp_path / "w.pt"


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _exported(tmp_path: Path) -> Path:
    module, examples = tiny_mlp()
    torch.export.save(torch.export.export(module, examples), str(tmp_path / "m.pt2"))
    return tmp_path / "m.pt2"


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _zip(path: Path, **members: str) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def _folder(path: Path, **files: str) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _safetensors(tmp_path: Path) -> Path:
    import safetensors.torch

    safetensors.torch.save_file(dict(tiny_mlp()[0].state_dict()), str(tmp_path / "w.safetensors"))
    return tmp_path / "w.safetensors"


F = ["--factory", MLP]
# id: (build(tmp_path, monkeypatch) -> arguments, exit code, words the message must hold)
BROKEN_SOURCES = {
    "onnx-file": (lambda t, m: [str(_file(t / "model.onnx", b"\x08\x07\x12\x07pytorch\x00\x01"))], 3, ["ONNX model", "SOURCE may be", "--factory"]),
    "text-file": (lambda t, m: [str(_file(t / "notes.txt", b"my model\n"))], 3, ["text file", "'my model'", "torch.export"]),
    "empty-pt": (lambda t, m: [str(_file(t / "empty.pt", b""))], 3, ["empty file", "SOURCE may be"]),
    "empty-pt2": (lambda t, m: [str(_file(t / "empty.pt2", b""))], 3, ["empty file", "not a torch.export program"]),
    "folder-without-config": (lambda t, m: [str(_folder(t / "ckpt", **{"weights.bin": "x"}))], 3, ["without config.json", "weights.bin"]),
    "npy-as-source": (lambda t, m: [str(_file(t / "x.pt", np.lib.format.magic(1, 0) + b"\0" * 8))], 3, ["numpy", "--data"]),
    "truncated-state-dict": (lambda t, m: [str(_truncated(_state(t))), *F], 3, ["truncated", "save it again"]),
    "truncated-pt2": (lambda t, m: [str(_truncated(_exported(t)))], 3, ["truncated", "not a torch.export program"]),
    "truncated-safetensors": (lambda t, m: [str(_truncated(_safetensors(t))), *F], 3, ["not a readable safetensors file", "truncated"]),
    "zip-as-pt2": (lambda t, m: [str(_zip(t / "m.pt2", **{"a.txt": "hello"}))], 3, ["zip archive of 1 file", "a.txt"]),
    "state-dict-as-pt2": (lambda t, m: [str(_zip_state(t))], 2, ["torch.save file", "not a torch.export program", "--factory"]),
    "pt2-with-factory": (lambda t, m: [str(_exported(t)), *F], 2, ["drop --factory"]),
    "misshapen-state-dict": (lambda t, m: [str(_state(t, **{"layers.0.weight": torch.zeros(3, 3)})), *F], 3, ["layers.0.weight is 3x3 in the file, 64x16"]),
    "missing-keys": (lambda t, m: [str(_state(t, **{"layers.3.bias": None})), *F], 3, ["missing keys: layers.3.bias"]),
    "not-tensors": (lambda t, m: [str(_state(t, epoch=3)), *F], 3, ["epoch (int)", "'state_dict'"]),
    "factory-returns-text": (lambda t, m: [str(_state(t)), "--factory", f"{_module(t, m, FACTORIES)}:garbage"], 3, ["returned str", "nn.Module"]),
    "factory-raises": (lambda t, m: [str(_state(t)), "--factory", f"{_module(t, m, FACTORIES)}:explodes"], 3, ["ValueError: no weights for this config", "line 9"]),
    "examples-not-tensors": (lambda t, m: [f"{_module(t, m, FACTORIES)}:bad_examples"], 3, ["example inputs must be a tensor", "not str"]),
    "forward-returns-text": (lambda t, m: [f"{_module(t, m, FACTORIES)}:returns_text"], 3, ["returned a str", "tensors"]),
    "source-syntax-error": (lambda t, m: [f"{_module(t, m, 'def build(:  # oops' + chr(10))}:build"], 3, ["SyntaxError", "line 1", "def build(:"]),
    "source-raises-at-import": (lambda t, m: [f"{_module(t, m, 'import os' + chr(10) + 'raise OSError(5, chr(98))' + chr(10))}:build"], 3, ["OSError", "line 2"]),
    "source-exits-at-import": (lambda t, m: [f"{_module(t, m, 'import sys' + chr(10) + 'sys.exit(2)' + chr(10))}:build"], 3, ["SystemExit", "line 2"]),
    "unknown-attribute": (lambda t, m: [f"{_module(t, m, FACTORIES)}:nope"], 3, ["has no attribute 'nope'"]),
    "wrong-features": (lambda t, m: [MLP, "--input", "x:1x3"], 3, ["forward failed on x:1x3:float32", "declared with --input", "mat1", "Check --input"]),
    "wrong-dtype": (lambda t, m: [MLP, "--input", "x:1x16:int64"], 3, ["x:1x16:int64", "Long and Float", "Check --input"]),
    "wrong-channels": (lambda t, m: ["edgeq.examples:tiny_convnet", "--input", "pixels:1x1x32x32"], 3, ["pixels:1x1x32x32:float32", "channels"]),
    "hf-config-not-json": (lambda t, m: [str(_folder(t / "hf", **{"config.json": "{model_type: bert"})), "--task", "feature-extraction"], 3, ["config.json", "not valid JSON", "line 1"]),
    "hf-config-not-object": (lambda t, m: [str(_folder(t / "hf", **{"config.json": "[]"})), "--task", "feature-extraction"], 3, ["expected a JSON object"]),
    "hf-without-weights": (lambda t, m: [str(_folder(t / "hf", **{"config.json": "{}"})), "--task", "feature-extraction"], 3, ["holds no weights", "save_pretrained"]),
}


def _zip_state(tmp_path: Path) -> Path:
    torch.save(dict(tiny_mlp()[0].state_dict()), tmp_path / "m.pt2")
    return tmp_path / "m.pt2"


@ONNX
@pytest.mark.parametrize("case", BROKEN_SOURCES, ids=str)
def test_broken_sources_fail_early_and_clearly(tmp_path, monkeypatch, good_bundle, case):
    build, code, words = BROKEN_SOURCES[case]
    result = convert(good_bundle, *build(tmp_path, monkeypatch))
    text = " ".join(result.output.split())
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert all(word in text for word in words), result.output
