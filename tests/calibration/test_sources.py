"""Data sources for validation and calibration: array folders, images with a declared preprocessing, WAV
windows, a Python callable, and the record of each that the manifest keeps. Every file is written here."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgeq.calibration.data import load_samples
from edgeq.calibration.sources.images import ImagePreprocess, parse_preprocess
from edgeq.cli import main
from edgeq.errors import SourceError, UsageError
from edgeq.project import load_project
from edgeq.signature import parse_input_spec
from tests.conftest import ONNX

RGB = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5  # distinct values per pixel and channel


def specs(*texts: str):
    return [parse_input_spec(text) for text in texts]


def load(inputs, data, **options):
    return load_samples(inputs, {}, data=data, **options)


def write_image(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_wav(path: Path, values: np.ndarray, rate: int = 16000, width: int = 2) -> Path:
    """`values`: integer PCM codes, (frames,) or (frames, channels); 8-bit codes are unsigned."""
    values = values.reshape(len(values), -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(values.shape[1])
        handle.setsampwidth(width)
        handle.setframerate(rate)
        handle.writeframes(values.astype({1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes())
    return path


# --- preprocessing ------------------------------------------------------------------------------------------


def test_crop_normalize_and_nchw_layout_are_exact(tmp_path):
    path = write_image(tmp_path / "a.png", RGB)
    loaded = load(specs("pixels:1x3x2x2"), path, preprocess="crop=2,mean=0.5/0.25/0,std=0.5/0.25/1,layout=nchw")
    (sample,) = loaded.samples
    mean, std = np.array([0.5, 0.25, 0.0]), np.array([0.5, 0.25, 1.0])
    expected = ((RGB[1:3, 1:3].astype(np.float64) / 255 - mean) / std).transpose(2, 0, 1)[None]  # centre rows/cols 1-2
    np.testing.assert_array_equal(sample["pixels"], expected.astype(np.float32))
    assert loaded.preprocess == {
        "resize": None, "crop": [2, 2], "mean": [0.5, 0.25, 0.0], "std": [0.5, 0.25, 1.0], "scale": 1 / 255,
        "layout": "nchw", "channels": "rgb", "interpolation": "bilinear", "declared": True,
    }


def test_shorter_side_resize_bgr_and_nhwc_are_exact(tmp_path):
    wide = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)  # 4 high, 8 wide
    path = write_image(tmp_path / "wide.png", wide)
    (sample,) = load(
        specs("image:1x2x2x3"), path, preprocess="resize=2,crop=2,scale=1,layout=nhwc,channels=bgr,interpolation=nearest"
    ).samples
    # Shorter side 4 -> 2 makes 2x4 (nearest keeps rows 1, 3 and columns 1, 3, 5, 7); the centre crop keeps
    # columns 3 and 5; bgr reverses the channels.
    expected = wide[[1, 3]][:, [3, 5]][:, :, ::-1].astype(np.float32)[None]
    np.testing.assert_array_equal(sample["image"], expected)


def test_gray_channel(tmp_path):
    path = write_image(tmp_path / "g.png", RGB)
    (sample,) = load(specs("x:1x1x4x4"), path, preprocess="channels=gray,scale=1").samples
    np.testing.assert_array_equal(sample["x"][0, 0], np.asarray(Image.fromarray(RGB).convert("L"), dtype=np.float32))


def test_default_preprocessing_fits_the_input_and_says_so(tmp_path):
    photo = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)  # 6 high, 8 wide
    write_image(tmp_path / "img" / "p.png", photo)
    loaded = load(specs("pixels:1x3x4x4"), tmp_path / "img")
    # Defaults: shorter side to 4 (8x6 -> 5x4, bilinear), centre crop 4x4 (left = round(0.5) = 0), scale 1/255.
    resized = np.asarray(Image.fromarray(photo).resize((5, 4), Image.Resampling.BILINEAR), dtype=np.float64)
    expected = (resized[:, 0:4] / 255).transpose(2, 0, 1)[None].astype(np.float32)
    np.testing.assert_array_equal(loaded.samples[0]["pixels"], expected)
    assert loaded.preprocess["declared"] is False and loaded.preprocess["resize"] == 4 and loaded.preprocess["crop"] == [4, 4]
    assert any("no --preprocess declared" in note for note in loaded.notes)

    nhwc = load(specs("pixels:1x4x4x3"), tmp_path / "img")
    assert nhwc.preprocess["layout"] == "nhwc"
    np.testing.assert_array_equal(nhwc.samples[0]["pixels"], expected.transpose(0, 2, 3, 1))


def test_preprocess_strings_parse_strictly():
    declared = parse_preprocess("resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw")
    assert declared == ImagePreprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert parse_preprocess(str(declared)) == declared
    assert parse_preprocess("crop=224x320,scale=1").crop == (224, 320)
    for text, words in [
        ("size=224", ["unknown key 'size'", "resize, crop"]),
        ("layout=chw", ["layout='chw'", "nchw or nhwc"]),
        ("resize=big", ["resize='big'", "positive size"]),
        ("mean=0.5/0.5", ["mean has 2 values", "1 or 3"]),
        ("crop", ["not key=value"]),
        ("std=0", ["non-zero"]),
        ("resize=2,resize=3", ["given twice"]),
    ]:
        with pytest.raises(UsageError) as error:
            parse_preprocess(text)
        assert all(word in str(error.value) for word in words), str(error.value)


# --- image folders ------------------------------------------------------------------------------------------


def test_image_folder_is_recursive_sorted_and_seeded(tmp_path):
    for i in range(5):
        write_image(tmp_path / "imgs" / f"class{i % 2}" / f"{i}.png", np.full((4, 4, 3), 10 * i, np.uint8))
    write_image(tmp_path / "imgs" / "class1" / "photo.jpg", np.full((4, 4, 3), 200, np.uint8))
    (tmp_path / "imgs" / "labels.txt").write_text("ignored\n")
    inputs = specs("x:1x3x4x4")
    everything = load(inputs, tmp_path / "imgs", preprocess="scale=1")
    assert everything.found == 6 and len(everything.samples) == 6
    firsts = [float(s["x"][0, 0, 0, 0]) for s in everything.samples]
    assert firsts[:5] == [0.0, 20.0, 40.0, 10.0, 30.0]  # class0/0 2 4, class1/1 3, then class1/photo.jpg
    assert abs(firsts[5] - 200) <= 2  # JPEG is lossy
    assert any("1 file(s) of other kinds" in note for note in everything.notes)

    picked = load(inputs, tmp_path / "imgs", preprocess="scale=1", count=3, seed=7)
    again = load(inputs, tmp_path / "imgs", preprocess="scale=1", count=3, seed=7)
    chosen = [float(s["x"][0, 0, 0, 0]) for s in picked.samples]
    assert chosen == [float(s["x"][0, 0, 0, 0]) for s in again.samples]
    assert len(chosen) == 3 and chosen == [f for f in firsts if f in chosen]  # kept in folder order


def test_image_errors_name_the_file_and_what_would_work(tmp_path):
    inputs = specs("x:1x3x4x4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no .npz, .npy"):
        load(inputs, tmp_path / "empty")

    write_image(tmp_path / "mixed" / "a.png", RGB)
    np.save(tmp_path / "mixed" / "b.npy", np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(SourceError, match=r"mixes kinds of data .*a\.png.*b\.npy"):
        load(inputs, tmp_path / "mixed")

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SourceError, match=r"bad\.png: not a readable image"):
        load(inputs, tmp_path / "broken")

    big = write_image(tmp_path / "big.png", np.zeros((6, 6, 3), np.uint8))
    with pytest.raises(SourceError) as error:
        load(inputs, big, preprocess="scale=1")
    assert "big.png" in str(error.value) and "(1, 3, 6, 6)" in str(error.value) and "(1, 3, 4, 4)" in str(error.value)

    with pytest.raises(UsageError, match="--preprocess applies to images"):
        load(inputs, tmp_path / "mixed" / "b.npy", preprocess="scale=1")
    with pytest.raises(UsageError, match="single-input model"):
        load(specs("a:1x3x4x4", "b:1x4"), tmp_path / "mixed" / "a.png")


# --- WAV ----------------------------------------------------------------------------------------------------


def test_wav_windows_drop_the_trailing_part_and_pad_short_files(tmp_path):
    codes = np.arange(10) * 1000 - 4000  # 10 frames: two windows of 4, the last 2 frames dropped
    write_wav(tmp_path / "audio" / "a.wav", codes)
    write_wav(tmp_path / "audio" / "b.wav", np.array([16384, -16384, 32767]))  # shorter than a window: padded
    loaded = load(specs("audio:1x4"), tmp_path / "audio", sample_rate=16000)
    assert loaded.found == 3 and [s["audio"].dtype for s in loaded.samples] == [np.float32] * 3
    windows = np.stack([s["audio"][0] for s in loaded.samples])
    expected = np.array([codes[0:4] / 32768, codes[4:8] / 32768, [0.5, -0.5, 32767 / 32768, 0.0]], np.float32)
    np.testing.assert_array_equal(windows, expected)
    assert loaded.preprocess["last_partial_window"].startswith("dropped")
    assert any("1 file(s) shorter than one window" in note for note in loaded.notes)


def test_wav_widths_and_channels(tmp_path):
    stereo = np.array([[32767, -32768], [16384, 0], [0, 0], [-16384, 16384]])
    path = write_wav(tmp_path / "s.wav", stereo)
    (mono,) = load(specs("x:1x4"), path, sample_rate=16000).samples
    np.testing.assert_array_equal(mono["x"][0], (stereo / 32768).mean(axis=1).astype(np.float32))
    (kept,) = load(specs("x:1x2x4"), path, sample_rate=16000).samples
    np.testing.assert_array_equal(kept["x"][0], (stereo / 32768).T.astype(np.float32))

    eight = write_wav(tmp_path / "8.wav", np.array([0, 128, 255, 64]), width=1)
    np.testing.assert_array_equal(load(specs("x:1x4"), eight, sample_rate=16000).samples[0]["x"][0], [-1.0, 0.0, 127 / 128, -0.5])
    wide = write_wav(tmp_path / "32.wav", np.array([-(2**31), 2**30, 0, -(2**30)]), width=4)
    np.testing.assert_array_equal(load(specs("x:1x4"), wide, sample_rate=16000).samples[0]["x"][0], [-1.0, 0.5, 0.0, -0.5])


def test_wav_rate_must_be_declared_and_match(tmp_path):
    path = write_wav(tmp_path / "voice.wav", np.zeros(8), rate=8000)
    with pytest.raises(SourceError) as error:
        load(specs("x:1x4"), path, sample_rate=16000)
    assert "voice.wav" in str(error.value) and "8000 Hz" in str(error.value) and "16000 Hz" in str(error.value)
    with pytest.raises(UsageError, match="needs --sample-rate"):
        load(specs("x:1x4"), path)
    with pytest.raises(UsageError, match="--sample-rate applies to WAV"):
        load(specs("x:1x4"), None, sample_rate=16000)


# --- arrays -------------------------------------------------------------------------------------------------


def test_npy_folder_takes_single_samples_and_sample_axes_in_sorted_order(tmp_path):
    folder = tmp_path / "arrays"
    folder.mkdir()
    np.save(folder / "b.npy", np.full((1, 3), 2.0))
    np.save(folder / "a.npy", np.full((1, 3), 1.0, np.float64))  # cast to the input's float32
    np.save(folder / "c.npy", np.arange(3)[:, None, None] + np.zeros((3, 1, 3)) + 3)  # three samples
    loaded = load(specs("x:1x3"), folder)
    assert loaded.found == 5 and loaded.kind == "npy"
    assert [float(s["x"][0, 0]) for s in loaded.samples] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert loaded.samples[0]["x"].dtype == np.float32

    np.save(folder / "d.npy", np.zeros((2, 2)))
    with pytest.raises(SourceError, match=r"d\.npy: array has shape \(2, 2\); expected \(1, 3\)"):
        load(specs("x:1x3"), folder)


def test_npz_folder_one_sample_per_file_keyed_by_input(tmp_path):
    folder = tmp_path / "npz"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", ids=np.full((1, 4), i, np.int64), mask=np.ones((1, 4), np.int64))
    loaded = load(specs("ids:1x4:int64", "mask:1x4:int64"), folder, count=2, seed=1)
    assert loaded.found == 3 and len(loaded.samples) == 2
    np.savez(folder / "3.npz", ids=np.zeros((1, 4), np.int64))
    with pytest.raises(SourceError, match=r"3\.npz: no array for input\(s\) mask"):
        load(specs("ids:1x4:int64", "mask:1x4:int64"), folder)
    np.savez(folder / "3.npz", ids=np.zeros((1, 4)), mask=np.zeros((1, 4)))
    with pytest.raises(SourceError, match="'ids' is float64; expected int64"):
        load(specs("ids:1x4:int64", "mask:1x4:int64"), folder)


# --- a Python callable --------------------------------------------------------------------------------------

DATA_MODULE = '''
import numpy as np

def dicts():
    return [{"x": np.full((1, 3), float(i), np.float32)} for i in range(6)]

def arrays():
    return np.arange(12, dtype=np.float32).reshape(4, 1, 3)

def stream():
    i = 0
    while True:
        yield (np.full((1, 3), i, np.float32),)
        i += 1

def broken():
    return [{"x": np.zeros((1, 3))}, {"x": np.zeros((1, 3))}, {"y": np.zeros((1, 3))}]
'''


def test_callable_sources(tmp_path, monkeypatch):
    (tmp_path / "calib_data.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    inputs = specs("x:1x3")

    everything = load(inputs, "calib_data:dicts")
    assert everything.kind == "callable" and everything.found == 6 and len(everything.samples) == 6
    picked = load(inputs, "calib_data:dicts", count=3, seed=2)
    values = [float(s["x"][0, 0]) for s in picked.samples]
    assert len(values) == 3 and values == sorted(values)

    from_file = load(inputs, f"{tmp_path / 'calib_data.py'}:arrays")
    assert from_file.found == 4 and float(from_file.samples[3]["x"][0, 2]) == 11.0

    streamed = load(inputs, "calib_data:stream", count=5)
    assert streamed.found is None and [float(s["x"][0, 0]) for s in streamed.samples] == [0, 1, 2, 3, 4]

    with pytest.raises(SourceError, match="sample 2: no x; unknown y"):
        load(inputs, "calib_data:broken")
    with pytest.raises(SourceError, match="has no attribute 'missing'"):
        load(inputs, "calib_data:missing")


def test_manifest_record_is_plain_data(tmp_path):
    write_image(tmp_path / "i.png", RGB)
    record = load(specs("x:1x3x4x4"), tmp_path / "i.png", preprocess="scale=1").describe(seed=0, validation=1)
    assert record["source"] == "images" and record["samples_found"] == 1 and record["samples_used"] == 1
    assert record["split"] == {"seed": 0, "calibration": 0, "validation": 1}
    assert json.loads(json.dumps(record)) == record


# --- CLI and edgeq.toml -------------------------------------------------------------------------------------


@ONNX
def test_convert_an_image_folder_records_the_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        write_image(tmp_path / "images" / f"{i}.jpg", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    preprocess = "resize=36,crop=32,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw"
    result = CliRunner().invoke(main, [
        "convert", "edgeq.examples:tiny_convnet", "--target", "onnx", "--data", str(tmp_path / "images"),
        "--preprocess", preprocess, "--samples", "4", "--out", str(tmp_path / "out"),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "tiny_convnet" / "onnx" / "fp32" / "manifest.json").read_text())
    data = manifest["validation"]["data"]
    assert data["source"] == "images" and data["path"] == str(tmp_path / "images")
    assert data["samples_found"] == 6 and data["samples_used"] == 4 and manifest["validation"]["samples"] == 4
    assert data["preprocess"] == {**parse_preprocess(preprocess).to_json(), "declared": True}


def test_cli_and_project_refuse_bad_preprocessing(tmp_path):
    bad = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_convnet", "--preprocess", "layout=chw"])
    assert bad.exit_code == 2 and "nchw or nhwc" in bad.output
    rate = CliRunner().invoke(main, ["convert", "edgeq.examples:tiny_convnet", "--sample-rate", "0"])
    assert rate.exit_code == 2

    project = tmp_path / "edgeq.toml"
    project.write_text('[[models]]\nsource = "edgeq.examples:tiny_convnet"\npreprocess = "crop=32"\nsample_rate = 16000\n')
    (job,) = load_project(project)
    assert job.preprocess == "crop=32" and job.sample_rate == 16000
    project.write_text('[[models]]\nsource = "edgeq.examples:tiny_convnet"\npreprocess = "crop=big"\n')
    with pytest.raises(UsageError, match=r"models\[0\]\.preprocess: .*crop='big'"):
        load_project(project)
    project.write_text('[[models]]\nsource = "edgeq.examples:tiny_convnet"\nsample_rate = 0\n')
    with pytest.raises(UsageError, match=r"models\[0\]\.sample_rate"):
        load_project(project)
