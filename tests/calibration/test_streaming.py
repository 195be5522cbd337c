"""Resource limits: calibration streams its samples (one alive at a time, observer state of fixed size), and a
request whose data cannot fit in memory is refused up front with the option to lower, allocating nothing."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.calibration.memory import MEMORY_LIMIT_VARIABLE, available_memory, check_fits, estimate_need, parse_size
from edgeq.cli import main
from edgeq.errors import UsageError
from edgeq.load import load_model
from edgeq.signature import parse_input_spec
from edgeq.targets import Precision, load_profile
from edgeq.targets.resolve import Calibration, resolve_plan

GIB = 1 << 30


class LazySamples(Sequence):
    """Sample i made when asked (as a loader reading files one by one would), counting the arrays alive at once."""

    def __init__(self, count: int):
        self.count, self.alive, self.peak, self.made = count, 0, 0, 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not 0 <= index < self.count:
            raise IndexError(index)
        array = np.random.default_rng(index).standard_normal((1, 32)).astype(np.float32)
        self.alive, self.made = self.alive + 1, self.made + 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(array, self._freed)
        return {"x": array}

    def _freed(self) -> None:
        self.alive -= 1


@pytest.fixture(scope="module")
def outlier_model():
    return load_model("tests.calibration.test_quantize:OutlierMLP", inputs=[parse_input_spec("x:1x32:float32")])


@pytest.mark.parametrize("target", ["onnx", "tflite"])  # tflite: full-integer, observes outputs and tensor points too
def test_calibration_holds_one_sample_at_a_time_and_matches_a_list(outlier_model, target):
    lazy = LazySamples(48)
    # SmoothQuant maxima, mse histograms and bias correction: every pass of a w8a8 plan
    plan = resolve_plan(outlier_model.module, load_profile(target), Precision.W8A8, [], outlier_model.example_inputs, Calibration(lazy, ["x"]))
    # three passes, each holding its current sample and the one it replaces, and one forward on the first sample
    # to find the linears that read the same tensor (they share SmoothQuant factors)
    assert lazy.made == 3 * 48 + 1 and lazy.peak <= 2
    listed = resolve_plan(
        outlier_model.module, load_profile(target), Precision.W8A8, [], outlier_model.example_inputs, Calibration(list(LazySamples(48)), ["x"])
    )
    for fqn, layer in plan.layers.items():
        assert layer.activation.scale == listed.layers[fqn].activation.scale
        assert int(layer.activation.zero_point) == int(listed.layers[fqn].activation.zero_point)


def test_a_request_that_cannot_fit_names_the_option_and_a_count_that_fits():
    need = estimate_need(input_bytes=3 * 224 * 224 * 4, output_bytes=1000 * 4, model_bytes=100 << 20)
    room = (8 * GIB, "a test's limit")
    with pytest.raises(UsageError, match=r"8\.0 GiB is available \(a test's limit\); lower --calibration-samples to at most (\d+)") as error:
        check_fits(need, 32, 1_000_000, room)
    fits = int(error.value.args[0].rsplit(" ", 1)[1])
    check_fits(need, 32, fits, room)
    with pytest.raises(UsageError):
        check_fits(need, 32, fits + 1, room)
    with pytest.raises(UsageError, match="lower --samples to at most"):
        check_fits(need, 1_000_000, 0, room)
    with pytest.raises(UsageError, match="even one sample does not fit"):
        check_fits(need, 1, 0, (need.fixed, "a test's limit"))


def test_the_limit_variable_caps_what_is_available(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_VARIABLE, "3G")
    room, source = available_memory()
    assert room < 3 * GIB and MEMORY_LIMIT_VARIABLE in source  # less this process's resident size
    assert parse_size("512M", "x") == 512 << 20 and parse_size("1.5GiB", "x") == 3 * GIB // 2 and parse_size("4096", "x") == 4096
    monkeypatch.setenv(MEMORY_LIMIT_VARIABLE, "lots")
    with pytest.raises(UsageError, match=f"{MEMORY_LIMIT_VARIABLE}='lots': expected a size"):
        available_memory()


def test_convert_refuses_an_impossible_calibration_count_before_loading_data(tmp_path):
    # 10**12 samples of 64 bytes: 64 TB. Synthesizing them would run out of memory; the check comes first.
    result = CliRunner().invoke(
        main, ["convert", "edgeq.examples:tiny_mlp", "-t", "onnx", "-p", "w8a8", "--samples", "2",
               "--calibration-samples", str(10**12), "-o", str(tmp_path)],
    )
    assert result.exit_code == 2, result.output
    assert "lower --calibration-samples to at most" in result.output and "Traceback" not in result.output
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")]  # no bundle, no golden (a lock file aside)
