"""Per-layer schemes (`per_layer` in edgeq.toml, `--per-layer` on the command line): parsed and checked before
torch loads, matched against the model's layers, checked against the target, and recorded in mixed low-bit
plans (int8 / int4 / int3 / float layers side by side, each with the entry that decided it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgeq.cli import main
from edgeq.errors import ConversionError, UsageError
from edgeq.layer_overrides import decide, parse_per_layer
from edgeq.project import command_line_job, load_project

PROJECT = """
[defaults]
targets = ["onnx"]
precisions = ["int4-weight"]

[defaults.per_layer]
"*" = "int4"
"*.intermediate.dense" = "int3-weight:g32"

[[models]]
source = "edgeq.examples:tiny_mlp"

[[models]]
source = "edgeq.examples:tiny_mlp"
name = "second"

[models.per_layer]
"re:attention\\\\..*" = "int4:g64:rtn"
"classifier" = "float"
"""


def test_per_layer_from_the_project_file_and_the_command_line(tmp_path):
    path = tmp_path / "edgeq.toml"
    path.write_text(PROJECT)
    first, second = load_project(path)
    entries = first.quantize.layer_overrides
    assert [(e.pattern, e.kind, e.bits, e.group_size, e.group_given) for e in entries] == [
        ("*", "int", 4, None, False), ("*.intermediate.dense", "int", 3, 32, True)]
    assert entries[0].origin == f"{path}: defaults.per_layer"
    # a [[models]] entry's table replaces [defaults]' (as every key does)
    assert [(e.pattern, e.value, e.algorithm) for e in second.quantize.layer_overrides] == [
        ("re:attention\\..*", "int4:g64:rtn", "rtn"), ("classifier", "float", None)]
    assert second.quantize.layer_overrides[0].origin == f"{path}: models[1].per_layer"

    job = command_line_job({"source": "edgeq.examples:tiny_mlp", "per_layer": ["*=int4", "classifier=float", "re:a=b=int8"]})
    assert [(e.pattern, e.kind, e.origin) for e in job.quantize.layer_overrides] == [
        ("*", "int", "--per-layer"), ("classifier", "float", "--per-layer"), ("re:a=b", "int", "--per-layer")]


def test_the_last_matching_entry_decides_and_globs_cross_dots():
    entries = parse_per_layer({"*": "int4", "encoder.*.intermediate.dense": "int3", "encoder.layer.1.*": "float"}, "--per-layer")
    assert decide(entries, "encoder.layer.0.intermediate.dense").bits == 3
    assert decide(entries, "encoder.layer.1.intermediate.dense").kind == "float"
    assert decide(entries, "pooler.dense").bits == 4
    assert decide(parse_per_layer({"encoder.layer.0.query": "int8"}, "x"), "encoder.layer.0.query.x") is None  # exact


@pytest.mark.parametrize(
    "value, words",
    [
        ("int5", "'int5' is not a layer scheme; expected float, int8, int4"),
        ("int4-dynamic", "activations follow the model's scheme"),
        ("int4:g0", "option 'g0'"),
        ("int4:kmeans", "option 'kmeans'"),
        ("int8:awq", "int8 layers are per output channel"),
        ("int8:g32", "int8 layers are per output channel"),
        ("float:g32", "'float' takes no options"),
        ("lut5", "'lut5' is not a layer scheme"),
    ],
)
def test_bad_values_are_refused_naming_the_entry(value, words):
    with pytest.raises(UsageError, match=words):
        parse_per_layer({"classifier": value}, "edgeq.toml: defaults.per_layer")
    with pytest.raises(UsageError, match="edgeq.toml: defaults.per_layer 'classifier'"):
        parse_per_layer({"classifier": value}, "edgeq.toml: defaults.per_layer")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--per-layer", "classifier=int5"], "error: --per-layer 'classifier': 'int5' is not a layer scheme"),
        (["--per-layer", "classifier"], "error: --per-layer: 'classifier': expected PATTERN=VALUE"),
        (["--per-layer", "re:(=int4"], "error: --per-layer 're:(': not a valid regular expression"),
    ],
)
def test_bad_command_line_entries_exit_2_before_any_work(tmp_path, args, words):
    result = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_mlp", "-o", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output


def test_bad_project_entries_exit_2_naming_file_and_key(tmp_path):
    path = tmp_path / "edgeq.toml"
    path.write_text('[[models]]\nsource = "edgeq.examples:tiny_mlp"\n[models.per_layer]\n"layers.0" = "int9"\n')
    result = CliRunner().invoke(main, ["convert", "-c", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: {path}: models[0].per_layer 'layers.0': 'int9' is not a layer scheme" in result.output
    path.write_text('[[models]]\nsource = "edgeq.examples:tiny_mlp"\nper_layer = "int4"\n')
    result = CliRunner().invoke(main, ["convert", "-c", str(path)])
    assert result.exit_code == 2 and "models[0].per_layer: 'int4' is not valid; expected a table of layer patterns" in result.output


def test_a_pattern_naming_no_layer_exits_2_with_the_layers(tmp_path):
    """Checked when the plan is made, before calibration: the model's layers are needed to know."""
    result = CliRunner().invoke(main, [
        "convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "int4-weight", "--group-size", "16", "--algo", "rtn",
        "--samples", "2", "--calibration-samples", "2", "-o", str(tmp_path), "--per-layer", "layers.*=int4", "--per-layer", "layer.3=float",
    ])
    assert result.exit_code == 2, result.output
    assert "error: --per-layer 'layer.3': names none of the model's quantizable layers; they are e.g. layers.3" in result.output
    assert "Traceback" not in result.output


