"""MIL pooling, transposed convolution, normalization and resampling ops against PyTorch (method: test_mil_ops.py).

Inputs tell modes apart: ceil-mode sizes whose last window hangs past the padding (PyTorch counts neither
the overhang in an average nor lets it win a max), padding counted or not in an average, transposed
convolutions with stride, dilation, groups and output_padding, bilinear grids checked on the coremltools
docstring's own examples (an input [0, 1] makes the output equal its sampling grid), reflect padding (which
never repeats the edge) beside replicate, and TensorFlow's depth_to_space order beside PyTorch's pixel_shuffle.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.validate.test_mil_ops import Case, _check, _np, _randn, _t, run_op

I32 = np.int32
RNG = np.random.default_rng(4)


def _ints(*values) -> np.ndarray:
    return np.array(values, I32)


def _pool_cases() -> list[Case]:
    cases = []
    add = cases.append
    neg = -np.abs(_randn(1, 2, 7, 7)) - 1.0  # all negative: a 0 in padding or overhang would win
    tn = _t(neg)
    add(Case("max_pool_ceil_valid", "max_pool", {"x": neg, "kernel_sizes": _ints(2, 2), "strides": _ints(2, 2), "pad_type": "valid",
             "ceil_mode": np.bool_(True)}, _np(F.max_pool2d(tn, 2, 2, ceil_mode=True)), ulps=0, tags=["mode"]))
    x8 = -np.abs(_randn(1, 3, 8, 9)) - 1.0
    t8 = _t(x8)
    add(Case("max_pool_ceil_padded", "max_pool", {"x": x8, "kernel_sizes": _ints(3, 3), "strides": _ints(2, 2), "pad_type": "custom",
             "pad": _ints(1, 1, 1, 1), "ceil_mode": np.bool_(True)}, _np(F.max_pool2d(t8, 3, 2, padding=1, ceil_mode=True)), ulps=0, tags=["mode"]))
    x1 = _randn(2, 3, 10)
    add(Case("max_pool1d_ceil", "max_pool", {"x": x1, "kernel_sizes": _ints(3), "strides": _ints(2), "pad_type": "valid",
             "ceil_mode": np.bool_(True)}, _np(F.max_pool1d(_t(x1), 3, 2, ceil_mode=True)), ulps=0))
    p = _randn(1, 3, 8, 9)
    tp = _t(p)
    # 8 with k3 s2 p1 ceil: 5 windows, the last covering padded cells 8..10 of 10 (one cell of overhang)
    add(Case("avg_pool_ceil_counts_padding", "avg_pool", {"x": p, "kernel_sizes": _ints(3, 3), "strides": _ints(2, 2), "pad_type": "custom",
             "pad": _ints(1, 1, 1, 1), "ceil_mode": np.bool_(True), "exclude_padding_from_average": np.bool_(False)},
             _np(F.avg_pool2d(tp, 3, 2, padding=1, ceil_mode=True, count_include_pad=True)), tags=["mode"]))
    add(Case("avg_pool_ceil_excludes_padding", "avg_pool", {"x": p, "kernel_sizes": _ints(3, 3), "strides": _ints(2, 2), "pad_type": "custom",
             "pad": _ints(1, 1, 1, 1), "ceil_mode": np.bool_(True), "exclude_padding_from_average": np.bool_(True)},
             _np(F.avg_pool2d(tp, 3, 2, padding=1, ceil_mode=True, count_include_pad=False)), tags=["mode"]))
    add(Case("avg_pool_ceil_valid", "avg_pool", {"x": p, "kernel_sizes": _ints(2, 2), "strides": _ints(2, 2), "pad_type": "valid",
             "ceil_mode": np.bool_(True)}, _np(F.avg_pool2d(tp, 2, 2, ceil_mode=True)), tags=["mode"]))
    add(Case("avg_pool_floor", "avg_pool", {"x": p, "kernel_sizes": _ints(3, 2), "strides": _ints(1, 2), "pad_type": "valid"},
             _np(F.avg_pool2d(tp, (3, 2), (1, 2)))))
    add(Case("l2_pool", "l2_pool", {"x": p, "kernel_sizes": _ints(2, 3), "strides": _ints(2, 3), "pad_type": "valid"},
             _np(F.lp_pool2d(tp, 2, (2, 3), (2, 3))), ulps=8))
    return cases


def _conv_transpose_cases() -> list[Case]:
    cases = []
    add = cases.append
    x = _randn(1, 4, 5, 6)
    w = _randn(4, 3, 3, 2)  # (C_in, C_out/groups, kH, kW), groups 2 -> 6 outputs
    b = _randn(6)
    tx, tw, tb = _t(x), _t(w), _t(b)
    add(Case("conv_transpose_stride_dilation_groups", "conv_transpose",
             {"x": x, "weight": w, "bias": b, "pad_type": "custom", "pad": _ints(1, 1, 0, 1), "strides": _ints(2, 3),
              "dilations": _ints(2, 1), "groups": I32(2)},
             _np(F.conv_transpose2d(tx, tw, tb, stride=(2, 3), dilation=(2, 1), groups=2)[..., 1:-1, 0:-1]), ulps=32))
    full = F.conv_transpose2d(tx, tw, None, stride=2, padding=1, output_padding=1, groups=2)
    add(Case("conv_transpose_output_shape", "conv_transpose",
             {"x": x, "weight": w, "pad_type": "custom", "pad": _ints(1, 1, 1, 1), "strides": _ints(2, 2), "groups": I32(2),
              "output_shape": np.array(full.shape, I32)}, _np(full), ulps=32, tags=["mode"]))
    x1, w1 = _randn(2, 3, 7), _randn(3, 5, 4)
    add(Case("conv_transpose1d_valid", "conv_transpose", {"x": x1, "weight": w1, "pad_type": "valid", "strides": _ints(3)},
             _np(F.conv_transpose1d(_t(x1), _t(w1), stride=3)), ulps=32))
    return cases


def _norm_cases() -> list[Case]:
    cases = []
    add = cases.append
    x = _randn(2, 3, 4, 5, scale=0.1)
    tx = _t(x)
    mean, var, gamma, beta = _randn(3, scale=0.1), np.abs(_randn(3, scale=0.01)) + 1e-3, _randn(3), _randn(3)
    add(Case("batch_norm_eps", "batch_norm", {"x": x, "mean": mean, "variance": var, "gamma": gamma, "beta": beta, "epsilon": np.float32(1e-2)},
             _np(F.batch_norm(tx, _t(mean), _t(var), _t(gamma), _t(beta), eps=1e-2)), ulps=16, tags=["mode"]))
    add(Case("instance_norm", "instance_norm", {"x": x, "gamma": gamma, "beta": beta, "epsilon": np.float32(1e-2)},
             _np(F.instance_norm(tx, weight=_t(gamma), bias=_t(beta), eps=1e-2)), ulps=16, tags=["mode"]))
    x3 = _randn(2, 3, 6, scale=0.1)
    add(Case("instance_norm_1d_default_eps", "instance_norm", {"x": x3}, _np(F.instance_norm(_t(x3), eps=1e-5)), ulps=16))
    # l2_norm: the last three axes, per leading index (rank 4: per sample)
    add(Case("l2_norm", "l2_norm", {"x": x, "epsilon": np.float32(1e-6)},
             _np(tx / torch.sqrt(tx.square().sum((1, 2, 3), keepdim=True) + 1e-6)), ulps=8))
    lrn = _randn(1, 7, 3, 3, scale=3.0)  # alpha large enough that a shifted window changes the answer
    add(Case("local_response_norm", "local_response_norm", {"x": lrn, "size": I32(3), "alpha": np.float32(0.5), "beta": np.float32(0.75),
             "k": np.float32(2.0)}, _np(F.local_response_norm(_t(lrn), 3, alpha=0.5, beta=0.75, k=2.0)), ulps=16, tags=["mode"]))
    a, bm = _randn(2, 3, 4, 5), _randn(2, 5, 1, 6)  # H broadcast from 1
    add(Case("einsum_nchw_nwhu", "einsum", {"values": [a, bm], "equation": "nchw,nwhu->nchu"},
             _np(torch.einsum("nchw,nwhu->nchu", _t(a), _t(bm).expand(2, 5, 4, 6))), ulps=16))
    a3, b3 = _randn(3, 4, 5), _randn(5, 4, 2)
    add(Case("einsum_chw_whr", "einsum", {"values": [a3, b3], "equation": "abc,cbd->abd"}, _np(torch.einsum("abc,cbd->abd", _t(a3), _t(b3))), ulps=16))
    return cases


def _resize_cases() -> list[Case]:
    cases = []
    add = cases.append
    ramp = np.array([0.0, 1.0], np.float32).reshape(1, 1, 1, 2)  # the output is the grid itself
    grids = {  # coremltools' resize_bilinear docstring, X_in = 2
        ("UNALIGN_CORNERS", 5): [0.0, 0.1, 0.5, 0.9, 1.0], ("STRICT_ALIGN_CORNERS", 5): [0.0, 0.25, 0.5, 0.75, 1.0],
        ("DEFAULT", 5): [0.0, 0.4, 0.8, 1.0, 1.0], ("OFFSET_CORNERS", 5): [0.1, 0.3, 0.5, 0.7, 0.9],
        ("UNALIGN_CORNERS", 6): [0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0], ("ALIGN_CORNERS", 6): [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
        ("DEFAULT", 6): [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0],
        ("OFFSET_CORNERS", 6): [1 / 12, 0.25, 5 / 12, 7 / 12, 0.75, 11 / 12],
    }
    for (mode, size), grid in grids.items():
        add(Case(f"resize_bilinear_{mode.lower()}_{size}", "resize_bilinear",
                 {"x": ramp, "target_size_height": I32(1), "target_size_width": I32(size), "sampling_mode": mode},
                 np.array(grid, np.float32).reshape(1, 1, 1, size), ulps=4, tags=["mode"]))
    add(Case("resize_bilinear_align_corners_one", "resize_bilinear",
             {"x": ramp, "target_size_height": I32(1), "target_size_width": I32(1), "sampling_mode": "ALIGN_CORNERS"},
             np.full((1, 1, 1, 1), 0.5, np.float32), tags=["mode"]))
    x = _randn(1, 2, 5, 6)
    tx = _t(x)
    add(Case("resize_bilinear_unaligned_vs_torch", "resize_bilinear",
             {"x": x, "target_size_height": I32(7), "target_size_width": I32(9), "sampling_mode": "UNALIGN_CORNERS"},
             _np(F.interpolate(tx, size=(7, 9), mode="bilinear", align_corners=False)), ulps=16))
    add(Case("upsample_bilinear_align_corners", "upsample_bilinear",
             {"x": x, "scale_factor_height": np.float32(2.0), "scale_factor_width": np.float32(1.5), "align_corners": np.bool_(True)},
             _np(F.interpolate(tx, size=(10, 9), mode="bilinear", align_corners=True)), ulps=16, tags=["mode"]))
    add(Case("upsample_bilinear_half_pixel", "upsample_bilinear",
             {"x": x, "scale_factor_height": I32(2), "scale_factor_width": I32(3), "align_corners": np.bool_(False)},
             _np(F.interpolate(tx, scale_factor=(2, 3), mode="bilinear", align_corners=False)), ulps=16, tags=["mode"]))
    add(Case("upsample_bilinear_legacy_grid", "upsample_bilinear",
             {"x": ramp, "scale_factor_height": I32(1), "scale_factor_width": np.float32(2.5), "align_corners": np.bool_(False),
              "half_pixel_centers": np.bool_(False)}, np.array([0.0, 0.4, 0.8, 1.0, 1.0], np.float32).reshape(1, 1, 1, 5), tags=["mode"]))
    add(Case("upsample_nearest_integer", "upsample_nearest_neighbor", {"x": x, "scale_factor_height": I32(2), "scale_factor_width": I32(3)},
             _np(F.interpolate(tx, scale_factor=(2, 3), mode="nearest")), exact=True))
    add(Case("upsample_nearest_fraction", "upsample_nearest_neighbor",
             {"x": x, "scale_factor_height": np.float32(1.5), "scale_factor_width": np.float32(2.5)},
             _np(F.interpolate(tx, scale_factor=(1.5, 2.5), mode="nearest")), exact=True, tags=["mode"]))
    add(Case("resize_nearest_neighbor", "resize_nearest_neighbor", {"x": x, "target_size_height": I32(7), "target_size_width": I32(4)},
             _np(F.interpolate(tx, size=(7, 4), mode="nearest")), exact=True))
    add(Case("crop", "crop", {"x": x, "crop_height": _ints(1, 2), "crop_width": _ints(0, 3)}, x[..., 1:3, 0:3], exact=True))
    for case_id, mode in (("pad_reflect", "reflect"), ("pad_replicate", "replicate")):
        add(Case(case_id, "pad", {"x": x, "pad": _ints(2, 1, 1, 3), "mode": mode},
                 _np(F.pad(tx, (1, 3, 2, 1), mode=mode)), exact=True, tags=["mode"]))
    add(Case("pad_constant_last_axis", "pad", {"x": x, "pad": _ints(0, 2), "mode": "constant", "constant_val": np.float32(-1.5)},
             _np(F.pad(tx, (0, 2), value=-1.5)), exact=True))
    add(Case("pad_constant_all_axes", "pad", {"x": x, "pad": _ints(0, 0, 1, 0, 0, 1, 2, 0)},
             _np(F.pad(tx, (2, 0, 0, 1, 1, 0))), exact=True))
    # resample is grid_sample; coordinates reach past [-1, 1] so every padding mode shows
    grid = RNG.uniform(-1.4, 1.4, (1, 4, 3, 2)).astype(np.float32)
    for case_id, params, torch_args in (
        ("resample_bilinear_zeros", {"padding_mode": "constant", "align_corners": np.bool_(False)}, ("bilinear", "zeros", False)),
        ("resample_bilinear_border_aligned", {"padding_mode": "border", "align_corners": np.bool_(True)}, ("bilinear", "border", True)),
        ("resample_bilinear_reflection", {"padding_mode": "reflection", "align_corners": np.bool_(True)}, ("bilinear", "reflection", True)),
        ("resample_bilinear_symmetric", {"padding_mode": "symmetric", "align_corners": np.bool_(False)}, ("bilinear", "reflection", False)),
        ("resample_nearest_zeros", {"sampling_mode": "nearest", "padding_mode": "constant", "align_corners": np.bool_(False)}, ("nearest", "zeros", False)),
    ):
        mode, pad_mode, align = torch_args
        add(Case(case_id, "resample", {"x": x, "coordinates": grid, "sampling_mode": "bilinear", "coordinates_mode": "normalized_minus_one_to_one",
                 "padding_value": np.float32(0.0), **params},
                 _np(F.grid_sample(tx, _t(grid), mode=mode, padding_mode=pad_mode, align_corners=align)), ulps=16, tags=["mode"]))
    c = _randn(1, 8, 2, 3)
    add(Case("pixel_shuffle", "pixel_shuffle", {"x": c, "upscale_factor": I32(2)}, _np(F.pixel_shuffle(_t(c), 2)), exact=True))
    add(Case("pixel_unshuffle", "pixel_unshuffle", {"x": x[:, :, :4, :], "downscale_factor": I32(2)},
             _np(F.pixel_unshuffle(tx[:, :, :4, :], 2)), exact=True))
    # tf.nn.depth_to_space's own example (NHWC [1, 1, 1, 12] -> [1, 2, 2, 3]), in NCHW: channel (i*2 + j)*3 + c
    d2s = np.arange(1, 13, dtype=np.float32).reshape(1, 12, 1, 1)
    expected = np.array([[[1, 4], [7, 10]], [[2, 5], [8, 11]], [[3, 6], [9, 12]]], np.float32)[None]
    add(Case("depth_to_space_tf_order", "depth_to_space", {"x": d2s, "block_size": I32(2)}, expected, exact=True, tags=["mode"]))
    add(Case("space_to_depth_inverts_it", "space_to_depth", {"x": expected, "block_size": I32(2)}, d2s, exact=True))
    return cases


CASES = _pool_cases() + _conv_transpose_cases() + _norm_cases() + _resize_cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op_matches_pytorch(case):
    outputs = len(case.expected) if isinstance(case.expected, list) else 1
    _check(case, run_op(case.op, case.params, case.dtype, outputs), case.expected)


def test_ceil_mode_output_sizes_follow_pytorch():
    """The sizes the executor gives are PyTorch's for ceil_mode across odd and even inputs, padding and strides."""
    for size in range(5, 12):
        for kernel, stride, pad in ((2, 2, 0), (3, 2, 0), (3, 2, 1), (3, 3, 1)):
            x = _randn(1, 1, size, size)
            got = run_op("max_pool", {"x": x, "kernel_sizes": _ints(kernel, kernel), "strides": _ints(stride, stride), "pad_type": "custom",
                                      "pad": _ints(pad, pad, pad, pad), "ceil_mode": np.bool_(True)})
            expected = F.max_pool2d(_t(x), kernel, stride, padding=pad, ceil_mode=True)
            assert got.shape == tuple(expected.shape), (size, kernel, stride, pad)
            np.testing.assert_array_equal(got, _np(expected))
    assert math.isfinite(float(got.max()))


def test_a_ceil_mode_window_past_the_input_is_refused():
    """Kernel 1, stride 3 over 5: coremltools' size rule keeps a window that starts past the input (PyTorch drops
    it); it would hold no value, so the executor refuses it rather than invent one."""
    from edgeq.validate.mil import UnsupportedOp

    with pytest.raises(UnsupportedOp, match="ceil_mode with kernel 1 < stride 3"):
        run_op("max_pool", {"x": _randn(1, 1, 5), "kernel_sizes": _ints(1), "strides": _ints(3), "pad_type": "valid",
                            "ceil_mode": np.bool_(True)})
