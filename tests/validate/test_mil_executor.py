"""edgeq's MIL reference executor (edgeq.validate.mil) against PyTorch, the plan and coremltools' own reader.

Real coremltools conversions, no mocks. The executor runs the stored ML program in numpy on any OS.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.load import load_model
from edgeq.targets import Precision, load_profile
from edgeq.validate.verdict import Verdict
from tests.conftest import COREML
from tests.helpers import convert_source

pytestmark = COREML

SOURCES = [
    "edgeq.examples:tiny_convnet",
    "edgeq.examples:tiny_mlp",
    "tests.converters.models:recurrent",
    "tests.converters.models:prelu",
    "tests.converters.models:stateless_cell",
    "tests.converters.models:sequence_lstm",
    "tests.converters.models:new_ones",
    "tests.converters.models:edge_convnet",
    "tests.converters.test_coreml_quantized:token_classifier",
    "tests.converters.models:masked_mean_pool",  # sentence-embedding pooling (MiniLM --task sentence-embedding)
]
# Measured on these models: FP32 138 to 144 dB (or exact), FP16 64 to 71 dB. The FP32 floor sits where a wrong
# mode would land (GELU as tanh, layer_norm without epsilon: 60 to 110 dB); the FP16 band is bounded above too,
# so an fp16 program computed without fp16 (weights, activations) cannot pass for one.
FLOOR_DB = {"fp32": 120.0, "fp16": 55.0}
CEILING_DB = {"fp32": float("inf"), "fp16": 85.0}


def _convert(source: str, precision: str, path):
    from edgeq.converters.base import ConversionRequest
    from edgeq.converters.coreml import CoreMLConverter

    model = load_model(source)
    request = ConversionRequest(model, load_profile("coreml"), Precision(precision))
    return model, CoreMLConverter().convert(request, path / "model.mlpackage").path


def _samples(model, count: int = 3) -> list[tuple[torch.Tensor, ...]]:
    """The example inputs and seeded variations of them (float: noise; integer: the example's values shuffled)."""
    generator = torch.Generator().manual_seed(0)
    samples = [tuple(model.example_inputs)]
    for _ in range(count - 1):
        samples.append(
            tuple(
                torch.randn(t.shape, generator=generator) if t.is_floating_point()
                else t.flatten()[torch.randperm(t.numel(), generator=generator)].reshape(t.shape)
                for t in model.example_inputs
            )
        )
    return samples


def _sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    noise = np.sum((reference - candidate) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(reference**2) / noise))


def _executor_vs_torch(model, path) -> dict[str, float]:
    from edgeq.validate.mil import MILExecutor

    executor = MILExecutor(path)
    declared = dict(executor.function.inputs)
    references, candidates = {}, {}
    for sample in _samples(model):
        with torch.no_grad():
            expected = model.module(*sample)
        feeds = {name: t.numpy().astype(declared[name].numpy) for name, t in zip(model.input_names, sample)}
        got = executor.run(feeds)
        for name, value in zip(model.outputs, expected):
            references.setdefault(name, []).append(value.numpy())
            candidates.setdefault(name, []).append(got[name])
    return {name: _sqnr_db(np.stack(references[name]), np.stack(candidates[name])) for name in references}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("source", SOURCES)
def test_executor_reproduces_pytorch(tmp_path, source, precision):
    model, path = _convert(source, precision, tmp_path)
    sqnr = _executor_vs_torch(model, path)
    print(f"{source} {precision}: " + ", ".join(f"{name} {db:.1f} dB" for name, db in sqnr.items()))
    assert all(FLOOR_DB[precision] <= db <= CEILING_DB[precision] for db in sqnr.values()), sqnr


def test_colliding_output_names_fp32(tmp_path):
    """An output named like an internal value ('linear'): the converter frees the name before renaming."""
    model, path = _convert("tests.converters.models:colliding_names", "fp32", tmp_path)
    assert min(_executor_vs_torch(model, path).values()) >= FLOOR_DB["fp32"]