# ---- mixed plans ------------------------------------------------------------------------------------------


class Layer(nn.Module):
    """A BERT-like encoder layer, small: attention.query/value, intermediate.dense, output.dense."""

    def __init__(self):
        super().__init__()
        self.attention = nn.ModuleDict({"query": nn.Linear(64, 64), "value": nn.Linear(64, 64)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(64, 128)})
        self.output = nn.ModuleDict({"dense": nn.Linear(128, 64)})

    def forward(self, x):
        x = x + self.attention["query"](x) * torch.sigmoid(self.attention["value"](x))
        return x + self.output["dense"](torch.relu(self.intermediate["dense"](x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([Layer()])})
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.encoder["layer"][0](x))


def block():
    torch.manual_seed(0)
    return Block(), (torch.randn(4, 64),)


@pytest.fixture(scope="module")
def model():
    from edgeq.load import load_model

    return load_model("tests.test_layer_overrides:block")


def samples(count=8):
    generator = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(4, 64, generator=generator).numpy()} for _ in range(count)]


def plan_for(model, target, per_layer, precision="int4-weight", keep=(), **options):
    from edgeq.quantize import QuantizeOptions, quantization_plan
    from edgeq.targets import Precision, load_profile
    from edgeq.validate.budget import parse_budget

    options = QuantizeOptions(layer_overrides=parse_per_layer(per_layer, "--per-layer"), **options)
    _, plan, _ = quantization_plan(model, load_profile(target), Precision(precision), options, list(keep), samples(), parse_budget(None))
    return plan


MIXED = {"*": "int4", "*.attention.*": "int8", "*.intermediate.dense": "int3:g64:rtn", "classifier": "float"}


