"""WAV folders through the stdlib `wave` module: integer PCM (8/16/24/32-bit) at a declared sample rate.

Each file is cut into windows of the model input's length (its last axis), hop = window. A trailing partial
window is dropped; a file shorter than one window becomes one window, zero-padded, so short clips still count.
Samples are float32 in [-1, 1]. Stereo is averaged to mono unless the input wants that many channels, as
(1, channels, time). No resampling: every file must already be at --sample-rate.
"""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.calibration.sources.common import SampleSet, SourceKind, select, single_input
from edgeq.errors import SourceError, UsageError
from edgeq.signature import TensorSpec

WAV_SUFFIXES = (".wav",)
_FULL_SCALE = {1: 2.0**7, 2: 2.0**15, 3: 2.0**23, 4: 2.0**31}  # bytes per sample -> value of full scale


@dataclass(frozen=True)
class WavHeader:
    path: Path
    channels: int
    sample_width: int  # bytes
    rate_hz: int
    frames: int


def wav_samples(
    paths: list[Path], inputs: list[TensorSpec], data: Path, sample_rate: int | None, count: int, seed: int
) -> SampleSet:
    """A seeded choice of `count` windows among every window of the files (in sorted file order)."""
    spec = single_input(inputs, "WAV files", data)
    if sample_rate is None:
        raise UsageError(
            f"--data {data}: WAV data needs --sample-rate (the rate the model expects, in Hz); "
            "edgeq checks every file against it and does not resample"
        )
    if not np.issubdtype(np.dtype(spec.dtype), np.floating):
        raise UsageError(f"--data {data}: input {spec.name!r} is {spec.dtype}; WAV data feeds float inputs")
    window = spec.shape[-1]
    bands = math.prod(spec.shape[:-1])  # 1: mono; more: the input's channels, time on the last axis
    headers = [read_header(path) for path in paths]
    for header in headers:
        if header.rate_hz != sample_rate:
            raise SourceError(
                f"--data {header.path}: sampled at {header.rate_hz} Hz, but --sample-rate is {sample_rate} Hz; "
                "edgeq does not resample: convert the file, or declare the rate the model expects"
            )
        if bands > 1 and header.channels != bands:
            raise SourceError(
                f"--data {header.path}: has {header.channels} channel(s); input {spec.name!r} {spec.shape} takes {bands}"
            )
    windows = [(header, start) for header in headers for start in _starts(header.frames, window)]
    if not windows:
        raise SourceError(f"--data {data}: the WAV files hold no audio frames")
    samples, current, audio = [], None, None
    for index in select(len(windows), count, seed):  # sorted: one file's windows are adjacent, so read it once
        header, start = windows[index]
        if header is not current:
            current, audio = header, read_pcm(header)
        chunk = np.zeros((window, header.channels), dtype=np.float32)
        part = audio[start : start + window]
        chunk[: len(part)] = part
        if bands == 1:
            chunk = chunk.mean(axis=1, keepdims=True)
        samples.append({spec.name: np.ascontiguousarray(chunk.T.reshape(spec.shape)).astype(spec.dtype)})
    padded = sum(1 for h in headers if 0 < h.frames < window)
    record = {
        "sample_rate_hz": sample_rate,
        "window_frames": window,
        "hop_frames": window,
        "channels": "mono (downmixed)" if bands == 1 else bands,
        "last_partial_window": "dropped (a file shorter than one window is zero-padded to one)",
        "range": [-1.0, 1.0],
    }
    notes = (f"{padded} file(s) shorter than one window were zero-padded to one window",) if padded else ()
    return SampleSet(samples, SourceKind.WAV, str(data), len(windows), record, notes)


def _starts(frames: int, window: int) -> list[int]:
    if 0 < frames < window:
        return [0]
    return [i * window for i in range(frames // window)]


# WAV format tags the stdlib `wave` module does not read, named so the message says what the file holds.
_FORMATS = {"3": "32/64-bit float samples", "6": "A-law samples", "7": "mu-law samples", "2": "ADPCM samples", "85": "MP3 data"}


def read_header(path: Path) -> WavHeader:
    try:
        with wave.open(str(path), "rb") as handle:
            header = WavHeader(path, handle.getnchannels(), handle.getsampwidth(), handle.getframerate(), handle.getnframes())
    except EOFError as exc:
        raise SourceError(f"--data {path}: the WAV file ends inside its header: truncated or empty") from exc
    except (wave.Error, OSError) as exc:
        tag = str(exc).rpartition("unknown format: ")[2] if "unknown format" in str(exc) else None
        what = f"holds {_FORMATS.get(tag, f'format {tag}')}" if tag else f"is not a readable WAV file ({exc})"
        raise SourceError(
            f"--data {path}: {what}; edgeq reads 8/16/24/32-bit integer PCM WAV, so re-save float or compressed audio "
            "as PCM (e.g. sox in.wav -b 16 -e signed-integer out.wav)"
        ) from exc
    if header.channels < 1 or header.rate_hz < 1:
        raise SourceError(f"--data {path}: the WAV header says {header.channels} channel(s) at {header.rate_hz} Hz: a damaged file")
    return header


def read_pcm(header: WavHeader) -> np.ndarray:
    """The whole file as float32 (frames, channels) in [-1, 1]."""
    with wave.open(str(header.path), "rb") as handle:
        raw = handle.readframes(header.frames)
    width = header.sample_width
    if width not in _FULL_SCALE:
        raise SourceError(f"--data {header.path}: {8 * width}-bit samples; edgeq reads 8, 16, 24 or 32-bit PCM")
    raw = raw[: len(raw) // width * width]
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        values = np.frombuffer(raw, np.uint8).astype(np.float64) - 128
    elif width == 3:
        octets = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        values = octets[:, 0] | (octets[:, 1] << 8) | (octets[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values).astype(np.float64)
    else:
        values = np.frombuffer(raw, "<i2" if width == 2 else "<i4").astype(np.float64)
    frames = len(values) // header.channels
    if frames < header.frames:  # windows were planned from the header: a short file would give silent zeros
        raise SourceError(
            f"--data {header.path}: truncated: its header declares {header.frames} frames, the file holds {frames}; "
            "copy or export it again"
        )
    return (values[: frames * header.channels] / _FULL_SCALE[width]).reshape(frames, header.channels).astype(np.float32)
