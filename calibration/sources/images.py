"""Image folders (PNG/JPEG) and their declared preprocessing: resize, centre crop, normalize, layout.

`--preprocess "resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw"` means, per image:
convert to RGB (or BGR / gray), resize the shorter side to 256 keeping the aspect ratio (bilinear), crop the
centre 224x224, then value = (pixel * scale - mean) / std per channel, laid out as (1, C, H, W) or (1, H, W, C).
Resize and crop follow torchvision's `Resize(int)` and `CenterCrop` arithmetic. Pillow loads only when used.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from pathlib import Path

import numpy as np

from edgeq.calibration.sources.common import SampleSet, SourceKind, select, single_input
from edgeq.errors import SourceError, UsageError
from edgeq.signature import TensorSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class Layout(StrEnum):
    NCHW = "nchw"
    NHWC = "nhwc"


class Channels(StrEnum):
    RGB = "rgb"
    BGR = "bgr"  # OpenCV-trained models
    GRAY = "gray"


class Interpolation(StrEnum):
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    NEAREST = "nearest"


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image file becomes an input array. Undeclared keys keep these defaults."""

    resize: int | None = None  # the shorter side, in pixels, aspect ratio kept; None: no resize
    crop: int | tuple[int, int] | None = None  # centre crop: a square side or (height, width); None: no crop
    mean: tuple[float, ...] = (0.0,)  # in scaled units (after `scale`); one value, or one per channel
    std: tuple[float, ...] = (1.0,)
    scale: float = 1 / 255  # 8-bit pixels to [0, 1]
    layout: Layout = Layout.NCHW
    channels: Channels = Channels.RGB
    interpolation: Interpolation = Interpolation.BILINEAR

    def __post_init__(self) -> None:
        for key, enum in (("layout", Layout), ("channels", Channels), ("interpolation", Interpolation)):
            value = getattr(self, key)
            if value not in {e.value for e in enum}:
                raise UsageError(f"--preprocess: {key}={value!r}: expected one of {', '.join(e.value for e in enum)}")
            object.__setattr__(self, key, enum(value))
        if self.resize is not None and self.resize < 1:
            raise UsageError(f"--preprocess: resize={self.resize}: expected a positive size in pixels")
        if self.crop is not None and min(_pair(self.crop)) < 1:
            raise UsageError(f"--preprocess: crop={self.crop}: expected a positive size, or HxW")
        bands = 1 if self.channels == Channels.GRAY else 3
        for key in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, key))
            if len(values) not in (1, bands):
                raise UsageError(
                    f"--preprocess: {key} has {len(values)} values; expected 1 or {bands} for channels={self.channels}"
                )
            object.__setattr__(self, key, values)
        if 0.0 in self.std:
            raise UsageError("--preprocess: std has a zero; every std value must be non-zero")
        if not self.scale > 0:
            raise UsageError(f"--preprocess: scale={self.scale}: expected a positive number, e.g. 1/255")

    def to_json(self) -> dict:
        return {
            "resize": self.resize,
            "crop": None if self.crop is None else list(_pair(self.crop)),
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": self.scale,
            "layout": self.layout.value,
            "channels": self.channels.value,
            "interpolation": self.interpolation.value,
        }

    def __str__(self) -> str:
        """The --preprocess spelling of this preprocessing (parses back to an equal value)."""
        parts = []
        if self.resize is not None:
            parts.append(f"resize={self.resize}")
        if self.crop is not None:
            height, width = _pair(self.crop)
            parts.append(f"crop={height}" if height == width else f"crop={height}x{width}")
        parts += [
            "mean=" + "/".join(repr(v) for v in self.mean),
            "std=" + "/".join(repr(v) for v in self.std),
            "scale=1/255" if self.scale == 1 / 255 else f"scale={self.scale!r}",
            f"layout={self.layout}", f"channels={self.channels}", f"interpolation={self.interpolation}",
        ]
        return ",".join(parts)

    def apply(self, image) -> np.ndarray:
        """A PIL image as a float64 array with a leading batch axis of 1, in `layout`."""
        from PIL import Image

        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            raise SourceError(f"{image.mode} pixels (16-bit or float): edgeq reads 8-bit images")
        image = image.convert("L" if self.channels == Channels.GRAY else "RGB")
        resample = {
            Interpolation.BILINEAR: Image.Resampling.BILINEAR,
            Interpolation.BICUBIC: Image.Resampling.BICUBIC,
            Interpolation.NEAREST: Image.Resampling.NEAREST,
        }[self.interpolation]
        if self.resize is not None:
            width, height = image.size
            if width <= height:  # torchvision Resize(int): int() of the scaled longer side
                size = (self.resize, int(self.resize * height / width))
            else:
                size = (int(self.resize * width / height), self.resize)
            image = image.resize(size, resample)
        if self.crop is not None:
            crop_h, crop_w = _pair(self.crop)
            width, height = image.size
            if crop_h > height or crop_w > width:
                raise SourceError(f"the image is {width}x{height} (width x height) before the {crop_w}x{crop_h} crop")
            top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))  # torchvision CenterCrop
            image = image.crop((left, top, left + crop_w, top + crop_h))
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.channels == Channels.BGR:
            pixels = pixels[:, :, ::-1]
        values = (pixels * self.scale - np.asarray(self.mean)) / np.asarray(self.std)
        if self.layout == Layout.NCHW:
            values = values.transpose(2, 0, 1)
        return values[None]


