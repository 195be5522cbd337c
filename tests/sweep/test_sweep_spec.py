"""sweep.toml is checked whole before any task starts: edgeq.toml's key checks, errors naming file and key, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.sweep import load_sweep

GOOD = """
[sweep]
targets = ["onnx", "tflite"]
schemes = ["fp32", "int8-weight"]

[defaults]
samples = 4

[[models]]
source = "edgeq.examples:tiny_mlp"

[[models]]
source = "edgeq.examples:tiny_convnet"
name = "convnet"

[recipes.plain]

[recipes.minmax]
observer = "minmax"
"""


def test_expands_models_x_targets_x_schemes_x_recipes(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(GOOD)
    sweep = load_sweep(path)
    assert len(sweep.tasks) == 2 * 2 * 2 * 2
    assert sweep.out == tmp_path / "build" / "sweep"
    task = next(t for t in sweep.tasks if t.id == "convnet/minmax/tflite/int8-weight")
    assert task.job.targets == ["tflite"] and task.job.precisions == ["int8-weight"] and task.job.name == "convnet"
    assert task.job.quantize.observer == "minmax" and task.job.samples == 4
    assert task.folder == tmp_path / "build" / "sweep" / "convnet" / "minmax" / "tflite" / "int8-weight"
    assert task.job.out == task.folder  # each task converts into its own folder: no two share a model lock
    assert len({t.folder for t in sweep.tasks}) == len(sweep.tasks)
    assert load_sweep(path, tmp_path / "elsewhere").tasks[0].folder.parent.parent.parent.parent == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[sweep]\nschemes = ["fp32"]\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\n', "sweep.targets: missing or empty"),
        ('[sweep]\ntargets = ["onnx"]\nschemes = ["fp32"]\nworkers = 2\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\n',
         "sweep.workers: unknown key"),
        ('[sweep]\ntargets = ["onnx"]\nschemes = ["fp64"]\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\n', "sweep.schemes"),
        ('[sweep]\ntargets = ["nnapi"]\nschemes = ["fp32"]\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\n', "sweep.targets"),
        ('[sweep]\ntargets = ["onnx"]\nschemes = ["fp32"]\n[defaults]\nsamples = -5\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\n',
         "defaults.samples: -5 is not valid"),
        ('[sweep]\ntargets = ["onnx"]\nschemes = ["fp32"]\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\nsampels = 4\n',
         "models[0].sampels: unknown key"),
        ('[sweep]\ntargets = ["onnx"]\nschemes = ["fp32"]\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\n[recipes.sq]\nsmoothquant = 2\n',
         "recipes.sq.smoothquant: 2 is not valid"),
        ('[sweep]\ntargets = ["onnx"]\nschemes = ["fp32"]\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\n[recipes.sq]\nprecisions = ["fp16"]\n',
         "recipes.sq.precisions: set by the sweep (sweep.schemes)"),
        ('[sweep]\ntargets = ["onnx"]\nschemes = ["fp32"]\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\n[[models]]\nsource = "mypkg:tiny_mlp"\n',
         "models[1]: name 'tiny_mlp' is also models[0]'s"),
        ('[sweep]\ntargets = ["onnx"]\nschemes = ["fp32"]\n[[models]]\nname = "x"\n', "models[0]: key 'source' is missing"),
        ('[sweep]\ntargets = ["onnx"]\nschemes = ["fp32"]\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\nbudget = "cosine>=2"\n',
         "models[0].budget"),
        ('[sweep]\ntargets = ["onnx"]\nschemes = ["fp32"]\n[[models]]\nsource = "edgeq.examples:tiny_mlp"\n[tune]\n', "unknown table(s) tune"),
        ('[sweep\n', "not valid TOML"),
    ],
)
def test_bad_sweep_file_is_refused_with_exit_2(tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["sweep", "-c", str(path), "--no-ray"])
    assert result.exit_code == 2, result.output
    assert message in result.output and str(path) in result.output
    assert not (tmp_path / "build").exists()  # refused before any task made a folder


def test_missing_file_and_contradicting_options_exit_2(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["sweep", "-c", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "no such file" in result.output
    path = tmp_path / "sweep.toml"
    path.write_text(GOOD)
    result = runner.invoke(main, ["sweep", "-c", str(path), "--address", "127.0.0.1:1", "--workers", "2"])
    assert result.exit_code == 2 and "--workers" in result.output
    result = runner.invoke(main, ["sweep", "-c", str(path), "--address", "127.0.0.1:1", "--no-ray"])
    assert result.exit_code == 2 and "--no-ray" in result.output


def test_unreachable_cluster_address_exits_2_at_once(tmp_path):
    """Nothing listens on port 1: refused in seconds, not after Ray's minutes of retries."""
    path = tmp_path / "sweep.toml"
    path.write_text(GOOD)
    result = CliRunner().invoke(main, ["sweep", "-c", str(path), "--address", "127.0.0.1:1"])
    assert result.exit_code == 2 and "--address 127.0.0.1:1" in result.output, result.output
    assert not (tmp_path / "build").exists()


def test_checking_and_planning_a_sweep_loads_no_toolchain_nor_ray(tmp_path):
    """A typo costs milliseconds: load_sweep and the content keys need neither torch nor Ray."""
    path = tmp_path / "sweep.toml"
    path.write_text(GOOD)
    code = (
        "import sys; from edgeq.sweep import load_sweep; from edgeq.sweep.run import plan;"
        f"planned = plan(load_sweep({str(path)!r})); assert len(planned) == 16 and not any(p.reused for p in planned);"
        "print(sorted({'torch', 'ray', 'onnx', 'tensorflow', 'coremltools', 'litert_torch'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_address_without_ray_installed_exits_2(tmp_path, monkeypatch):
    """Where Ray is not installed, --address cannot mean anything: said at once (the same tasks run without
    it only when no cluster was asked for)."""
    import edgeq.sweep

    monkeypatch.setattr(edgeq.sweep, "ray_available", lambda: False)
    path = tmp_path / "sweep.toml"
    path.write_text(GOOD)
    result = CliRunner().invoke(main, ["sweep", "-c", str(path), "--address", "127.0.0.1:1"])
    assert result.exit_code == 2 and "pip install 'edgeq[ray]'" in result.output, result.output