def test_a_mixed_plan_holds_int8_int4_int3_and_float_layers_each_with_its_entry(model, tmp_path):
    from edgeq.plan import PerChannel, PerGroup, QuantPlan

    plan = plan_for(model, "onnx", MIXED)
    layers = plan.layers
    for fqn in ("encoder.layer.0.attention.query", "encoder.layer.0.attention.value"):
        assert layers[fqn].weight.dtype == "int8" and layers[fqn].weight.granularity == PerChannel(0)
        assert np.abs(layers[fqn].weight_codes).max() <= 127 and layers[fqn].dynamic_activation is None  # ONNX: weight-only int8
        assert layers[fqn].reason == "int8 per channel by per_layer '*.attention.*' = 'int8' (--per-layer)"
    up = layers["encoder.layer.0.intermediate.dense"]
    assert up.weight.dtype == "int3" and up.weight.granularity == PerGroup(1, 64) and up.weight_codes.min() >= -4
    assert up.reason == "int3 group 64 by per_layer '*.intermediate.dense' = 'int3:g64:rtn' (--per-layer)"
    down = layers["encoder.layer.0.output.dense"]
    assert down.weight.dtype == "int4" and down.weight.granularity == PerGroup(1, 32)  # the model's options fill the rest
    assert down.reason == "int4 group 32 by per_layer '*' = 'int4' (--per-layer)"
    assert layers["classifier"].is_float and layers["classifier"].reason == "kept float by per_layer 'classifier' = 'float' (--per-layer)"
    notes = " ".join(plan.notes)
    assert "3-bit symmetric weights, group 64, scales in float32, by rtn (MSE clipping) (1 layers)" in notes
    assert "4-bit symmetric weights, group 32, scales in float32, by gptq" in notes
    # int8 codes are exactly per-channel round to nearest of the FP32 weight (as in an int8-weight plan)
    weight = dict(model.module.named_modules())["inner.encoder.layer.0.attention.query"].weight.detach().numpy()
    assert np.allclose(layers["encoder.layer.0.attention.query"].weight.dequantize(layers["encoder.layer.0.attention.query"].weight_codes), weight,
                       atol=float(layers["encoder.layer.0.attention.query"].weight.scale.max()) / 2 + 1e-7)
    plan.save(tmp_path)
    again = QuantPlan.load(tmp_path)
    assert again.layers["encoder.layer.0.intermediate.dense"].reason == up.reason and np.array_equal(again.layers["encoder.layer.0.attention.query"].weight_codes,
                                                                                  layers["encoder.layer.0.attention.query"].weight_codes)


def test_keep_float_wins_over_entries_in_low_bit_plans(model):
    plan = plan_for(model, "onnx", {"*": "int3"}, keep=["re:.*attention\\..*"], algorithm="rtn")
    assert plan.layers["encoder.layer.0.attention.query"].reason == "kept float: --keep-float re:.*attention\\..*"
    assert plan.layers["encoder.layer.0.intermediate.dense"].weight.dtype == "int3"


def test_keep_float_alone_in_a_low_bit_plan(model):
    plan = plan_for(model, "onnx", {}, keep=["classifier"], algorithm="rtn")
    assert plan.layers["classifier"].is_float and plan.layers["classifier"].reason == "kept float: --keep-float classifier"
    assert all(plan.layers[f].weight.dtype == "int4" for f in ("encoder.layer.0.attention.query", "encoder.layer.0.output.dense"))


def test_int8_entries_on_tflite_run_the_hybrid_kernel(model):
    plan = plan_for(model, "tflite", {"*.attention.*": "int8"}, precision="int4-dynamic", algorithm="rtn")
    query = plan.layers["encoder.layer.0.attention.query"]
    assert query.weight.dtype == "int8" and query.dynamic_activation == "int8"
    assert plan.layers["encoder.layer.0.output.dense"].weight.dtype == "int4" and plan.layers["encoder.layer.0.output.dense"].dynamic_activation == "int8"


@pytest.mark.parametrize(
    "target, precision, per_layer, error, words",
    [
        ("tflite", "int4-dynamic", {"*.intermediate.dense": "int3"}, ConversionError,
         "target tflite: per_layer '*.intermediate.dense' = 'int3' (--per-layer), for encoder.layer.0.intermediate.dense: does not hold int3 weights"),
        ("tflite", "int4-dynamic", {"*.intermediate.dense": "int3"}, ConversionError, "it holds int8, int4; give one of those or float"),
        ("onnx", "int4-weight", {"classifier": "int4:g48"}, ConversionError, "for classifier: group size 48 is not one it runs"),
        ("coreml-ane", "lut4-weight", {"classifier": "int4"}, ConversionError, "does not hold int4 weights"),
        ("onnx", "int4-weight", {"encoder.layer.0.attention.key": "int8"}, UsageError,
         "--per-layer 'encoder.layer.0.attention.key': names none of the model's quantizable layers; they are e.g. encoder.layer.0.attention.query"),
    ],
)
def test_entries_the_target_cannot_hold_are_refused_naming_the_layer(model, target, precision, per_layer, error, words):
    with pytest.raises(error, match=words.replace("(", "\\(").replace(")", "\\)").replace("*", "\\*")):
        plan_for(model, target, per_layer, precision=precision, algorithm="rtn")