def test_colliding_output_names_fp16(tmp_path):
    model, path = _convert("tests.converters.models:colliding_names", "fp16", tmp_path)
    assert all(FLOOR_DB["fp16"] <= db <= CEILING_DB["fp16"] for db in _executor_vs_torch(model, path).values())


def test_a_value_defined_twice_is_refused(tmp_path):
    """coremltools renames a feature without checking: renamed onto an internal value, the program defines it
    twice, and ops reading it would read the wrong one. The executor refuses such a program."""
    import coremltools as ct

    from edgeq.validate.mil import MILError, MILExecutor

    _, path = _convert("tests.converters.models:colliding_names", "fp32", tmp_path)
    model = ct.models.MLModel(str(path))
    spec = model.get_spec()
    ct.utils.rename_feature(spec, "add", "linear_value")
    broken = tmp_path / "broken.mlpackage"
    ct.models.MLModel(spec, weights_dir=model.weights_dir).save(str(broken))
    with pytest.raises(MILError, match="defines value 'linear_value' twice"):
        MILExecutor(broken)


def test_constants_match_coremltools_reader(tmp_path):
    """edgeq's protobuf + blob reader gives every const exactly as coremltools' own MIL loader does."""
    from edgeq.converters.parity_coreml import load_program, operations
    from edgeq.validate.mil import read_program

    _, path = _convert("edgeq.examples:tiny_convnet", "fp16", tmp_path)
    ours = {op.name: op.constant("val") for op in read_program(path).operations() if op.type == "const"}
    theirs = {op.name: op.outputs[0].val for op in operations(load_program(path)) if op.op_type == "const"}
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, value in ours.items():
        if isinstance(value, str):
            assert value == theirs[name]
        else:
            expected = np.asarray(theirs[name])
            assert value.dtype == expected.dtype and value.shape == expected.shape, name
            np.testing.assert_array_equal(value, expected, err_msg=name)


@pytest.mark.parametrize("precision", ["int8-weight", "w8a8"])
@pytest.mark.parametrize("source", ["edgeq.examples:tiny_convnet", "tests.converters.test_coreml_quantized:token_classifier"])
def test_quantized_weights_are_the_plans_and_outputs_close_to_pytorch(tmp_path, source, precision):
    """Each constexpr op's output, as the executor materializes it, is the plan's dequantized weight: exactly
    (codes - zero point) * scale, in float32 and rounded once to the op's declared float16."""
    from edgeq.converters.parity_coreml import fqn_of
    from edgeq.plan import QuantPlan
    from edgeq.validate.mil import MILExecutor

    outcome = convert_source(source, "coreml", precision, tmp_path)
    assert outcome.verdict == Verdict.PASSED, outcome.error or outcome.violations
    assert outcome.report.executor.startswith("edgeq MIL reference executor")
    (drift,) = outcome.report.outputs
    print(f"{source} {precision}: SQNR {drift.sqnr_db:.1f} dB, cosine {drift.cosine:.7f} against FP32 PyTorch")
    assert drift.cosine >= 0.999 and drift.sqnr_db >= 35

    plan = QuantPlan.load(outcome.path)
    executor = MILExecutor(outcome.path / "model.mlpackage")
    checked = set()
    for op in executor.function.ops:
        if not op.type.startswith("constexpr_"):
            continue
        fqn = fqn_of(op.name)[0].removesuffix(".weight").removeprefix("inner.")
        layer = plan.layers[fqn]
        (name, vtype), = op.outputs
        planned = layer.weight.dequantize(layer.weight_codes)  # float32 (codes - zero) * scale
        got = executor.constant(name)
        assert got.dtype == np.float16 == vtype.numpy
        np.testing.assert_array_equal(got, planned.astype(np.float16), err_msg=fqn)
        np.testing.assert_allclose(got.astype(np.float32), planned, rtol=2**-11, atol=0, err_msg=fqn)
        checked.add(fqn)
    assert checked == {fqn for fqn, layer in plan.layers.items() if layer.weight is not None}


