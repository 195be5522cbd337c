"""Bad --data: each a clear error naming the file (and sample, input) before any conversion, never a traceback,
never a drift figure computed on NaN, and the good bundle already at the destination untouched.

Array, image, audio and callable sources go through the CLI with edgeq.examples:tiny_mlp (or tiny_convnet);
text sources need a tokenizer model, and fail before tokenizing, so they call the loader directly.
"""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from edgeq.calibration.data import load_samples
from edgeq.errors import SourceError, UsageError
from edgeq.signature import parse_input_spec
from tests.conftest import ONNX
from tests.load.test_malicious_sources import convert, good_bundle  # noqa: F401 - the shared session fixture

MLP = "edgeq.examples:tiny_mlp"


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _npy(path: Path, array) -> Path:
    np.save(path, array)
    return path


def _with(value, index, shape=(4, 1, 16)):
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    array[index] = value
    return array


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _wav(path: Path, frames: int = 64, cut: int = 0) -> Path:
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(np.zeros(frames, "<i2").tobytes())
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    return path


def _float_wav(path: Path) -> Path:
    """IEEE float WAV (format tag 3), which the stdlib wave module does not read."""
    data = np.zeros(64, np.float32).tobytes()
    fmt = struct.pack("<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32)
    return _file(path, b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", len(data)) + data)


def _folder(path: Path, **files: bytes) -> Path:
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def _module(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SAMPLES = """
import numpy as np

def divides_by_zero():
    return [1 / 0]

def nan():
    a = np.zeros((1, 16), np.float32)
    a[0, 3] = np.nan
    return [{"x": a}] * 4

def a_number():
    return 7

def stops():
    yield {"x": np.zeros((1, 16), np.float32)}
    raise KeyError("the reader lost its file")
"""

WAV = ["--sample-rate", "16000"]
# id: (build(tmp_path) -> extra convert arguments, exit code, words the message must hold)
BAD_DATA = {
    "inf-in-npz": (lambda t: ["--data", str(_npz(t / "d.npz", x=_with(np.inf, (2, 0, 3))))], 3, ["d.npz: sample 2", "input 'x'", "1 Inf value(s)", "(0, 3)"]),
    "nan-in-npz": (lambda t: ["--data", str(_npz(t / "d.npz", x=_with(np.nan, (1, 0, 5))))], 3, ["d.npz: sample 1", "NaN", "bad data"]),
    "nan-in-npy-sample": (lambda t: ["--data", str(_npy(t / "d.npy", _with(np.nan, (0, 0, 0))))], 3, ["d.npy", "NaN"]),
    "overflows-float32": (lambda t: ["--data", str(_npz(t / "d.npz", x=np.full((1, 16), 1e300)))], 3, ["beyond the range of float32"]),
    "npz-keys-not-inputs": (lambda t: ["--data", str(_npz(t / "d.npz", y=np.zeros((1, 16), np.float32)))], 3, ["no array for input(s) x", "it has y"]),
    "npz-wrong-shape": (lambda t: ["--data", str(_npz(t / "d.npz", x=np.zeros((2, 3), np.float32)))], 3, ["'x' has shape (2, 3)", "(1, 16)"]),
    "npz-strings": (lambda t: ["--data", str(_npz(t / "d.npz", x=np.full((1, 16), "abc")))], 3, ["'x' is <U3", "float32"]),
    "npz-no-arrays": (lambda t: ["--data", str(_npz(t / "d.npz"))], 3, ["holds no arrays"]),
    "npz-truncated": (lambda t: ["--data", str(_file(t / "d.npz", (_npz(t / "f.npz", x=np.zeros((9, 1, 16))).read_bytes()[:300])))], 3, ["d.npz", "truncated"]),
    "npy-wrong-shape": (lambda t: ["--data", str(_npy(t / "d.npy", np.zeros((3, 5), np.float32)))], 3, ["shape (3, 5)", "(samples, 1, 16)"]),
    "npy-empty-file": (lambda t: ["--data", str(_file(t / "d.npy", b""))], 3, ["d.npy", "the file is empty"]),
    "empty-folder": (lambda t: ["--data", str(_folder(t / "data"))], 3, ["holds no .npz", "it is empty"]),
    "folder-of-other-files": (lambda t: ["--data", str(_folder(t / "data", **{"a.txt": b"x"}))], 3, ["1 other file(s)"]),
    "folder-mixing-kinds": (lambda t: ["--data", str(_folder(t / "data", **{"a.npy": b"", "b.wav": b""}))], 3, ["mixes kinds of data"]),
    "wav-truncated-header": (lambda t: ["--data", str(_file(t / "a.wav", _wav(t / "w.wav").read_bytes()[:30])), *WAV], 3, ["a.wav", "ends inside its header"]),
    "wav-truncated-data": (lambda t: ["--data", str(_wav(t / "a.wav", cut=40)), *WAV], 3, ["a.wav", "declares 64 frames", "holds 44"]),
    "wav-float": (lambda t: ["--data", str(_float_wav(t / "a.wav")), *WAV], 3, ["float samples", "integer PCM"]),
    "wav-not-wav": (lambda t: ["--data", str(_file(t / "a.wav", b"ID3\x03 an mp3 really")), *WAV], 3, ["a.wav", "not a readable WAV file"]),
    "function-raises": (lambda t: ["--data", f"{_module(t / 'samples.py', SAMPLES)}:divides_by_zero"], 3, ["ZeroDivisionError", "samples.py, line 5"]),
    "function-gives-nan": (lambda t: ["--data", f"{_module(t / 'samples.py', SAMPLES)}:nan"], 3, ["sample 0", "input 'x'", "NaN", "(0, 3)"]),
    "function-returns-number": (lambda t: ["--data", f"{_module(t / 'samples.py', SAMPLES)}:a_number"], 3, ["returned a int", "iterable of samples"]),
    "generator-raises": (lambda t: ["--data", f"{_module(t / 'samples.py', SAMPLES)}:stops"], 3, ["KeyError", "samples.py, line 17"]),
    "data-module-syntax-error": (lambda t: ["--data", f"{_module(t / 'samples.py', 'def f(:' + chr(10))}:f"], 3, ["SyntaxError", "samples.py, line 1"]),
    "data-module-raises": (lambda t: ["--data", f"{_module(t / 'samples.py', 'x = 1' + chr(10) + 'raise ValueError(x)' + chr(10))}:f"], 3, ["ValueError", "samples.py, line 2"]),
    "image-not-an-image": (lambda t: ["--data", str(_file(t / "cat.png", b"not a png"))], 3, ["cat.png", "not a readable image"]),
}


@ONNX
@pytest.mark.parametrize("case", BAD_DATA, ids=str)
def test_bad_data_fails_clearly(tmp_path, good_bundle, case):  # noqa: F811 - the imported fixture
    build, code, words = BAD_DATA[case]
    source = "edgeq.examples:tiny_convnet" if case.startswith("image") else MLP
    result = convert(good_bundle, source, *build(tmp_path))
    text = " ".join(result.output.split())
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert all(word in text for word in words), result.output


# --- text sources (the error comes before the tokenizer is used) ---------------------------------------------

TEXT = {
    "csv-latin-1": ("d.csv", "text,label\ncafé au lait,1\n".encode("cp1252"), "text", SourceError, ["not UTF-8", "byte 14, line 2", "cp1252"]),
    "txt-utf-16": ("d.txt", "one\ntwo\n".encode("utf-16"), None, SourceError, ["UTF-16", "re-save it as UTF-8"]),
    "csv-empty": ("d.csv", b"", "text", SourceError, ["holds no rows"]),
    "txt-blank": ("d.txt", b"\n  \n", None, SourceError, ["holds no text"]),
    "csv-column-not-in-header": ("d.csv", b"text,label\nhello,1\n", "body", UsageError, ["'body'", "text, label"]),
    "csv-column-out-of-range": ("d.csv", b"text,label\nhello,1\n", "5", UsageError, ["2 column(s)", "numbered from 0"]),
    "csv-column-empty": ("d.csv", b"text,label\n,1\n", "text", SourceError, ["column text holds no text"]),
}


@pytest.mark.parametrize("case", TEXT, ids=str)
def test_bad_text_data_fails_clearly(tmp_path, case):
    name, data, column, error, words = TEXT[case]
    path = _file(tmp_path / name, data)
    inputs = [parse_input_spec("input_ids:1x8:int64")]
    with pytest.raises(error) as raised:
        load_samples(inputs, {}, data=path, tokenizer=object(), text_column=column)
    assert name in str(raised.value) or column in str(raised.value)
    assert all(word in str(raised.value) for word in words), str(raised.value)
