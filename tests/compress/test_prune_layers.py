"""Per-layer pruning ratios (`--prune-layers PATTERN=RATIO`, `prune_layers` in edgeq.toml; edgeq/compress/
prune_layers.py): every kind honours a layer's own ratio and leaves a layer named with 0 whole, the last matching
entry wins, a dependency group takes the smallest ratio of its layers, :global pins the named layers, a pattern
naming no layer or a ratio outside [0, 1) is refused with exit 2, and plan.json records the ratios."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgeq.cli import main
from edgeq.compress.prune_layers import check_prune_layers
from edgeq.compress.sparsity import prune_sparse
from edgeq.compress.spec import PruneSpec, parse_prune, with_layers
from edgeq.errors import UsageError
from edgeq.project import command_line_job, load_project
from tests.conftest import ONNX, requires


def _spec(text: str, layers) -> PruneSpec:
    return with_layers(parse_prune(text), layers)


class FourLinears(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3, self.head = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def _sparsity(module, name) -> float:
    return float((module.get_submodule(name).weight == 0).float().mean())


# --- the spec: parsing, checks, precedence -------------------------------------------------------------------


def test_table_and_flag_spellings_give_the_same_spec():
    table = _spec("structured:0.5", {"features.0": 0.25, "re:classifier\\..*": 0, "*.attention": 0.5})
    flags = _spec("structured:0.5", ["features.0=0.25", "re:classifier\\..*=0", "*.attention=0.5"])
    assert table == flags and table.layers == (("features.0", 0.25), ("re:classifier\\..*", 0), ("*.attention", 0.5))
    job = command_line_job({"source": "edgeq.examples:tiny_mlp", "prune": "unstructured:0.5", "prune_layers": ["layers.0=0.2"]})
    assert job.compression.prune.layers == (("layers.0", 0.2),) and job.compression.prune.layers_origin == "--prune-layers"


def test_the_last_matching_entry_wins_and_unnamed_layers_take_the_spec():
    spec = _spec("unstructured:0.5", {"*": 0.3, "fc2": 0.1, "re:fc[23]": 0.2})
    assert spec.layer_ratio("fc1") == (0.3, "*")
    assert spec.layer_ratio("fc2") == (0.2, "re:fc[23]")  # the later entry, though "fc2" is more specific
    assert _spec("unstructured:0.5", {"fc1": 0}).layer_ratio("head") == (0.5, None)


@pytest.mark.parametrize(("layers", "message"), [
    ({"fc1": 1.0}, r"--prune-layers 'fc1': 1.0 is not a ratio; expected a number in \[0, 1\)"),
    ({"fc1": -0.1}, r"--prune-layers 'fc1': -0.1 is not a ratio"),
    ({"fc1": True}, r"--prune-layers 'fc1': True is not a ratio"),
    ({"fc1": "half"}, r"--prune-layers 'fc1': 'half' is not a ratio"),
    (["fc1=half"], r"--prune-layers 'fc1': 'half' is not a number"),
    (["fc1"], r"--prune-layers: 'fc1': expected PATTERN=RATIO"),
    ({"re:((": 0.2}, r"--prune-layers: 're:\(\(': not a valid regular expression"),
])
def test_bad_entries_are_refused_naming_the_key(layers, message):
    with pytest.raises(UsageError, match=message):
        _spec("unstructured:0.5", layers)


def test_nm_takes_only_zero():
    assert _spec("2:4", {"fc1": 0}).layers == (("fc1", 0),)
    with pytest.raises(UsageError, match=r"'fc1': 0.25: N:M sparsity is fixed by the spec \(2:4 removes 0.5"):
        _spec("2:4", {"fc1": 0.25})


def test_toml_table_and_its_mistakes(tmp_path):
    project = tmp_path / "edgeq.toml"
    project.write_text(textwrap.dedent("""
        [defaults]
        prune = "structured:0.5"
        [defaults.prune_layers]
        "features.0" = 0.25
        "re:head" = 0

        [[models]]
        source = "edgeq.examples:tiny_convnet"
    """))
    (job,) = load_project(project)
    assert job.compression.prune.layers == (("features.0", 0.25), ("re:head", 0))
    assert job.compression.prune.layers_origin.endswith("edgeq.toml: defaults.prune_layers")
    project.write_text(project.read_text().replace('"features.0" = 0.25', '"features.0" = 1.5'))
    with pytest.raises(UsageError, match=r"edgeq.toml: defaults.prune_layers 'features.0': 1.5 is not a ratio"):
        load_project(project)
    project.write_text('[[models]]\nsource = "edgeq.examples:tiny_mlp"\nprune_layers = { "layers.0" = 0.2 }\n')
    with pytest.raises(UsageError, match=r"models\[0\].prune_layers: sets per-layer ratios of --prune; add --prune"):
        load_project(project)


# --- unstructured and N:M -------------------------------------------------------------------------------------


def test_unstructured_follows_each_layers_ratio_and_zero_leaves_it_dense():
    model = FourLinears()
    spec = _spec("unstructured:0.5", {"fc1": 0.25, "fc2": 0})
    result = prune_sparse(model, spec, None, ["x"], (torch.randn(1, 16),))
    pruned = result.module
    assert _sparsity(pruned, "fc1") == 0.25 and _sparsity(pruned, "fc3") == 0.5 and _sparsity(pruned, "fc2") == 0.0
    assert result.layers["fc1"] == {"sparsity": 0.25, "pattern": "unstructured", "ratio": 0.25, "override": "fc1"}
    assert result.layers["fc3"]["ratio"] == 0.5 and "override" not in result.layers["fc3"]
    assert "fc2" not in result.layers and result.skipped["fc2"] == "--prune-layers 'fc2' = 0: left whole"
    assert any("per-layer ratios (--prune-layers" in note and "'fc1' = 0.25" in note for note in result.notes)
    assert _sparsity(model, "fc1") == 0.0  # the input module is untouched


def test_global_scope_pins_the_named_layers_and_ranks_the_others():
    model = FourLinears()
    spec = _spec("unstructured:0.5:global", {"fc1": 0.25, "fc3": 0})
    result = prune_sparse(model, spec, None, ["x"], (torch.randn(1, 16),))
    assert _sparsity(result.module, "fc1") == 0.25 and _sparsity(result.module, "fc3") == 0.0
    assert _sparsity(result.module, "fc2") == 0.5  # the only layer ranked: the global share is all its own


def test_nm_zero_leaves_a_layer_dense():
    result = prune_sparse(FourLinears(), _spec("2:4", {"fc2": 0}), None, ["x"], (torch.randn(1, 16),))
    assert _sparsity(result.module, "fc1") == _sparsity(result.module, "fc3") == 0.5 and _sparsity(result.module, "fc2") == 0.0
    assert result.layers["fc1"]["ratio"] == 0.5 and "fc2" in result.skipped


def test_a_pattern_naming_no_layer_is_refused_with_real_names():
    with pytest.raises(UsageError, match=r"--prune-layers 'fc9': names none of the model's linear or conv layers \(4\); "
                                         r"they are e.g. .*fc1.*'re:REGEX'"):
        check_prune_layers(FourLinears(), _spec("unstructured:0.5", {"fc1": 0.2, "fc9": 0.2}))
    check_prune_layers(FourLinears(), _spec("unstructured:0.5", {"re:fc.": 0.2, "*head": 0}))  # all name layers


# --- structured channels --------------------------------------------------------------------------------------


class Residual(nn.Module):
    """stem and body.1 are tied by the residual add (one dependency group); mid is a group of its own."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
        self.mid = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = y + self.body[1](torch.relu(self.body[0](y)))
        return self.fc(torch.relu(self.mid(y)).mean((2, 3)))