_ALLOWED = {
    "resize": "a positive size in pixels for the shorter side, e.g. resize=256",
    "crop": "a positive size for a square centre crop, or HxW, e.g. crop=224 or crop=224x320",
    "mean": "one number, or one per channel separated by '/', e.g. mean=0.485/0.456/0.406",
    "std": "one number, or one per channel separated by '/', e.g. std=0.229/0.224/0.225",
    "scale": "a positive number or fraction, e.g. scale=1/255 or scale=1",
    "layout": "nchw or nhwc",
    "channels": "rgb, bgr or gray",
    "interpolation": "bilinear, bicubic or nearest",
}


def parse_preprocess(text: str) -> ImagePreprocess:
    """Parse `key=value,...` (keys: resize crop mean std scale layout channels interpolation) strictly."""
    values: dict = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise UsageError(
                f"--preprocess {text!r}: {item.strip()!r} is not key=value; keys: {', '.join(_ALLOWED)}"
            )
        if key not in _ALLOWED:
            raise UsageError(f"--preprocess {text!r}: unknown key {key!r}; known keys: {', '.join(_ALLOWED)}")
        if key in values:
            raise UsageError(f"--preprocess {text!r}: key {key!r} is given twice")
        try:
            values[key] = _parse_value(key, value)
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"--preprocess {text!r}: {key}={value!r}: expected {_ALLOWED[key]}") from None
    try:
        return ImagePreprocess(**values)
    except UsageError as exc:
        raise UsageError(str(exc).replace("--preprocess:", f"--preprocess {text!r}:", 1)) from None


def _parse_value(key: str, value: str):
    if key == "resize":
        return int(value)
    if key == "crop":
        height, sep, width = value.partition("x")
        return (int(height), int(width)) if sep else int(value)
    if key in ("mean", "std"):
        return tuple(float(v) for v in value.split("/"))
    if key == "scale":
        return float(Fraction(value))
    enum = {"layout": Layout, "channels": Channels, "interpolation": Interpolation}[key]
    return enum(value.lower())


def default_preprocess(spec: TensorSpec, data: Path) -> ImagePreprocess:
    """Without --preprocess: resize the shorter side to cover the input's H, W, centre-crop to them, scale to
    [0, 1]; layout and channels from the input's shape (the axis of size 3 or 1 after the batch axis)."""
    shape = spec.shape
    if len(shape) == 4 and shape[0] == 1 and shape[1] in (1, 3):
        layout, bands, height, width = Layout.NCHW, shape[1], shape[2], shape[3]
    elif len(shape) == 4 and shape[0] == 1 and shape[3] in (1, 3):
        layout, bands, height, width = Layout.NHWC, shape[3], shape[1], shape[2]
    else:
        raise UsageError(
            f"--data {data}: input {spec.name!r} has shape {shape}, not (1, C, H, W) or (1, H, W, C) with C = 1 or 3; "
            "edgeq cannot guess how to lay out images for it: give --preprocess, or arrays (.npy/.npz)"
        )
    return ImagePreprocess(
        resize=max(height, width),  # the shorter side covers both H and W, so the crop fits
        crop=height if height == width else (height, width),
        layout=layout,
        channels=Channels.RGB if bands == 3 else Channels.GRAY,
    )


def image_samples(
    paths: list[Path], inputs: list[TensorSpec], data: Path, preprocess: ImagePreprocess | None, count: int, seed: int
) -> SampleSet:
    """A seeded choice of `count` images among `paths` (sorted), each preprocessed to the model's input."""
    spec = single_input(inputs, "image folders", data)
    declared = preprocess is not None
    if preprocess is None:
        preprocess = default_preprocess(spec, data)
    samples = [{spec.name: load_image(paths[i], preprocess, spec)} for i in select(len(paths), count, seed)]
    notes = () if declared else (f"no --preprocess declared: defaults derived from input {spec}: {preprocess}",)
    record = {**preprocess.to_json(), "declared": declared}
    return SampleSet(samples, SourceKind.IMAGES, str(data), len(paths), record, notes)


def load_image(path: Path, preprocess: ImagePreprocess, spec: TensorSpec) -> np.ndarray:
    """One image file as an array of `spec`'s shape and dtype."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            values = preprocess.apply(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SourceError(f"--data {path}: not a readable image ({exc})") from exc
    except SourceError as exc:
        raise SourceError(f"--data {path}: {exc}") from exc
    if values.shape != spec.shape:
        raise SourceError(
            f"--data {path}: preprocessing made shape {values.shape}; input {spec.name!r} expects {spec.shape} "
            f"(preprocess: {preprocess}); declare resize/crop for the input's size and its layout, e.g. with --preprocess"
        )
    if np.issubdtype(np.dtype(spec.dtype), np.integer):
        info = np.iinfo(spec.dtype)
        if not (np.array_equal(values, np.rint(values)) and values.min() >= info.min and values.max() <= info.max):
            raise SourceError(
                f"--data {path}: input {spec.name!r} is {spec.dtype}, but preprocessing made fractional or "
                f"out-of-range values; declare scale=1 with no mean/std to keep whole pixel values"
            )
    elif not np.issubdtype(np.dtype(spec.dtype), np.floating):
        raise UsageError(f"--data {path}: input {spec.name!r} is {spec.dtype}; images feed float or integer inputs")
    return values.astype(spec.dtype)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
