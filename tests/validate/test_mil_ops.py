"""Every op of edgeq's MIL reference executor against PyTorch, with inputs that tell the modes apart.

Each case runs one op through `MILExecutor` (a one-op `main` function built in code: no coremltools, no
conversion) and compares it with the PyTorch function that means the same thing. Inputs are chosen so that a
wrong mode gives a wrong answer, not a close one: exact GELU where erf and tanh differ by ~5e-4, layer_norm
with an epsilon as large as the variance, quantize at exact .5 ties, `same` padding with even kernels (odd
total padding), max_pool over negative values (-inf padding, not 0), `>=` at the threshold itself, casts of
negative fractions (truncation, not floor), square matrices for transposes.

Float32 paths are held to float32 precision (a few ulp); fp16-typed results must be the float32 result
rounded to float16 once per op: `test_fp16_is_rounded_per_op` proves the emulation is there and measurable.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeq.validate.mil import OPS, MILExecutor
from edgeq.validate.mil.program import Const, Function, Op, Program, ValueType

RNG = np.random.default_rng(0)


def _randn(*shape, scale=1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _t(array) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


class Ref(str):
    """An op input bound to a named value (a function input or an earlier op's output), not an immediate."""


def _bind(value) -> list:
    if isinstance(value, Ref):
        return [str(value)]
    if isinstance(value, list):  # variadic parameters (concat's values)
        return [Const(np.asarray(v)) for v in value]
    return [Const(value if isinstance(value, str) else np.asarray(value))]


def mil_op(op_type: str, outputs: list[tuple[str, str]], **params) -> Op:
    return Op(op_type, f"{op_type}_op", {k: _bind(v) for k, v in params.items()}, {}, [(n, ValueType(d, None)) for n, d in outputs])


def program(ops: list[Op], outputs: list[str], inputs: list[tuple[str, ValueType]] = ()) -> Program:
    return Program(Path("in-memory.mlpackage"), {"main": Function("main", "CoreML7", list(inputs), ops, outputs)})


def run_op(op_type: str, params: dict, dtype: str = "float32", outputs: int = 1):
    """The op's outputs as the executor returns them (declared `dtype`), one array or a list of them."""
    names = [f"out{i}" for i in range(outputs)]
    executor = MILExecutor(program([mil_op(op_type, [(n, dtype) for n in names], **params)], names))
    result = executor.run({})
    return result[names[0]] if outputs == 1 else [result[n] for n in names]


@dataclass
class Case:
    id: str
    op: str
    params: dict
    expected: object  # np.ndarray or a list of them (torch's answer)
    dtype: str = "float32"
    ulps: float = 4  # float32 tolerance in units of float32 epsilon, relative to the output's scale
    exact: bool = False  # integer, bool and data-movement results: bit for bit
    fp16: bool = True  # also checked with an fp16-typed output (float ops only)
    tags: list[str] = field(default_factory=list)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    x, y = _randn(3, 5), _randn(1, 5)  # broadcasting
    tx, ty = _t(x), _t(y)
    for name, fn in (("add", torch.add), ("sub", torch.sub), ("mul", torch.mul), ("real_div", torch.div),
                     ("maximum", torch.maximum), ("minimum", torch.minimum)):
        add(Case(name, name, {"x": x, "y": y}, _np(fn(tx, ty)), ulps=0))
    ties = np.array([[1.0, -2.0, 3.0], [0.5, 0.5, -1.0]], np.float32)
    add(Case("greater_equal", "greater_equal", {"x": ties, "y": np.float32(0.5)}, _np(_t(ties) >= 0.5), "bool", exact=True, fp16=False))
    a, b = RNG.random((4, 4)) > 0.5, RNG.random((4, 4)) > 0.5
    add(Case("logical_and", "logical_and", {"x": a, "y": b}, _np(torch.logical_and(_t(a), _t(b))), "bool", exact=True, fp16=False))

    z = _randn(4, 6, scale=3.0)
    tz = _t(z)
    add(Case("relu", "relu", {"x": z}, _np(F.relu(tz)), ulps=0))
    add(Case("tanh", "tanh", {"x": z}, _np(torch.tanh(tz))))
    add(Case("sigmoid", "sigmoid", {"x": z}, _np(torch.sigmoid(tz))))
    # torch's hardsigmoid is MIL's sigmoid_hard with alpha 1/6, beta 1/2; z reaches both saturations
    add(Case("sigmoid_hard", "sigmoid_hard", {"x": z * 2, "alpha": np.float32(1 / 6), "beta": np.float32(0.5)}, _np(F.hardsigmoid(tz * 2))))
    at = np.array([[-1.0, 0.25, 0.5, 0.75, 2.0]], np.float32)  # 0.5 itself: MIL keeps x where x >= alpha
    add(Case("thresholded_relu", "thresholded_relu", {"x": at, "alpha": np.float32(0.5)}, _np(torch.where(_t(at) >= 0.5, _t(at), 0.0)), ulps=0))
    add(Case("clip", "clip", {"x": z, "alpha": np.float32(-1.0), "beta": np.float32(2.0)}, _np(torch.clamp(tz, -1.0, 2.0)), ulps=0))

    # GELU: erf and tanh differ by up to 5e-4 on [-4, 4]: 1000x float32 noise, so a swapped mode cannot pass
    g = np.linspace(-4, 4, 161, dtype=np.float32).reshape(7, 23)
    tg = _t(g)
    add(Case("gelu_exact", "gelu", {"x": g, "mode": "EXACT"}, _np(F.gelu(tg, approximate="none")), tags=["mode"]))
    add(Case("gelu_default_is_exact", "gelu", {"x": g}, _np(F.gelu(tg, approximate="none")), tags=["mode"]))
    add(Case("gelu_tanh", "gelu", {"x": g, "mode": "TANH_APPROXIMATION"}, _np(F.gelu(tg, approximate="tanh")), tags=["mode"]))
    add(Case("gelu_sigmoid", "gelu", {"x": g, "mode": "SIGMOID_APPROXIMATION"}, _np(tg * torch.sigmoid(1.702 * tg)), tags=["mode"]))

    s = _randn(2, 3, 4)
    add(Case("softmax_axis1", "softmax", {"x": s * 4, "axis": np.int32(1)}, _np(torch.softmax(_t(s * 4), dim=1))))
    add(Case("softmax_last", "softmax", {"x": s * 4}, _np(torch.softmax(_t(s * 4), dim=-1))))
    cond = RNG.random((3, 5)) > 0.5
    add(Case("select", "select", {"cond": cond, "a": x, "b": np.float32(-7.0)}, _np(torch.where(_t(cond), tx, -7.0)), ulps=0))

    fractions = np.array([-2.7, -1.5, -0.5, 0.5, 1.5, 2.7, 100.9], np.float32)
    add(Case("cast_to_int32_truncates", "cast", {"x": fractions, "dtype": "int32"}, _np(_t(fractions).to(torch.int32)), "int32", exact=True, fp16=False))
    add(Case("cast_to_fp16", "cast", {"x": z / 3, "dtype": "fp16"}, _np(_t(z / 3).half()), "float16", exact=True, fp16=False))
    add(Case("cast_to_bool", "cast", {"x": np.array([0.0, -0.0, 0.5, -2.0], np.float32), "dtype": "bool"},
             np.array([False, False, True, True]), "bool", exact=True, fp16=False))

    w, bias, xin = _randn(5, 7), _randn(5), _randn(3, 7)  # weight (D_out, D_in): a transposed weight cannot fit
    add(Case("linear", "linear", {"x": xin, "weight": w, "bias": bias}, _np(F.linear(_t(xin), _t(w), _t(bias)))))
    add(Case("linear_no_bias", "linear", {"x": xin, "weight": w}, _np(F.linear(_t(xin), _t(w)))))
    m1, m2 = _randn(2, 4, 4), _randn(2, 4, 4)  # square: a wrong transpose gives wrong values, not a shape error
    for tx_, ty_ in ((False, False), (True, False), (False, True), (True, True)):
        left, right = _t(m1).transpose(-1, -2) if tx_ else _t(m1), _t(m2).transpose(-1, -2) if ty_ else _t(m2)
        add(Case(f"matmul_tx{int(tx_)}_ty{int(ty_)}", "matmul", {"x": m1, "y": m2, "transpose_x": np.bool_(tx_), "transpose_y": np.bool_(ty_)},
                 _np(left @ right)))

    # layer_norm: the variance (~1e-2) is as large as epsilon, so dropping epsilon changes the output by ~30%
    ln = _randn(2, 3, 8, scale=0.1)
    gamma, beta = _randn(8), _randn(8)
    add(Case("layer_norm_eps", "layer_norm", {"x": ln, "axes": np.array([-1], np.int32), "gamma": gamma, "beta": beta, "epsilon": np.float32(1e-2)},
             _np(F.layer_norm(_t(ln), (8,), _t(gamma), _t(beta), eps=1e-2)), ulps=16, tags=["mode"]))
    gamma2 = _randn(3, 8)
    add(Case("layer_norm_two_axes", "layer_norm", {"x": ln, "axes": np.array([1, 2], np.int32), "gamma": gamma2, "epsilon": np.float32(5e-3)},
             _np(F.layer_norm(_t(ln), (3, 8), _t(gamma2), None, eps=5e-3)), ulps=16))
    lm = ln.transpose(0, 2, 1).copy()  # normalized over a middle axis: gamma placed on that axis
    add(Case("layer_norm_middle_axis", "layer_norm", {"x": lm, "axes": np.array([1], np.int32), "gamma": gamma, "beta": beta, "epsilon": np.float32(1e-2)},
             _np(F.layer_norm(_t(ln), (8,), _t(gamma), _t(beta), eps=1e-2).transpose(1, 2)), ulps=16))
    # MIL's default epsilon is 1e-5 (coremltools' layer_norm definition)
    add(Case("layer_norm_default_eps", "layer_norm", {"x": ln * 0.01, "axes": np.array([-1], np.int32)},
             _np(F.layer_norm(_t(ln * 0.01), (8,), eps=1e-5)), ulps=16))

    r = _randn(2, 3, 4)
    tr = _t(r)
    add(Case("reduce_mean_keep", "reduce_mean", {"x": r, "axes": np.array([1], np.int32), "keep_dims": np.bool_(True)}, _np(tr.mean(1, keepdim=True))))
    add(Case("reduce_mean_all", "reduce_mean", {"x": r}, _np(tr.mean())))
    add(Case("reduce_sum_two_axes", "reduce_sum", {"x": r, "axes": np.array([0, -1], np.int32)}, _np(tr.sum((0, 2)))))
    add(Case("reduce_l2_norm", "reduce_l2_norm", {"x": r, "axes": np.array([-1], np.int32), "keep_dims": np.bool_(True)},
             _np(torch.linalg.vector_norm(tr, dim=-1, keepdim=True))))

    e = _randn(2, 3)
    add(Case("expand_dims", "expand_dims", {"x": e, "axes": np.array([0, -1], np.int32)}, _np(_t(e).unsqueeze(0).unsqueeze(-1)), exact=True))
    add(Case("expand_dims_middle", "expand_dims", {"x": e, "axes": np.array([1], np.int32)}, _np(_t(e).unsqueeze(1)), exact=True))
    add(Case("tile", "tile", {"x": e, "reps": np.array([2, 3], np.int32)}, _np(_t(e).tile((2, 3))), exact=True))
    add(Case("reshape_zero_keeps_axis", "reshape", {"x": r, "shape": np.array([0, 4, -1], np.int32)}, _np(tr.reshape(2, 4, 3)), exact=True))
    add(Case("transpose", "transpose", {"x": r, "perm": np.array([2, 0, 1], np.int32)}, _np(tr.permute(2, 0, 1)), exact=True))
    sq = _randn(1, 3, 1, 2)
    add(Case("squeeze_axes", "squeeze", {"x": sq, "axes": np.array([2], np.int32)}, _np(_t(sq).squeeze(2)), exact=True))
    add(Case("squeeze_all", "squeeze", {"x": sq}, _np(_t(sq).squeeze()), exact=True))
    add(Case("concat", "concat", {"values": [r, r * 2], "axis": np.int32(-2)}, _np(torch.cat([tr, tr * 2], dim=-2)), exact=True))
    sp = _randn(2, 7)
    add(Case("split_sizes", "split", {"x": sp, "axis": np.int32(1), "split_sizes": np.array([2, 5], np.int32)},
             [_np(p) for p in torch.split(_t(sp), [2, 5], dim=1)], exact=True))
    # 7 in 3 pieces: MIL makes ceil(7/3)=3, 3, 1, as torch.split(x, 3) does
    add(Case("split_uneven", "split", {"x": sp, "axis": np.int32(-1), "num_splits": np.int32(3)},
             [_np(p) for p in torch.split(_t(sp), 3, dim=1)], exact=True))
    sl = _randn(4, 6, 5)
    add(Case("slice_by_index", "slice_by_index",
             {"x": sl, "begin": np.array([1, 0, 2], np.int32), "end": np.array([3, 5, 0], np.int32), "stride": np.array([1, 2, 1], np.int32),
              "begin_mask": np.array([False, True, False]), "end_mask": np.array([False, False, True]), "squeeze_mask": np.array([False, False, False])},
             _np(_t(sl)[1:3, 0:5:2, 2:]), exact=True))
    add(Case("slice_by_index_squeeze", "slice_by_index",
             {"x": sl, "begin": np.array([2, 1, 0], np.int32), "end": np.array([3, 4, 5], np.int32),
              "squeeze_mask": np.array([True, False, False])}, _np(_t(sl)[2, 1:4, 0:5]), exact=True))
    gx = _randn(5, 4)
    idx = np.array([[4, 0], [-1, 2]], np.int32)
    add(Case("gather_axis1", "gather", {"x": gx, "indices": idx % 4, "axis": np.int32(1)}, _np(_t(gx)[:, _t((idx % 4).astype(np.int64))]), exact=True))
    add(Case("gather_negative", "gather", {"x": gx, "indices": idx}, _np(_t(gx)[_t(idx.astype(np.int64))]), exact=True))
    nd = np.array([[0, 3], [4, 1], [2, 2]], np.int32)
    add(Case("gather_nd", "gather_nd", {"x": gx, "indices": nd}, _np(_t(gx)[_t(nd[:, 0].astype(np.int64)), _t(nd[:, 1].astype(np.int64))]), exact=True))

    cases.extend(_conv_cases())
    cases.extend(_quantization_cases())
    return cases


def _conv_cases() -> list[Case]:
    cases = []
    x = _randn(1, 4, 9, 8)
    w = _randn(6, 2, 4, 2)  # groups=2; even kernel: `same` needs odd total padding on both axes
    bias = _randn(6)
    tx, tw, tb = _t(x), _t(w), _t(bias)
    x1, w1 = _randn(2, 3, 11), _randn(5, 3, 4)
    # torch's padding="same" puts the odd pixel at the end (right/bottom), as Core ML's `same` (coremltools'
    # torch frontend maps padding="same" to pad_type "same"); `same_lower` puts it at the start.
    with warnings.catch_warnings():  # torch notes that an even kernel needs a padded copy of the input
        warnings.simplefilter("ignore", UserWarning)
        same_2d = F.conv2d(tx, tw, tb, padding="same", groups=2)
        same_1d = F.conv1d(_t(x1), _t(w1), padding="same")
    cases.append(Case("conv_same_even_kernel", "conv", {"x": x, "weight": w, "bias": bias, "pad_type": "same", "groups": np.int32(2)},
                      _np(same_2d), ulps=32, tags=["mode"]))
    cases.append(Case("conv_same_lower", "conv", {"x": x, "weight": w, "bias": bias, "pad_type": "same_lower", "groups": np.int32(2)},
                      _np(F.conv2d(F.pad(tx, (1, 0, 2, 1)), tw, tb, groups=2)), ulps=32, tags=["mode"]))
    # stride 2: output ceil(9/2) x ceil(8/2); total padding (4-1)+1-... per axis, extra at the end
    # h: (5-1)*2 + 4 - 9 = 3 -> (1, 2); w: (4-1)*2 + 2 - 8 = 0 -> (0, 0)
    cases.append(Case("conv_same_stride2", "conv",
                      {"x": x, "weight": w, "pad_type": "same", "groups": np.int32(2), "strides": np.array([2, 2], np.int32)},
                      _np(F.conv2d(F.pad(tx, (0, 0, 1, 2)), tw, None, stride=2, groups=2)), ulps=32, tags=["mode"]))
    w3 = _randn(4, 1, 3, 3)
    cases.append(Case("conv_custom_dilated_depthwise", "conv",
                      {"x": x, "weight": w3, "pad_type": "custom", "pad": np.array([2, 0, 1, 3], np.int32),
                       "dilations": np.array([2, 1], np.int32), "groups": np.int32(4)},
                      _np(F.conv2d(F.pad(tx, (1, 3, 2, 0)), _t(w3), dilation=(2, 1), groups=4)), ulps=32))
    cases.append(Case("conv_valid", "conv", {"x": x, "weight": w, "pad_type": "valid", "groups": np.int32(2)},
                      _np(F.conv2d(tx, tw, groups=2)), ulps=32))
    cases.append(Case("conv1d_same", "conv", {"x": x1, "weight": w1, "pad_type": "same"}, _np(same_1d), ulps=32, tags=["mode"]))
    # max_pool over negative values: padding must be -inf (a 0 would win every window at the border)
    neg = -np.abs(_randn(1, 2, 7, 6)) - 1.0
    tn = _t(neg)
    # kernel 2x3, stride 2: h: (4-1)*2 + 2 - 7 = 1 -> (0, 1); w: (3-1)*2 + 3 - 6 = 1 -> (0, 1)
    cases.append(Case("max_pool_same", "max_pool",
                      {"x": neg, "kernel_sizes": np.array([2, 3], np.int32), "strides": np.array([2, 2], np.int32), "pad_type": "same"},
                      _np(F.max_pool2d(F.pad(tn, (0, 1, 0, 1), value=-math.inf), (2, 3), 2)), ulps=0, tags=["mode"]))
    cases.append(Case("max_pool_same_lower", "max_pool",
                      {"x": neg, "kernel_sizes": np.array([2, 3], np.int32), "strides": np.array([2, 2], np.int32), "pad_type": "same_lower"},
                      _np(F.max_pool2d(F.pad(tn, (1, 0, 1, 0), value=-math.inf), (2, 3), 2)), ulps=0, tags=["mode"]))
    cases.append(Case("max_pool_custom", "max_pool",
                      {"x": neg, "kernel_sizes": np.array([3, 3], np.int32), "strides": np.array([1, 2], np.int32), "pad_type": "custom",
                       "pad": np.array([1, 1, 0, 2], np.int32)},
                      _np(F.max_pool2d(F.pad(tn, (0, 2, 1, 1), value=-math.inf), 3, (1, 2))), ulps=0))
    return cases


def _quantization_cases() -> list[Case]:
    cases = []
    # x / scale lands exactly on k + 0.5 (scale a power of two): round half to even (torch.round, numpy.around),
    # so 0.5 -> 0, 1.5 -> 2, -0.5 -> -0, 2.5 -> 2; half-up or half-away-from-zero give other codes.
    ties = (np.arange(-6, 6, dtype=np.float32) + 0.5) * 0.25
    wide = np.concatenate([ties, np.array([40.0, -40.0, 31.875, -32.125], np.float32)])  # and saturation
    tw = _t(wide)
    expected = torch.clamp(torch.round(tw / 0.25), -128, 127).to(torch.int8)
    cases.append(Case("quantize_ties_int8", "quantize", {"input": wide, "scale": np.float32(0.25), "output_dtype": "int8"},
                      _np(expected), "int8", exact=True, fp16=False, tags=["mode"]))
    expected_u8 = torch.clamp(torch.round(tw / 0.25) + 3, 0, 255).to(torch.uint8)
    cases.append(Case("quantize_ties_uint8_zero_point", "quantize",
                      {"input": wide, "scale": np.float32(0.25), "zero_point": np.uint8(3), "output_dtype": "uint8"},
                      _np(expected_u8), "uint8", exact=True, fp16=False, tags=["mode"]))
    per_axis = wide[:12].reshape(3, 4)
    scales = np.array([0.25, 0.5, 0.125], np.float32)
    zeros = np.array([0, 1, -2], np.int8)
    expected_axis = torch.clamp(torch.round(_t(per_axis) / _t(scales)[:, None]) + _t(zeros.astype(np.float32))[:, None], -128, 127).to(torch.int8)
    cases.append(Case("quantize_per_axis", "quantize",
                      {"input": per_axis, "scale": scales, "zero_point": zeros, "axis": np.int32(0), "output_dtype": "int8"},
                      _np(expected_axis), "int8", exact=True, fp16=False, tags=["mode"]))
    codes = RNG.integers(-128, 128, (3, 4)).astype(np.int8)
    deq = (_t(codes.astype(np.float32)) - _t(zeros.astype(np.float32))[:, None]) * _t(scales)[:, None]
    cases.append(Case("dequantize_per_axis", "dequantize", {"input": codes, "scale": scales, "zero_point": zeros, "axis": np.int32(0)}, _np(deq), ulps=0))
    ucodes = RNG.integers(0, 256, (2, 5)).astype(np.uint8)
    cases.append(Case("dequantize_uint8", "dequantize", {"input": ucodes, "scale": np.float32(0.1), "zero_point": np.uint8(128)},
                      _np((_t(ucodes.astype(np.float32)) - 128) * np.float32(0.1)), ulps=0))
    codes_t = RNG.integers(-128, 128, (4, 3)).astype(np.int8)
    scale_1 = np.array([0.5, 0.25, 0.125], np.float32)
    cases.append(Case("constexpr_affine_dequantize_axis1", "constexpr_affine_dequantize",
                      {"quantized_data": codes_t, "scale": scale_1, "zero_point": np.array([1, 0, -1], np.int8), "axis": np.int32(1)},
                      _np((_t(codes_t.astype(np.float32)) - _t(np.array([1, 0, -1], np.float32))) * _t(scale_1)), ulps=0))
    data = RNG.integers(-128, 128, (4, 6)).astype(np.int8)
    block_scale, block_offset = RNG.uniform(0.01, 0.1, (2, 3)).astype(np.float32), RNG.integers(-3, 3, (2, 3)).astype(np.int8)
    rep = lambda t: _t(t).repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)  # noqa: E731
    cases.append(Case("constexpr_blockwise_shift_scale", "constexpr_blockwise_shift_scale",
                      {"data": data, "scale": block_scale, "offset": block_offset},
                      _np((_t(data.astype(np.float32)) - rep(block_offset.astype(np.float32))) * rep(block_scale)), ulps=0))
    cases.extend(_low_bit_cases())
    return cases