def _structured(text, layers):
    from edgeq.compress.prune_structured import prune_structured

    example = (torch.randn(1, 3, 8, 8),)
    return prune_structured(Residual().eval(), _spec(text, layers), [], ["x"], example)


@requires("torch_pruning")
def test_structured_group_takes_the_smallest_ratio_of_its_layers():
    result = _structured("structured:0.5", {"body.1": 0.25, "body.0": 0})
    pruned = result.module
    # stem + body.1 share channels: body.1's 0.25 (rounded to a multiple of 8) decides the whole group
    assert pruned.stem.out_channels == pruned.body[1].out_channels == 24
    assert pruned.body[0].out_channels == 32 and result.skipped["body.0"] == "--prune-layers 'body.0' = 0: left whole"
    assert pruned.mid.out_channels == 16  # unnamed: the spec's 0.5
    root = "stem" if "stem" in result.layers and "ratio" in result.layers["stem"] else "body.1"
    assert result.layers[root]["ratio"] == 0.25 and result.layers[root]["override"] == "body.1"
    assert result.layers["mid"]["ratio"] == 0.5 and result.layers["mid"]["out_channels"] == [32, 16]
    with torch.no_grad():
        assert torch.isfinite(pruned(torch.randn(1, 3, 8, 8))).all()


