"""Bad options and project files: each fails before torch or the model loads, with the documented exit code,
no traceback, a message naming the option or file key and what would work, and the good bundle already at
the destination untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from tests.conftest import ONNX

SOURCE = "edgeq.examples:tiny_mlp"


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder`, the per-model lock files aside (edgeq.bundle.claim_output)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".edgeq.lock"
    }


@pytest.fixture(scope="module")
def good_out(tmp_path_factory):
    """An output folder holding one good bundle (tiny_mlp, onnx fp32), and the digest of every file in it."""
    out = tmp_path_factory.mktemp("good")
    result = CliRunner().invoke(main, ["convert", SOURCE, "-t", "onnx", "-o", str(out), "--samples", "2"])
    assert result.exit_code == 0, result.output
    return out, tree_digest(out)


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# (case id, arguments after `convert`, exit code, words the message must hold). `{out}` is the good bundle's
# folder, `{tmp}` a scratch folder; a `{file:NAME}` is created there first.
OPTION_CASES = [
    ("unknown-option", [SOURCE, "--colour", "red"], 2, ["--colour"]),
    ("no-source", [], 2, ["missing SOURCE", "--config"]),
    ("missing-source-file", ["nothere.pt2"], 3, ["'nothere.pt2'", "no such file", "package.module:callable"]),
    ("source-and-config", [SOURCE, "-c", "{tmp}/edgeq.toml"], 2, ["either SOURCE or --config"]),
    ("unknown-target", [SOURCE, "-t", "onnx,nope"], 2, ["--target", "'nope'", "known targets"]),
    ("empty-target", [SOURCE, "-t", ""], 2, ["--target", "no target"]),
    ("missing-profile-file", [SOURCE, "-t", "{tmp}/mine.toml"], 2, ["--target", "mine.toml"]),
    ("unknown-precision", [SOURCE, "-p", "int9"], 2, ["--precision", "int9", "fp32"]),
    ("empty-precision", [SOURCE, "-p", ""], 2, ["--precision", "no precision"]),
    ("budget-empty", [SOURCE, "--budget", ""], 2, ["--budget", "empty budget", "'none'"]),
    ("budget-blank", [SOURCE, "--budget", "  "], 2, ["--budget", "empty budget"]),
    ("budget-two-dots", [SOURCE, "--budget", "cosine>=1.2.3"], 2, ["--budget", "'1.2.3' is not a number"]),
    ("budget-impossible-cosine", [SOURCE, "--budget", "cosine>=1.5"], 2, ["--budget", "can never hold", "[-1, 1]"]),
    ("budget-impossible-top1", [SOURCE, "--budget", "top1>=1.01"], 2, ["--budget", "can never hold"]),
    ("budget-negative-max-abs", [SOURCE, "--budget", "max_abs<=-0.1"], 2, ["--budget", "can never hold"]),
    ("budget-wrong-direction", [SOURCE, "--budget", "cosine<=0.9"], 2, ["--budget", "better when higher", "cosine>=0.9"]),
    ("budget-unknown-metric", [SOURCE, "--budget", "psnr>=30"], 2, ["--budget", "unknown metric", "sqnr_db"]),
    ("budget-no-operator", [SOURCE, "--budget", "cosine"], 2, ["--budget", "METRIC>=VALUE"]),
    ("budget-trailing-comma", [SOURCE, "--budget", "cosine>=0.9,"], 2, ["--budget", "METRIC>=VALUE"]),
    ("name-parent", [SOURCE, "--name", "../../x"], 2, ["--name", "plain folder name"]),
    ("name-absolute", [SOURCE, "--name", "/tmp/x"], 2, ["--name", "plain folder name"]),
    ("name-nested", [SOURCE, "--name", "a/b"], 2, ["--name", "plain folder name"]),
    ("name-dot", [SOURCE, "--name", "."], 2, ["--name", "plain folder name"]),
    ("name-hidden", [SOURCE, "--name", ".x"], 2, ["--name", "plain folder name"]),
    ("out-is-file", [SOURCE, "-o", "{file:taken.txt}"], 2, ["--out", "is a file", "folder"]),
    ("out-below-file", [SOURCE, "-o", "{file:taken.txt}/sub"], 2, ["--out", "which is a file"]),
    ("out-not-writable", [SOURCE, "-o", "/proc/edgeq-out"], 2, ["--out", "cannot write in /proc"]),
    ("samples-zero", [SOURCE, "--samples", "0"], 2, ["--samples"]),
    ("samples-word", [SOURCE, "--samples", "many"], 2, ["--samples"]),
    ("seed-negative", [SOURCE, "--seed", "-1"], 2, ["--seed", "0 to 2**32-1"]),
    ("calibration-negative", [SOURCE, "--calibration-samples", "-3"], 2, ["--calibration-samples"]),
    ("observer-unknown", [SOURCE, "--observer", "median"], 2, ["--observer", "minmax"]),
    ("smoothquant-range", [SOURCE, "--smoothquant", "2"], 2, ["--smoothquant", "[0, 1]", "off"]),
    ("smoothquant-word", [SOURCE, "--smoothquant", "strong"], 2, ["--smoothquant", "'off'"]),
    ("fallback-max-range", [SOURCE, "--fallback-max", "1.5"], 2, ["--fallback-max"]),
    ("sample-rate-zero", [SOURCE, "--sample-rate", "0"], 2, ["--sample-rate"]),
    ("keep-float-bad-regex", [SOURCE, "--keep-float", "re:(fc"], 2, ["--keep-float", "regular expression"]),
    ("task-on-callable", [SOURCE, "--task", "feature-extraction"], 2, ["--task", "Hugging Face model folders"]),
    ("task-unknown", ["{tmp}", "--task", "translation"], 2, ["--task", "'translation'", "feature-extraction"]),
    ("data-missing", [SOURCE, "--data", "nothere.npz"], 3, ["--data", "nothere.npz", "no such file"]),
    ("input-no-shape", [SOURCE, "--input", "x"], 2, ["--input", "NAME:SHAPE"]),
    ("input-bad-dim", [SOURCE, "--input", "x:1xq"], 2, ["--input", "dimension 'q'"]),
    ("input-zero-dim", [SOURCE, "--input", "x:0x3"], 2, ["--input", "at least 1"]),
    ("input-bad-dtype", [SOURCE, "--input", "x:1x3:complex64"], 2, ["--input", "dtype", "float32"]),
    ("preprocess-bad-value", [SOURCE, "--preprocess", "resize=big"], 2, ["resize"]),
    ("preprocess-unknown-key", [SOURCE, "--preprocess", "colour=red"], 2, ["colour"]),
    ("config-missing", ["-c", "{tmp}/nothere.toml"], 2, ["--config", "no such file"]),
    ("input-repeated", [SOURCE, "--input", "x:1x16", "--input", "x:1x16"], 2, ["--input", "x declared more than once"]),
    ("algo-unknown", [SOURCE, "--algo", "smart"], 2, ["--algo", "gptq"]),
    ("group-size-word", [SOURCE, "--group-size", "big"], 2, ["--group-size", "'channel'"]),
]


def _materialize(args: list[str], scratch: Path, out: Path) -> list[str]:
    resolved = []
    for arg in args:
        if arg.startswith("{file:"):
            name, _, rest = arg[len("{file:"):].partition("}")
            write(scratch, name, "not a folder\n")
            arg = str(scratch / name) + rest
        resolved.append(arg.replace("{tmp}", str(scratch)).replace("{out}", str(out)))
    return resolved


def _assert_clean_failure(result, code: int, words: list[str]) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output, f"{word!r} not in: {result.output}"


def _with_out(args: list[str], out: Path) -> list[str]:
    """The good bundle's folder as --out, unless the case sets its own."""
    if not args or "-o" in args or "-c" in args:
        return args
    return [*args, "-o", str(out)]