def _low_bit_cases() -> list[Case]:
    """Palettes and sparsity (tests/validate/test_mil_lowbit.py holds them to coremltools' own decompression on
    real artifacts). Indices arrive unpacked (the reader unpacks sub-byte types); iOS16 forms pack their own."""
    cases = []
    # 4 tables over the rows (blocks of 2 rows) x 1 over the columns: row r reads table r // 2
    idx = RNG.integers(0, 4, (8, 5)).astype(np.uint8)
    lut = _randn(4, 1, 4, 1)
    rows = _t(np.arange(8) // 2)
    per_row = _t(lut[:, 0, :, 0])[rows]  # (8, 4): the table each row reads
    cases.append(Case("constexpr_lut_to_dense_grouped", "constexpr_lut_to_dense", {"indices": idx, "lut": lut},
                      _np(torch.gather(per_row, 1, _t(idx.astype(np.int64)))), exact=True, fp16=False, tags=["mode"]))
    # vector palette: each index writes 2 consecutive values along axis 0
    vidx = RNG.integers(0, 2, (3, 4)).astype(np.uint8)
    vlut = _randn(1, 1, 2, 2)
    vectors = _t(vlut[0, 0])[_t(vidx.astype(np.int64))]  # (3, 4, 2)
    cases.append(Case("constexpr_lut_to_dense_vector", "constexpr_lut_to_dense", {"indices": vidx, "lut": vlut, "vector_axis": np.int32(0)},
                      _np(vectors.permute(0, 2, 1).reshape(6, 4)), exact=True, fp16=False, tags=["mode"]))
    # iOS16: 2-bit indices packed LSB first in a uint8 vector, one table, a `shape`
    flat = RNG.integers(0, 4, 10)
    packed = np.array([sum(int(v) << (2 * (k % 4)) for k, v in enumerate(flat[i : i + 4])) for i in range(0, 10, 4)], np.uint8)
    table = _randn(4)
    cases.append(Case("constexpr_lut_to_dense_ios16", "constexpr_lut_to_dense", {"indices": packed, "lut": table, "shape": np.array([2, 5], np.uint32)},
                      _np(_t(table)[_t(flat)].reshape(2, 5)), exact=True, fp16=False, tags=["mode"]))
    mask = RNG.random((3, 4)) > 0.5
    nonzero = _randn(int(mask.sum()))
    dense = torch.zeros(3, 4)
    dense[_t(mask)] = _t(nonzero)
    cases.append(Case("constexpr_sparse_to_dense", "constexpr_sparse_to_dense", {"nonzero_data": nonzero, "mask": mask.astype(np.uint8)},
                      _np(dense), exact=True, fp16=False))
    mask_bytes = np.packbits(mask.reshape(-1), bitorder="little")  # iOS16: one bit per element, LSB first
    cases.append(Case("constexpr_sparse_to_dense_ios16", "constexpr_sparse_to_dense",
                      {"nonzero_data": nonzero, "mask": mask_bytes, "shape": np.array([3, 4], np.uint32)}, _np(dense), exact=True, fp16=False))
    sparse_idx = RNG.integers(0, 4, int(mask.sum())).astype(np.uint8)
    cases.append(Case("constexpr_lut_to_sparse", "constexpr_lut_to_sparse",
                      {"indices_mask": mask.astype(np.uint8), "indices_nonzero_data": sparse_idx, "lut": table.reshape(1, 1, 4, 1)},
                      [mask.astype(np.float32), _np(_t(table)[_t(sparse_idx.astype(np.int64))])], exact=True, fp16=False))
    codes = RNG.integers(-8, 8, int(mask.sum())).astype(np.int8)
    col_scale, col_offset = RNG.uniform(0.01, 0.1, (1, 4)).astype(np.float32), RNG.integers(-2, 2, (1, 4)).astype(np.int8)
    cols = _t(np.nonzero(mask)[1])  # the column of each non-zero, row-major
    expected = (_t(codes.astype(np.float32)) - _t(col_offset[0].astype(np.float32))[cols]) * _t(col_scale[0])[cols]
    cases.append(Case("constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_blockwise_shift_scale",
                      {"data_mask": mask.astype(np.uint8), "nonzero_data": codes, "scale": col_scale, "offset": col_offset},
                      [mask.astype(np.float32), _np(expected)], ulps=0, fp16=False))
    return cases


CASES = _cases()


def _check(case: Case, got, expected) -> None:
    got_list = got if isinstance(got, list) else [got]
    expected_list = expected if isinstance(expected, list) else [expected]
    assert len(got_list) == len(expected_list), case.id
    for g, e in zip(got_list, expected_list):
        e = np.asarray(e)
        assert g.shape == e.shape, (case.id, g.shape, e.shape)
        if case.exact or g.dtype.kind in "iub":
            np.testing.assert_array_equal(g, e.astype(g.dtype), err_msg=case.id)
        else:
            scale = _magnitude(case, e)
            atol = case.ulps * float(np.finfo(np.float32).eps) * scale
            np.testing.assert_allclose(g, e, rtol=0, atol=atol, err_msg=case.id)


def _magnitude(case: Case, expected: np.ndarray) -> float:
    """The scale float32 rounding errors are relative to: the largest operand or result (a mean of values
    that cancel is exact only to eps times its terms)."""
    floats = [np.abs(v).max() for v in case.params.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.size]
    return float(max([np.abs(expected).max(), *floats])) or 1.0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op_matches_pytorch(case):
    outputs = len(case.expected) if isinstance(case.expected, list) else 1
    _check(case, run_op(case.op, case.params, case.dtype, outputs), case.expected)


def test_every_op_has_a_case():
    """A new op in the executor gets a case here or in a test_mil_ops_*.py beside it, or this fails (the
    optimum-style meta-test)."""
    import importlib

    covered = {case.op for case in CASES}
    for path in sorted(Path(__file__).parent.glob("test_mil_ops_*.py")):
        module = importlib.import_module(f"tests.validate.{path.stem}")
        covered |= {case.op for case in module.CASES} | getattr(module, "COVERED_IN_PROGRAMS", set())
    assert set(OPS) <= covered, f"ops without a PyTorch comparison: {sorted(set(OPS) - covered)}"


@pytest.mark.parametrize("case", [c for c in CASES if c.fp16 and not c.exact and c.dtype == "float32"], ids=lambda c: c.id)
def test_fp16_typed_result_is_the_float32_result_rounded_once(case):
    """An op typed fp16 returns its float32 result rounded to float16 (README: 'every value the program declares
    float16 is rounded to float16 when its op returns')."""
    got = run_op(case.op, case.params, "float16")
    assert got.dtype == np.float16
    float32 = run_op(case.op, case.params, "float32")
    np.testing.assert_array_equal(got, float32.astype(np.float16), err_msg=case.id)
    # and torch's answer rounded to fp16 agrees to within one fp16 step of the result's scale
    expected = np.asarray(case.expected)
    scale = _magnitude(case, expected)
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=0, atol=2**-10 * scale, err_msg=case.id)