@requires("torch_pruning")
def test_structured_zero_on_any_coupled_layer_keeps_the_group_whole():
    result = _structured("structured:0.5", {"stem": 0.5, "body.1": 0})
    assert result.module.stem.out_channels == result.module.body[1].out_channels == 32
    assert result.module.mid.out_channels == 16


@requires("torch_pruning")
def test_structured_global_is_accepted_and_pins_the_named_layers():
    spec = parse_prune("structured:0.5:global")
    assert spec.kind == "channels" and spec.scope == "global"  # the README's structured:0.5[:importance][:global]
    result = _structured("structured:0.5:l1:global", {"mid": 0})
    assert result.module.mid.out_channels == 32 and "mid" in result.skipped
    assert result.module.stem.out_channels < 32  # the unnamed groups were ranked and pruned
    assert any("pinned" in note for note in result.notes)


# --- attention heads ------------------------------------------------------------------------------------------


@requires("transformers")
def test_heads_follow_the_attention_modules_ratio():
    from edgeq.compress.prune_heads import prune_heads
    from tests.compress.test_prune_heads import _flat, tiny_bert

    module, names, examples = _flat(tiny_bert)
    spec = PruneSpec("heads", 0.5, text="heads:0.5", layers=(("*.attention", 0.25), ("model.encoder.layer.1.attention.self", 0)))
    check_prune_layers(module, spec)
    result = prune_heads(module, spec, [], names, examples)
    first, second = result.layers["model.encoder.layer.0.attention.self"], result.layers["model.encoder.layer.1.attention.self"]
    assert first["heads"] == [4, 3] and first["ratio"] == 0.25 and first["override"] == "*.attention"  # via its parent
    assert second["heads"] == [4, 4] and second["removed"] == [] and "model.encoder.layer.1.attention.self" in result.skipped
    with pytest.raises(UsageError, match=r"'\*.attn': names none of the model's attention modules \(9\); they are e.g. "
                                         r"model\.encoder\.layer\.0\.attention\.self, model\.encoder\.layer\.1\.attention\.self, "):
        check_prune_layers(module, PruneSpec("heads", 0.5, layers=(("*.attn", 0.2),), layers_origin="--prune-layers"))


# --- through edgeq convert ------------------------------------------------------------------------------------


def test_cli_refuses_an_unknown_pattern_with_exit_2_before_any_work(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "fp32", "--prune",
                                       "unstructured:0.5", "--prune-layers", "encoder.0=0.2", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "--prune-layers 'encoder.0': names none of the model's linear or conv layers (2); they are e.g. layers.0, layers.3" in result.output
    assert not out.exists() or not any(out.rglob("*.json"))


@pytest.mark.parametrize(("args", "message"), [
    (["--prune", "unstructured:0.5", "--prune-layers", "layers.0=1"], "--prune-layers 'layers.0': 1.0 is not a ratio"),
    (["--prune-layers", "layers.0=0.2"], "--prune-layers: sets per-layer ratios of --prune; add --prune"),
    (["--prune", "2:4", "--prune-layers", "layers.0=0.3"], "N:M sparsity is fixed by the spec"),
])
def test_cli_refuses_bad_ratios_with_exit_2(args, message):
    result = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


@ONNX
def test_plan_json_records_each_layers_ratio(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "int8-dynamic", "--prune", "unstructured:0.5",
        "--prune-layers", "layers.0=0.25", "--samples", "3", "--calibration-samples", "4", "--budget", "none", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    bundle = out / "tiny_mlp" / "onnx" / "int8-dynamic"
    (record,) = json.loads((bundle / "plan.json").read_text())["compression"]
    assert record["spec"] == "unstructured:0.5"
    assert record["layers"]["layers.0"] == {"sparsity": 0.25, "pattern": "unstructured", "ratio": 0.25, "override": "layers.0"}
    assert any("'layers.0' = 0.25" in note for note in record["notes"])
    (stage,) = json.loads((bundle / "report.json").read_text())["compression"]["stages"]
    assert stage["layers"]["layers.0"]["ratio"] == 0.25