@ONNX
@pytest.mark.parametrize("case, args, code, words", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_option_fails_early_and_clearly(case, args, code, words, good_out, tmp_path):
    out, digest = good_out
    write(tmp_path, "edgeq.toml", f"[[models]]\nsource = '{SOURCE}'\n")
    result = CliRunner().invoke(main, ["convert", *_with_out(_materialize(args, tmp_path, out), out)])
    _assert_clean_failure(result, code, words)
    assert tree_digest(out) == digest, "a failed run changed the good bundle"


PROJECT_CASES = [
    ("samples-negative", "[defaults]\nsamples = -5\n", ["defaults.samples", "-5", "1 or more"]),
    ("samples-bool", "[defaults]\nsamples = true\n", ["defaults.samples", "True"]),
    ("samples-float", "[defaults]\nsamples = 2.5\n", ["defaults.samples", "2.5"]),
    ("targets-mixed", "[defaults]\ntargets = ['onnx', 3]\n", ["defaults.targets", "list of targets"]),
    ("targets-string", "[defaults]\ntargets = 'onnx'\n", ["defaults.targets", 'e.g. ["onnx", "tflite"]']),
    ("targets-unknown", "[defaults]\ntargets = ['onnx', 'nope']\n", ["defaults.targets", "'nope'"]),
    ("precisions-unknown", "[defaults]\nprecisions = ['int9']\n", ["defaults.precisions", "int9"]),
    ("models-string", "models = 'x'\n", ["models:", "[[models]] tables"]),
    ("models-empty", "models = []\n", ["declares no [[models]]"]),
    ("defaults-not-table", "defaults = 3\n", ["defaults:", "table"]),
    ("unknown-key", "[defaults]\ncolour = 'red'\n", ["defaults.colour", "unknown key", "known keys"]),
    ("unknown-table", "[model]\nsource = 'a:b'\n", ["unknown table", "[[models]]"]),
    ("not-toml", "[defaults\n", ["not valid TOML"]),
    ("budget-empty", "[defaults]\nbudget = ''\n", ["defaults.budget", "empty budget"]),
    ("budget-impossible", "[defaults]\nbudget = 'cosine>=1.5'\n", ["defaults.budget", "can never hold"]),
    ("budget-number", "[defaults]\nbudget = 0.99\n", ["defaults.budget", "0.99"]),
    ("name-traversal", "[defaults]\nname = '../x'\n", ["name", "plain folder name"]),
    ("observer-unknown", "[defaults]\nobserver = 'median'\n", ["defaults.observer", "minmax"]),
    ("smoothquant-range", "[defaults]\nsmoothquant = 1.5\n", ["defaults.smoothquant", "[0, 1]"]),
    ("fallback-range", "[defaults]\nfallback_max = -0.5\n", ["defaults.fallback_max", "[0, 1]"]),
    ("seed-bool", "[defaults]\nseed = false\n", ["defaults.seed", "False"]),
    ("sample-rate-zero", "[defaults]\nsample_rate = 0\n", ["defaults.sample_rate", "Hz"]),
    ("text-column-negative", "[defaults]\ntext_column = -1\n", ["defaults.text_column", "column index"]),
    ("inputs-bad", "[defaults]\ninputs = ['x:1xq']\n", ["inputs", "dimension 'q'"]),
    ("keep-float-not-list", "[defaults]\nkeep_float = 're:.*'\n", ["defaults.keep_float", "list"]),
    ("trust-pickle-string", "[defaults]\ntrust_pickle = 'yes'\n", ["defaults.trust_pickle", "true or false"]),
    ("group-size-zero", "[defaults]\ngroup_size = 0\n", ["defaults.group_size", "'channel'"]),
    ("out-is-file", "[defaults]\nout = 'edgeq.toml'\n", ["out", "is a file"]),
    ("source-missing-key", "[[models]]\nname = 'x'\n", ["models[0]", "'source' is missing"]),
    ("source-empty", "[[models]]\nsource = ''\n", ["models[0].source", "''"]),
]


@pytest.mark.parametrize("case, text, words", PROJECT_CASES, ids=[c[0] for c in PROJECT_CASES])
def test_bad_project_file_fails_early_and_clearly(case, text, words, tmp_path):
    body = text if "[[models]]" in text or text.startswith("models") else text + f"[[models]]\nsource = '{SOURCE}'\n"
    project = write(tmp_path, "edgeq.toml", body)
    result = CliRunner().invoke(main, ["convert", "-c", str(project)])
    _assert_clean_failure(result, 2, [str(project) if "out" not in case else "out", *words])


def test_project_file_not_utf8(tmp_path):
    project = write(tmp_path, "edgeq.toml", "[[models]]\nsource = 'caf\xe9:x'\n".encode("latin-1"))
    _assert_clean_failure(CliRunner().invoke(main, ["convert", "-c", str(project)]), 2, ["not UTF-8", "byte"])


def test_project_source_missing_is_bad_input(tmp_path):
    project = write(tmp_path, "edgeq.toml", "[[models]]\nsource = 'weights/nothere.pt2'\n")
    result = CliRunner().invoke(main, ["convert", "-c", str(project)])
    _assert_clean_failure(result, 3, ["models[0].source", "nothere.pt2", "no such file"])


def test_command_line_overrides_the_project_file(tmp_path):
    """Options beside -c are not ignored: they replace the file's values for every model, and are checked."""
    from edgeq.project import load_project

    project = write(tmp_path, "edgeq.toml", f"[defaults]\ntargets = ['coreml']\nbudget = 'cosine>=0.9'\n"
                    f"[[models]]\nsource = '{SOURCE}'\nprecisions = ['fp16']\n")
    (job,) = load_project(project, {"targets": ["onnx"], "precisions": ["fp32"], "budget": "sqnr_db>=30", "out": "/tmp/o"})
    assert (job.targets, job.precisions, job.budget, job.out) == (["onnx"], ["fp32"], "sqnr_db>=30", Path("/tmp/o"))
    for args, words in (
        (["--budget", "cosine>=1.5"], ["--budget", "can never hold"]),
        (["-t", "nope"], ["--target", "'nope'"]),
        (["-p", "int9"], ["--precision", "int9"]),
        (["-o", str(project)], ["--out", "is a file"]),
    ):
        _assert_clean_failure(CliRunner().invoke(main, ["convert", "-c", str(project), *args]), 2, words)


@ONNX
def nan_model():
    """A model whose own FP32 output is NaN on ordinary inputs (log of a negative number)."""
    import torch

    class LogOfNegative(torch.nn.Module):
        def forward(self, x):
            return torch.log(x - 100.0)

    return LogOfNegative(), (torch.zeros(1, 4),)


@ONNX
def test_non_finite_reference_is_bad_input_not_drift(good_out):
    """NaN from FP32 PyTorch itself would make every comparison fail (exit 6): it is the model's problem."""
    out, digest = good_out
    result = CliRunner().invoke(main, ["convert", "tests.test_bad_options:nan_model", "-t", "onnx", "-o", str(out), "--samples", "2"])
    _assert_clean_failure(result, 3, ["FP32 PyTorch model returns NaN", "output 'output'", "sample 0", "--data"])
    assert tree_digest(out) == digest and not (out / "nan_model").exists()


@ONNX
def test_other_commands_refuse_bad_input_cleanly(tmp_path, good_out):
    bundle = good_out[0] / "tiny_mlp" / "onnx" / "fp32"
    (tmp_path / "folder").mkdir()
    write(tmp_path, "file.txt", "x")
    (tmp_path / "broken").mkdir()
    write(tmp_path / "broken", "manifest.json", "{")
    cases = [
        (["bundle", str(bundle), "-o", str(tmp_path / "folder")], 2, ["--out", "is a folder", "lab.zip"]),
        (["bundle", str(bundle), "-o", str(tmp_path / "file.txt" / "lab.zip")], 2, ["--out", "is a file"]),
        (["report", str(bundle), "--html", str(tmp_path / "folder")], 2, ["--html", "is a folder", "report.html"]),
        (["report", str(bundle), "--markdown", "/proc/edgeq.md"], 2, ["--markdown", "cannot write in /proc"]),
        (["validate", str(tmp_path / "broken")], 3, ["manifest.json", "malformed"]),
        (["validate", str(tmp_path / "folder")], 3, ["not a bundle", "no manifest.json"]),
        (["validate", str(tmp_path / "nothere")], 3, ["nothere"]),
        (["validate", str(tmp_path), "--budget", "cosine>=2"], 2, ["--budget", "can never hold"]),
        (["validate", str(tmp_path), "--budget", ""], 2, ["--budget", "empty budget"]),
        (["bundle", str(tmp_path / "nothere"), "-o", str(tmp_path / "lab.zip")], 3, ["nothere"]),
        (["report", str(tmp_path / "nothere")], 3, ["nothere"]),
        (["targets", "show", "nope"], 2, ["'nope'"]),
    ]
    for args, code, words in cases:
        _assert_clean_failure(CliRunner().invoke(main, args), code, words)
    assert not (tmp_path / "lab.zip").exists() and list((tmp_path / "folder").iterdir()) == []
    assert tree_digest(good_out[0]) == good_out[1]


def test_usage_errors_come_before_torch_loads(tmp_path):
    """Every option case above is answered without importing torch or a toolchain: that is what keeps them
    under a second (4-13 s once torch and the model load)."""
    runnable = [c for c in OPTION_CASES if c[0] not in {"missing-source-file"}]
    code = (
        "import json, sys; from pathlib import Path; from click.testing import CliRunner; from edgeq.cli import main\n"
        "from tests.test_bad_options import _materialize, OPTION_CASES\n"
        f"scratch = Path({str(tmp_path)!r}); (scratch / 'edgeq.toml').write_text(\"[[models]]\\nsource = 'a:b'\\n\")\n"
        "codes = {}\n"
        f"for case, args, expected, _ in [c for c in OPTION_CASES if c[0] in {[c[0] for c in runnable]!r}]:\n"
        "    args = _materialize(args, scratch, scratch)\n"
        "    codes[case] = CliRunner().invoke(main, ['convert', *args, *([] if '-o' in args or not args else ['-o', str(scratch / 'out')])]).exit_code\n"
        "heavy = sorted({'torch', 'onnxruntime', 'coremltools', 'litert_torch', 'transformers'} & set(sys.modules))\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert report["codes"] == {case: expected for case, _, expected, _ in runnable}
