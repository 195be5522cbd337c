"""Target profiles: every shipped profile loads; the loader refuses unknown keys and values, naming them."""

from __future__ import annotations

import pytest

from edgeq.errors import UsageError
from edgeq.targets import Runtime, list_profiles, load_profile
from edgeq.targets.profile import PROFILE_DIR


def test_every_shipped_profile_loads():
    profiles = {p.id: p for p in list_profiles()}
    assert {"onnx", "tflite", "coreml"} <= set(profiles)
    for profile in profiles.values():
        assert profile.default_precision in profile.precisions
        for precision in profile.precisions:
            assert profile.budget_for(precision), f"{profile.id} has no default budget for {precision}"


def test_every_profile_value_has_its_reason():
    """Non-obvious values carry a trailing comment with the reason (STYLE: targets are data)."""
    for path in PROFILE_DIR.glob("*.toml"):
        for line in path.read_text().splitlines():
            if line.startswith(("dynamic_shapes", "opset", "threads", "minimum_deployment_target")):
                assert "#" in line, f"{path.name}: {line!r} needs a reason"


def _write(tmp_path, text: str, name="custom"):
    path = tmp_path / f"{name}.toml"
    base = (
        f'id = "{name}"\nruntime = "onnx"\nhardware = "x"\nsummary = "y"\n'
        'precisions = ["fp32"]\ndefault_precision = "fp32"\n'
    )
    path.write_text(base + text)
    return path


def test_custom_profile_by_path(tmp_path):
    profile = load_profile(_write(tmp_path, "[runtime_options]\nopset = 17\n"))
    assert profile.runtime == Runtime.ONNX and profile.runtime_options["opset"] == 17


@pytest.mark.parametrize(
    "extra, message",
    [
        ("colour = 1\n", "key 'colour': unknown key"),
        ("[runtime_options]\nthreads = 2\n", "key 'runtime_options.threads': unknown for onnx"),
        ("[runtime_options]\nopset = 'x'\n", "runtime_options.opset': expected int"),
        ("[budgets]\nfp32 = 'cosine>0.9'\n", "budgets.fp32"),
    ],
)
def test_strict_loader_names_file_and_key(tmp_path, extra, message):
    path = _write(tmp_path, extra)
    with pytest.raises(UsageError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_bad_enum_value(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('id = "bad"\nruntime = "tensorrt"\nhardware = "x"\nsummary = "y"\nprecisions = ["fp32"]\ndefault_precision = "fp32"\n')
    with pytest.raises(UsageError, match="'tensorrt' is not one of onnx, tflite, coreml"):
        load_profile(path)


def test_unknown_target_lists_known_ones():
    with pytest.raises(UsageError, match="known targets: coreml-ane, coreml-cpu, coreml, onnx-arm64"):
        load_profile("tensorrt")


HARDWARE_PROFILES = [
    "onnx-x86-avx2", "onnx-arm64", "onnx-qnn-htp", "tflite-xnnpack", "tflite-edgetpu", "tflite-gpu", "coreml-ane", "coreml-cpu",
]


def test_the_hardware_profiles_exist():
    assert set(HARDWARE_PROFILES) <= {p.id for p in list_profiles()}


def test_edgetpu_is_full_integer_with_static_shapes():
    profile = load_profile("tflite-edgetpu")
    assert [p.value for p in profile.precisions] == ["w8a8"]
    assert profile.quantization.integer_io and not profile.dynamic_shapes
    assert profile.quantization.activation_dtypes == ("int8",)


def test_quantized_schemes_need_quantization_capabilities(tmp_path):
    path = _write(tmp_path, "")
    path.write_text(path.read_text().replace('precisions = ["fp32"]', 'precisions = ["fp32", "w8a8"]'))
    with pytest.raises(UsageError, match="must state weight_dtypes"):
        load_profile(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("[quantization]\nweight_dtypes = ['int5']\n", "'int5' is not one of"),
        ("[quantization]\nweight_dtypes = ['int8']\ngroup_sizes = [32]\n", "need per_group"),
        ("[quantization]\nweight_granularity = ['per_row']\n", "'per_row' is not one of"),
        ("[quantization]\ndynamic_accuracy_level = 7\n", "not an ORT accuracy_level"),
        ("[quantization]\ndynamic_accuracy_level = true\n", "not an ORT accuracy_level"),
    ],
)
def test_quantization_table_is_strict(tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        load_profile(_write(tmp_path, extra))


def test_onnx_profiles_state_the_accuracy_level_int4_dynamic_deploys_with(tmp_path):
    from edgeq.converters.onnx_lowbit import accuracy_level
    from edgeq.targets import Precision

    for target in ("onnx", "onnx-x86-avx2", "onnx-arm64"):
        profile = load_profile(target)
        assert profile.quantization.dynamic_accuracy_level == 4
        assert accuracy_level(Precision.INT4_DYNAMIC, profile) == 4 and accuracy_level(Precision.INT4_WEIGHT, profile) == 1
    text = (PROFILE_DIR / "onnx.toml").read_text().replace("dynamic_accuracy_level = 4", "dynamic_accuracy_level = 2")
    (tmp_path / "custom.toml").write_text(text.replace('id = "onnx"', 'id = "custom"'))
    assert accuracy_level(Precision.INT4_DYNAMIC, load_profile(tmp_path / "custom.toml")) == 2
