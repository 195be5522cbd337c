"""--prune / --lowrank / --recover specs: every documented form parses, every mistake is a UsageError naming the
option and a form that works; edgeq.toml keys and command-line options fail the same way, before torch loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.compress.spec import (
    CompressionSpecs, LowRankSpec, PruneSpec, RecoverSpec, parse_lowrank, parse_prune, parse_recover,
)
from edgeq.errors import UsageError
from edgeq.project import load_project


@pytest.mark.parametrize(("text", "expected"), [
    ("structured:0.5", PruneSpec("channels", 0.5, text="structured:0.5")),
    ("structured:0.5:taylor", PruneSpec("channels", 0.5, importance="taylor", text="structured:0.5:taylor")),
    ("structured:0.5:taylor:global", PruneSpec("channels", 0.5, importance="taylor", scope="global", text="structured:0.5:taylor:global")),
    ("heads:0.33", PruneSpec("heads", 0.33, text="heads:0.33")),
    ("unstructured:0.5", PruneSpec("unstructured", 0.5, text="unstructured:0.5")),
    ("unstructured:0.5:global", PruneSpec("unstructured", 0.5, scope="global", text="unstructured:0.5:global")),
    ("unstructured:0.5:sparsegpt", PruneSpec("unstructured", 0.5, method="sparsegpt", text="unstructured:0.5:sparsegpt")),
    ("2:4", PruneSpec("nm", 0.5, n=2, m=4, text="2:4")),
    ("2:4:sparsegpt", PruneSpec("nm", 0.5, n=2, m=4, method="sparsegpt", text="2:4:sparsegpt")),
    ("1:4", PruneSpec("nm", 0.75, n=1, m=4, text="1:4")),
])
def test_prune_forms(text, expected):
    assert parse_prune(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("energy:0.95", LowRankSpec("energy", 0.95, text="energy:0.95")),
    ("energy:1", LowRankSpec("energy", 1.0, text="energy:1")),
    ("rank:0.5", LowRankSpec("rank", 0.5, text="rank:0.5")),
    ("params:0.5", LowRankSpec("params", 0.5, text="params:0.5")),
    ("rank:0.5:activation", LowRankSpec("rank", 0.5, activation_aware=True, text="rank:0.5:activation")),
])
def test_lowrank_forms(text, expected):
    assert parse_lowrank(text) == expected


def test_lowrank_layers_ride_along():
    assert parse_lowrank("rank:0.5", ["*.fc1", "re:.*ffn.*"]).layers == ("*.fc1", "re:.*ffn.*")


@pytest.mark.parametrize(("text", "expected"), [
    ("distill", RecoverSpec(text="distill")),
    ("distill:steps=300,lr=5e-5", RecoverSpec(steps=300, lr=5e-5, text="distill:steps=300,lr=5e-5")),
    ("qat", RecoverSpec(qat=True, text="qat")),
    ("qat:steps=300", RecoverSpec(steps=300, qat=True, text="qat:steps=300")),
    ("lora:rank=8", RecoverSpec(lora_rank=8, text="lora:rank=8")),
    ("distill:checkpoint_dir=ck,resume=true,device=cpu,temperature=4,feature_weight=0.5,batch_size=16",
     RecoverSpec(batch_size=16, temperature=4.0, feature_weight=0.5, checkpoint_dir="ck", resume=True,
                 text="distill:checkpoint_dir=ck,resume=true,device=cpu,temperature=4,feature_weight=0.5,batch_size=16")),
])
def test_recover_forms(text, expected):
    spec = parse_recover(text)
    assert spec == expected
    assert spec.mode == ("lora" if spec.lora_rank else "qat" if spec.qat else "distill")


@pytest.mark.parametrize(("parse", "text", "message"), [
    (parse_prune, "structured:1.5", "--prune structured:1.5: ratio must be in (0, 1), e.g. structured:0.5"),
    (parse_prune, "structured:0", "ratio must be in (0, 1)"),
    (parse_prune, "structured", "give the share to remove, e.g. structured:0.5"),
    (parse_prune, "structured:half", "ratio 'half' is not a number, e.g. structured:0.5"),
    (parse_prune, "sparse:0.5", "unknown kind 'sparse'; expected structured, heads, unstructured or N:M"),
    (parse_prune, "4:2", "N:M needs whole numbers 0 < N < M"),
    (parse_prune, "2:4:global", "unknown option 'global'"),
    (parse_prune, "structured:0.5:sparsegpt", "unknown option 'sparsegpt'; expected l1 or l2 or activation or taylor or global or layer"),
    (parse_prune, "heads:0.3:global", "unknown option 'global'"),
    (parse_prune, "unstructured:0.5:global:layer", "contradict"),
    (parse_prune, "", "--prune: empty"),
    (parse_lowrank, "svd:0.5", "--lowrank svd:0.5: unknown mode 'svd'; expected energy, rank or params"),
    (parse_lowrank, "rank:1", "--lowrank rank:1: rank must be in (0, 1), e.g. rank:0.5"),
    (parse_lowrank, "energy:1.2", "energy must be in (0, 1], e.g. energy:0.95"),
    (parse_lowrank, "rank:0.5:fast", "unknown option 'fast'; expected activation"),
    (parse_recover, "finetune", "--recover finetune: unknown recovery 'finetune'; expected distill, qat or lora"),
    (parse_recover, "distill:steps=0", "steps must be a whole number, 1 or more"),
    (parse_recover, "distill:lr=fast", "lr=fast: expected a number, e.g. lr=5e-5"),
    (parse_recover, "distill:epochs=3", "'epochs=3': expected key=value with key one of steps, lr"),
    (parse_recover, "qat:rank=4", "expected key=value"),
    (parse_recover, "lora", "lora needs a rank, e.g. lora:rank=8"),
    (parse_recover, "distill:resume=true", "resume needs checkpoint_dir=FOLDER"),
    (parse_recover, "distill:device=tpu", "device 'tpu' is not one of cpu, cuda"),
])
def test_mistakes_say_what_would_work(parse, text, message):
    with pytest.raises(UsageError) as raised:
        parse(text)
    assert message in str(raised.value)


def test_bad_layer_pattern_is_named():
    with pytest.raises(UsageError, match=r"--lowrank-layers: 're:\(\(': not a valid regular expression"):
        parse_lowrank("rank:0.5", ["re:(("])


def test_dataclasses_validate_themselves():
    with pytest.raises(UsageError, match="sparsegpt prunes weights"):
        PruneSpec("channels", 0.5, method="sparsegpt")
    with pytest.raises(UsageError, match="qat and lora are separate"):
        RecoverSpec(qat=True, lora_rank=4)
    specs = CompressionSpecs(prune=parse_prune("structured:0.5"), recover=parse_recover("distill"))
    assert specs.asked and specs.distills and specs.needing_data() == ["distill"]
    assert CompressionSpecs(prune=parse_prune("2:4:sparsegpt")).needing_data() == ["2:4:sparsegpt"]
    assert not CompressionSpecs().asked


@pytest.mark.parametrize(("args", "message"), [
    (["--prune", "structured:1.5"], "error: --prune structured:1.5: ratio must be in (0, 1), e.g. structured:0.5"),
    (["--lowrank", "rank"], "error: --lowrank rank: give a value, e.g. rank:0.5"),
    (["--lowrank-layers", "fc1"], "error: --lowrank-layers: chooses the layers --lowrank factorizes; add --lowrank"),
    (["--recover", "distill"], "error: --recover distill: distillation recovers what --prune or --lowrank cost"),
    (["--prune", "2:4", "--recover", "qat", "--calibration-samples", "0"], "error: --calibration-samples 0: qat needs calibration samples"),
])
def test_cli_refuses_bad_specs_with_exit_2(args, message):
    result = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_qat_without_a_quantized_precision_is_refused_before_data(tmp_path):
    result = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "fp32", "--recover", "qat",
                                       "-o", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "--recover qat: recovers quantized plans, and this run makes none (fp32)" in result.output
    assert not any(tmp_path.iterdir())


def test_toml_keys(tmp_path):
    project = tmp_path / "edgeq.toml"
    project.write_text(textwrap.dedent("""
        [defaults]
        prune = "structured:0.5"
        recover = "distill:steps=20"

        [[models]]
        source = "edgeq.examples:tiny_mlp"
        lowrank = "rank:0.5"
        lowrank_layers = ["layers.0", "re:.*3"]

        [[models]]
        source = "edgeq.examples:tiny_convnet"
        prune = "2:4"
    """))
    first, second = load_project(project)
    assert first.compression == CompressionSpecs(
        PruneSpec("channels", 0.5, text="structured:0.5"), LowRankSpec("rank", 0.5, layers=("layers.0", "re:.*3"), text="rank:0.5"),
        RecoverSpec(steps=20, text="distill:steps=20"))
    assert second.compression.prune == PruneSpec("nm", 0.5, n=2, m=4, text="2:4") and second.compression.lowrank is None
    # a checkpoint folder in the file is relative to the file
    project.write_text(project.read_text().replace('recover = "distill:steps=20"', 'recover = "distill:steps=20,checkpoint_dir=ck"'))
    assert load_project(project)[0].compression.recover.checkpoint_dir == str(tmp_path.resolve() / "ck")
    # the command line overrides the file for every model
    (overridden, _) = load_project(project, {"prune": "unstructured:0.25"})
    assert overridden.compression.prune.kind == "unstructured"


def test_toml_mistakes_name_file_and_key(tmp_path):
    project = tmp_path / "edgeq.toml"
    project.write_text('[[models]]\nsource = "edgeq.examples:tiny_mlp"\nprune = "structured:2"\n')
    with pytest.raises(UsageError, match=r"edgeq.toml: models\[0\].prune structured:2: ratio must be in \(0, 1\)"):
        load_project(project)
    project.write_text('[[models]]\nsource = "edgeq.examples:tiny_mlp"\nlowrank_layers = "fc"\nlowrank = "rank:0.5"\n')
    with pytest.raises(UsageError, match=r"models\[0\].lowrank_layers: 'fc' is not valid; expected a list"):
        load_project(project)


def test_help_stays_torch_free():
    code = "import sys; from click.testing import CliRunner; from edgeq.cli import main; " \
           "r = CliRunner().invoke(main, ['convert', '--help']); assert '--prune' in r.output and '--recover' in r.output; " \
           "r = CliRunner().invoke(main, ['convert', 'edgeq.examples:tiny_mlp', '--prune', 'bad:1']); assert r.exit_code == 2; " \
           "print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_recover_on_cuda_without_a_cuda_torch_is_refused_before_work():
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
        pytest.skip("this torch is built with CUDA: the refusal applies to CPU-only builds")
    result = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", "--prune", "2:4", "--recover", "distill:device=cuda"])
    assert result.exit_code == 2, result.output
    assert "--recover distill:device=cuda: the installed torch" in result.output and "device=cpu" in result.output
