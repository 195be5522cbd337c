"""Spatial MIL ops: upsample/resize (nearest, bilinear), crop, pad, and the depth <-> space rearrangements.

Resampling follows the grids that coremltools' op docstrings spell out (iOS15/iOS16 image_resizing.py): each
output index i maps to a real-valued input coordinate, clamped to [0, X_in - 1], and bilinear interpolates
between the two neighbours of that coordinate.
"""

from __future__ import annotations

import numpy as np

from edgeq.validate.mil.args import Args
from edgeq.validate.mil.args import f32 as _f


def _bilinear_axis(x: np.ndarray, axis: int, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of x along `axis` at real coordinates `grid` (already clamped to the axis)."""
    low = np.floor(grid).astype(np.int64)
    high = np.minimum(low + 1, x.shape[axis] - 1)
    weight = (grid - low).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = -1
    weight = weight.reshape(shape)
    return np.take(x, low, axis=axis) * (np.float32(1.0) - weight) + np.take(x, high, axis=axis) * weight


def _grid(size_in: int, size_out: int, mode: str, a: Args) -> np.ndarray:
    """Input coordinates (float64) for each output index, per resize_bilinear's sampling modes."""
    i = np.arange(size_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            points = np.full(1, (size_in - 1) / 2.0 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            points = i * (size_in - 1) / (size_out - 1)
    elif mode == "DEFAULT":  # tf ResizeBilinear(align_corners=False, half_pixel_centers=False)
        points = i * size_in / size_out  # the docstring's (X_in - X_in/X_out) / (X_out - 1) spacing, simplified
    elif mode == "UNALIGN_CORNERS":  # half-pixel centres: PyTorch align_corners=False
        spacing = size_in / size_out
        points = i * spacing + 0.5 * spacing - 0.5
    elif mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        points = 0.5 * delta + i * delta
    else:
        raise a.unsupported(f"sampling_mode {mode!r}")
    return np.clip(points, 0, size_in - 1)


def _bilinear(x: np.ndarray, size_h: int, size_w: int, mode: str, a: Args) -> np.ndarray:
    x = _bilinear_axis(x, x.ndim - 2, _grid(x.shape[-2], size_h, mode, a))
    return _bilinear_axis(x, x.ndim - 1, _grid(x.shape[-1], size_w, mode, a))


def upsample_bilinear(a: Args):
    """iOS15: align_corners (default True); iOS16 adds half_pixel_centers (default: not align_corners). The
    scale is recomputed from the output size (floor(X_in * scale)), as the op's docstring states."""
    x = _f(a("x"))
    size_h = int(np.floor(x.shape[-2] * float(a.scalar("scale_factor_height", 1))))
    size_w = int(np.floor(x.shape[-1] * float(a.scalar("scale_factor_width", 1))))
    align = bool(a.scalar("align_corners", True))
    half_pixel = bool(a.scalar("half_pixel_centers", not align))
    if align and half_pixel:
        raise a.unsupported("align_corners=True with half_pixel_centers=True")
    # align_corners=False without half-pixel centres is tf's legacy grid, resize_bilinear's DEFAULT
    mode = "STRICT_ALIGN_CORNERS" if align else ("UNALIGN_CORNERS" if half_pixel else "DEFAULT")
    return _bilinear(x, size_h, size_w, mode, a)


def resize_bilinear(a: Args):
    x = _f(a("x"))
    mode = a.scalar("sampling_mode", "DEFAULT")
    return _bilinear(x, int(a.scalar("target_size_height", 1)), int(a.scalar("target_size_width", 1)), mode, a)


def _nearest(x: np.ndarray, size_h: int, size_w: int) -> np.ndarray:
    """Output index i reads input floor(i * X_in / X_out): PyTorch's 'nearest' (not 'nearest-exact')."""
    rows = np.minimum((np.arange(size_h) * x.shape[-2]) // size_h, x.shape[-2] - 1)
    cols = np.minimum((np.arange(size_w) * x.shape[-1]) // size_w, x.shape[-1] - 1)
    return np.take(np.take(x, rows, axis=-2), cols, axis=-1)


def upsample_nearest_neighbor(a: Args):
    x = np.asarray(a("x"))
    scale_h, scale_w = float(a.scalar("scale_factor_height", 1)), float(a.scalar("scale_factor_width", 1))
    size_h, size_w = int(np.floor(x.shape[-2] * scale_h)), int(np.floor(x.shape[-1] * scale_w))
    if scale_h != int(scale_h) or scale_w != int(scale_w):
        # floor(i / scale) with the float scale: the index PyTorch computes from a scale_factor
        rows = np.minimum(np.floor(np.arange(size_h) / scale_h).astype(np.int64), x.shape[-2] - 1)
        cols = np.minimum(np.floor(np.arange(size_w) / scale_w).astype(np.int64), x.shape[-1] - 1)
        return np.take(np.take(x, rows, axis=-2), cols, axis=-1)
    return _nearest(x, size_h, size_w)


def resize_nearest_neighbor(a: Args):
    return _nearest(np.asarray(a("x")), int(a.scalar("target_size_height")), int(a.scalar("target_size_width")))


def crop(a: Args):
    x = np.asarray(a("x"))
    top, bottom = [int(v) for v in np.atleast_1d(a("crop_height"))]
    left, right = [int(v) for v in np.atleast_1d(a("crop_width"))]
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}  # reflect excludes the edge


def pad(a: Args):
    """The last len(pad)/2 axes padded (before, after); reflect mirrors without repeating the edge."""
    x = np.asarray(a("x"))
    amounts = [int(p) for p in np.atleast_1d(a("pad"))]
    mode = a.scalar("mode", "constant")
    if mode not in _PAD_MODES:
        raise a.unsupported(f"mode {mode!r}")
    padded = len(amounts) // 2
    widths = [(0, 0)] * (x.ndim - padded) + [(amounts[2 * i], amounts[2 * i + 1]) for i in range(padded)]
    if mode == "constant":
        return np.pad(x, widths, constant_values=np.asarray(a("constant_val", 0.0)).astype(x.dtype))
    return np.pad(x, widths, mode=_PAD_MODES[mode])


def pixel_shuffle(a: Args):  # PyTorch's PixelShuffle: channel c*r*r + i*r + j -> (c, h*r + i, w*r + j)
    x = np.asarray(a("x"))
    r = int(a.scalar("upscale_factor"))
    n, c, h, w = x.shape
    return x.reshape(n, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (r * r), h * r, w * r)


def pixel_unshuffle(a: Args):
    x = np.asarray(a("x"))
    r = int(a.scalar("downscale_factor"))
    n, c, h, w = x.shape
    return x.reshape(n, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4).reshape(n, c * r * r, h // r, w // r)


def depth_to_space(a: Args):  # TensorFlow's DCR order: channel (i*b + j)*C' + c -> (c, h*b + i, w*b + j)
    x = np.asarray(a("x"))
    b = int(a.scalar("block_size"))
    n, c, h, w = x.shape
    return x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c // (b * b), h * b, w * b)


def space_to_depth(a: Args):  # the inverse of depth_to_space
    x = np.asarray(a("x"))
    b = int(a.scalar("block_size"))
    n, c, h, w = x.shape
    return x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4).reshape(n, c * b * b, h // b, w // b)


def _source_coordinate(c: np.ndarray, size: int, mode: str, align: bool, a: Args) -> np.ndarray:
    """A coordinate in resample's `coordinates_mode` as a pixel position (0 .. size - 1 inside the image)."""
    if mode == "unnormalized":
        return c
    if mode == "normalized_minus_one_to_one":
        return (c + 1) / 2 * (size - 1) if align else ((c + 1) * size - 1) / 2
    if mode == "normalized_zero_to_one":
        return c * (size - 1) if align else c * size - 0.5
    raise a.unsupported(f"coordinates_mode {mode!r}")


def _reflect(c: np.ndarray, low: float, high: float) -> np.ndarray:
    """Mirror c into [low, high] (repeatedly, as PyTorch's grid_sample reflects)."""
    span = high - low
    if span <= 0:
        return np.zeros_like(c)
    folded = np.abs(c - low) % (2 * span)
    return low + np.where(folded > span, 2 * span - folded, folded)


def resample(a: Args):
    """Sample x (B, C, H, W) at coordinates (B, H2, W2, 2) given as (x, y): PyTorch's grid_sample, which the
    frontend maps here. Padding: constant (padding_value), border (clamped), reflection (mirrored about the
    edge pixels' centres), symmetric (about their outer edges). Nearest rounds half to even, as PyTorch."""
    x = _f(a("x"))
    coords = _f(a("coordinates")).astype(np.float64)
    sampling, padding = a.scalar("sampling_mode", "bilinear"), a.scalar("padding_mode", "constant")
    align, mode = bool(a.scalar("align_corners", False)), a.scalar("coordinates_mode", "normalized_minus_one_to_one")
    if sampling not in ("bilinear", "nearest") or padding not in ("constant", "border", "reflection", "symmetric"):
        raise a.unsupported(f"sampling_mode {sampling!r} with padding_mode {padding!r}")
    height, width = x.shape[-2:]
    ix = _source_coordinate(coords[..., 0], width, mode, align, a)
    iy = _source_coordinate(coords[..., 1], height, mode, align, a)
    if padding == "reflection":
        ix, iy = _reflect(ix, 0, width - 1), _reflect(iy, 0, height - 1)
    elif padding == "symmetric":
        ix, iy = _reflect(ix, -0.5, width - 0.5), _reflect(iy, -0.5, height - 0.5)
    if padding != "constant":
        ix, iy = np.clip(ix, 0, width - 1), np.clip(iy, 0, height - 1)
    fill = np.float32(a.scalar("padding_value", 0.0))
    batch = np.arange(x.shape[0]).reshape(-1, 1, 1)

    def pixel(yy, xx):  # (B, C, H2, W2); positions outside the image read the padding value
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        values = x[batch, :, np.clip(yy, 0, height - 1), np.clip(xx, 0, width - 1)]  # (B, H2, W2, C)
        return np.moveaxis(np.where(inside[..., None], values, fill), -1, 1)

    if sampling == "nearest":
        return pixel(np.rint(iy).astype(np.int64), np.rint(ix).astype(np.int64))
    x0, y0 = np.floor(ix).astype(np.int64), np.floor(iy).astype(np.int64)
    wx, wy = (ix - x0).astype(np.float32)[:, None], (iy - y0).astype(np.float32)[:, None]
    top = pixel(y0, x0) * (1 - wx) + pixel(y0, x0 + 1) * wx
    bottom = pixel(y0 + 1, x0) * (1 - wx) + pixel(y0 + 1, x0 + 1) * wx
    return top * (1 - wy) + bottom * wy


RESIZE_OPS = {
    "upsample_bilinear": upsample_bilinear,
    "resize_bilinear": resize_bilinear,
    "upsample_nearest_neighbor": upsample_nearest_neighbor,
    "resize_nearest_neighbor": resize_nearest_neighbor,
    "crop": crop,
    "resample": resample,
    "pad": pad,
    "pixel_shuffle": pixel_shuffle,
    "pixel_unshuffle": pixel_unshuffle,
    "depth_to_space": depth_to_space,
    "space_to_depth": space_to_depth,
}