def test_palette_and_affine_layers_in_one_core_ml_plan(model):
    plan = plan_for(model, "coreml", {"classifier": "lut4", "*.attention.*": "int8"}, algorithm="rtn")
    assert plan.layers["classifier"].palette.shape == (1, 16) and plan.layers["classifier"].weight is None
    assert "4-bit palette by per_layer 'classifier' = 'lut4'" in plan.layers["classifier"].reason
    assert plan.layers["encoder.layer.0.output.dense"].weight.dtype == "int4"
    assert plan.layers["encoder.layer.0.attention.query"].weight.dtype == "int8"
    assert np.array_equal(plan.layers["encoder.layer.0.attention.query"].weight.scale.astype(np.float16).astype(np.float32),
                          plan.layers["encoder.layer.0.attention.query"].weight.scale)  # Core ML keeps int8 scales in fp16 too


class Embedded(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.ModuleDict({"word_embeddings": nn.Embedding(100, 64), "position_embeddings": nn.Embedding(8, 64)})
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([Layer()])})

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        x = self.embeddings["word_embeddings"](input_ids) + self.embeddings["position_embeddings"](positions)
        return self.encoder["layer"][0](x)


def embedded():
    torch.manual_seed(0)
    return Embedded(), (torch.randint(0, 100, (2, 8)),)


def test_entries_on_embedding_tables(tmp_path):
    """Tables take int8 rows, float, or low bits (planned by targets/resolve_embeddings.py with the entry's group)."""
    from edgeq.load import load_model
    from edgeq.quantize import QuantizeOptions, quantization_plan
    from edgeq.targets import Precision, load_profile
    from edgeq.validate.budget import parse_budget

    model = load_model("tests.test_layer_overrides:embedded")
    generator = torch.Generator().manual_seed(2)
    ids = [{"input_ids": torch.randint(0, 100, (2, 8), generator=generator).numpy()} for _ in range(4)]
    entries = parse_per_layer({"embeddings.word_embeddings": "int8", "embeddings.position_embeddings": "int4:g64"}, "--per-layer")
    options = QuantizeOptions(algorithm="rtn", layer_overrides=entries)
    plan = quantization_plan(model, load_profile("onnx"), Precision.INT4_WEIGHT, options, [], ids, parse_budget(None))[1]
    words, positions = plan.layers["embeddings.word_embeddings"], plan.layers["embeddings.position_embeddings"]
    assert words.weight.dtype == "int8" and words.weight.scale.shape == (100,)  # one scale per row (token)
    assert words.reason == "int8 per channel by per_layer 'embeddings.word_embeddings' = 'int8' (--per-layer)"
    assert positions.weight.dtype == "int4" and positions.weight.granularity.size == 64
    floats = parse_per_layer({"embeddings.*": "float"}, "--per-layer")
    plan = quantization_plan(model, load_profile("onnx"), Precision.INT4_WEIGHT, QuantizeOptions(algorithm="rtn", layer_overrides=floats),
                             [], ids, parse_budget(None))[1]
    assert plan.layers["embeddings.word_embeddings"].is_float and plan.layers["encoder.layer.0.output.dense"].weight.dtype == "int4"


def test_int8_schemes_take_float_entries_and_note_the_low_bit_ones(model):
    plan = plan_for(model, "onnx", {"*": "int4", "classifier": "float"}, precision="int8-weight")
    assert plan.layers["classifier"].reason == "kept float by per_layer 'classifier' = 'float' (--per-layer)"
    assert plan.layers["encoder.layer.0.output.dense"].weight.dtype == "int8"
    assert any("'*' = 'int4' (--per-layer): low-bit values apply to low-bit schemes" in note for note in plan.notes)