def _mil_model(tmp_path, build, target):
    """Save a hand-built MIL program (coremltools' builder) as an .mlpackage."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    program = mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=target)(build)
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=target, compute_precision=ct.precision.FLOAT32)
    path = tmp_path / "model.mlpackage"
    model.save(str(path))
    return path


def test_unsupported_op_is_named(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from edgeq.validate.check import run_artifact
    from edgeq.validate.mil import MILExecutor, UnsupportedOp

    # sliding_windows: an op no torch model edgeq converts has produced, so the executor leaves it out
    path = _mil_model(tmp_path, lambda x: mb.sliding_windows(x=mb.relu(x=x), axis=1, size=2, name="the_sine"), ct.target.iOS17)
    with pytest.raises(UnsupportedOp, match=r"MIL op 'sliding_windows' \(named 'the_sine'\) is not supported"):
        MILExecutor(path)
    # through the runner: coremltools reads the spec, the executor refuses the op -> status error, op named
    sample = {"x": np.ones((1, 4), np.float32)}
    run = run_artifact(path, "coreml", {}, [sample], [{"the_sine": np.sin(sample["x"])}], ["the_sine"])
    assert run.report.status == "error"
    assert "'sliding_windows'" in run.report.reason and "the_sine" in run.report.reason
    assert run.signature[0].name == "x"


def test_blockwise_shift_scale(tmp_path):
    """iOS18's constexpr_blockwise_shift_scale: scale * (data - offset), scale and offset repeated over blocks."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    from edgeq.validate.mil import MILExecutor

    rng = np.random.default_rng(0)
    data = rng.integers(-128, 128, (6, 4)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (6, 2)).astype(np.float32)  # blocks of 2 along the input axis
    offset = rng.integers(-3, 3, (6, 2)).astype(np.int8)

    def build(x):
        weight = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset, name="w")
        return mb.linear(x=x, weight=weight, name="y")

    path = _mil_model(tmp_path, build, ct.target.iOS18)
    executor = MILExecutor(path)
    expected = (data.astype(np.float32) - np.repeat(offset, 2, axis=1)) * np.repeat(scale, 2, axis=1)
    weights = [op.outputs[0][0] for op in executor.function.ops if op.type == "constexpr_blockwise_shift_scale"]
    assert len(weights) == 1
    np.testing.assert_array_equal(executor.constant(weights[0]), expected)
    x = rng.standard_normal((1, 4)).astype(np.float32)
    np.testing.assert_allclose(executor.run({"x": x})["y"], x @ expected.T, rtol=1e-6, atol=1e-6)


def test_runner_executor_setting(tmp_path):
    """`executor="reference"` runs edgeq's executor on any OS; `executor="coreml"` asks for Apple's runtime only."""
    import platform

    from edgeq.validate.runners import NotExecutable, RunnerError, open_runner

    model, path = _convert("edgeq.examples:tiny_mlp", "fp32", tmp_path)
    feeds = {"x": model.example_inputs[0].numpy()}
    reference = open_runner(path, "coreml", executor="reference")
    assert reference.executor.startswith("edgeq MIL reference executor (numpy, fp32)")
    with torch.no_grad():
        expected = model.module(*model.example_inputs)[0].numpy()
    assert _sqnr_db(expected, reference.run(feeds)[model.outputs[0]]) >= FLOOR_DB["fp32"]
    if platform.system() != "Darwin":
        apple = open_runner(path, "coreml", executor="coreml", compute_units="CPU_AND_NE")
        with pytest.raises(NotExecutable, match="only on macOS"):
            apple.run(feeds)
    with pytest.raises(RunnerError, match="compute_units 'NPU'"):
        open_runner(path, "coreml", compute_units="NPU")