# ---- fp16 emulation across ops --------------------------------------------------------------------------

def _chain_program(output_dtype: str) -> Program:
    """fp32 input -> cast fp16 -> (x * c) -> square -> + x -> / 3 -> cast to `output_dtype`, as a Core ML fp16
    program is laid out (coremltools casts at the edges, every op between typed fp16)."""
    fp16 = "float16"
    c = np.float16(0.1)
    three = np.float16(3.0)
    ops = [
        mil_op("cast", [("h", fp16)], x=Ref("x"), dtype="fp16"),
        mil_op("mul", [("a", fp16)], x=Ref("h"), y=c),
        mil_op("mul", [("b", fp16)], x=Ref("a"), y=Ref("a")),
        mil_op("add", [("s", fp16)], x=Ref("b"), y=Ref("h")),
        mil_op("real_div", [("d", fp16)], x=Ref("s"), y=three),
        mil_op("cast", [("y", output_dtype)], x=Ref("d"), dtype="fp32" if output_dtype == "float32" else "fp16"),
    ]
    for index, op in enumerate(ops):
        op.name = f"op{index}"
    return program(ops, ["y"], [("x", ValueType("float32", (64, 64)))])


def test_fp16_is_rounded_per_op():
    """Each fp16-typed op rounds its result: the executor equals float32 arithmetic rounded to float16 after
    every op (computed here with torch, whose float32 mul/add/div are IEEE like numpy's), and differs
    measurably from the same arithmetic rounded only at the end: emulation, not float32 in disguise."""
    x = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32) * 4

    def r(t: torch.Tensor) -> torch.Tensor:  # round a float32 tensor to float16 and back
        return t.half().float()

    h = r(_t(x))
    c, three = torch.tensor(np.float16(0.1), dtype=torch.float32), torch.tensor(3.0)
    a = r(h * c)
    per_op = r(r(r(a * a) + h) / three).numpy()
    a32 = h * c
    unrounded = ((a32 * a32 + h) / three).numpy()

    got = MILExecutor(_chain_program("float32")).run({"x": x})["y"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, per_op)
    differs = np.mean(got != unrounded.astype(np.float16).astype(np.float32))
    assert differs > 0.05, f"only {differs:.1%} of values show per-op rounding"
    sqnr = 10 * np.log10(np.sum(unrounded.astype(np.float64) ** 2) / np.sum((unrounded.astype(np.float64) - got) ** 2))
    assert 55 < sqnr < 80, f"fp16 emulation measured at {sqnr:.1f} dB against float32 arithmetic"

    fp16_out = MILExecutor(_chain_program("float16")).run({"x": x})["y"]
    assert fp16_out.dtype == np.float16
    np.testing.assert_array_equal(fp16_out.astype(np.float32), per_op)


def test_fp32_program_is_not_rounded():
    """The same chain typed fp32 throughout keeps float32 results (no rounding where none is declared)."""
    ops = [
        mil_op("mul", [("a", "float32")], x=Ref("x"), y=np.float32(0.1)),
        mil_op("mul", [("b", "float32")], x=Ref("a"), y=Ref("a")),
    ]
    x = _randn(16, 16)
    got = MILExecutor(program(ops, ["b"], [("x", ValueType("float32", (16, 16)))])).run({"x": x})["b"]
    a = _t(x) * np.float32(0.1)
    np.testing.assert_array_equal(got, (a * a).numpy())
    assert np.any(got != got.astype(np.float16).astype(np.float32))
