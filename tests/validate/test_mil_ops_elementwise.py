"""MIL unary, binary, activation and reduction ops against PyTorch (see test_mil_ops.py for the method).

Inputs tell modes apart: epsilons as large as the values they guard (inverse, log, rsqrt), ties for round
(half to even), negative operands for floor_div and mod (floor, not truncation; the divisor's sign), slopes
per channel on axis 1 for prelu, first-of-equals for argmax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.validate.test_mil_ops import Case, _check, _np, _randn, _t, run_op

RNG = np.random.default_rng(1)


def _unary_cases() -> list[Case]:
    cases = []
    add = cases.append
    x = _randn(3, 7, scale=2.0)
    unit = np.clip(_randn(3, 7, scale=0.5), -0.95, 0.95)  # the domain of acos, asin, atanh
    positive = np.abs(_randn(3, 7)) + 0.1
    tx, tu, tp = _t(x), _t(unit), _t(positive)
    for op, fn, arg, targ in (
        ("abs", torch.abs, x, tx), ("acos", torch.acos, unit, tu), ("asin", torch.asin, unit, tu),
        ("atan", torch.atan, x, tx), ("atanh", torch.atanh, unit, tu), ("cos", torch.cos, x, tx),
        ("cosh", torch.cosh, x, tx), ("sin", torch.sin, x, tx), ("sinh", torch.sinh, x, tx), ("tan", torch.tan, unit, tu),
        ("exp", torch.exp, x, tx), ("exp2", torch.exp2, x, tx), ("sqrt", torch.sqrt, positive, tp),
        ("square", torch.square, x, tx), ("sign", torch.sign, x, tx), ("softsign", F.softsign, x, tx),
        ("erf", torch.erf, x, tx), ("silu", F.silu, x, tx), ("softplus", F.softplus, x * 10, tx * 10),
    ):
        add(Case(op, op, {"x": arg}, _np(fn(targ)), ulps=8))
    steps = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 1.2, -1.7], np.float32)  # ties: half to even
    for op, fn in (("ceil", torch.ceil), ("floor", torch.floor), ("round", torch.round)):
        add(Case(f"{op}_ties", op, {"x": steps}, _np(fn(_t(steps))), ulps=0, tags=["mode"]))
    add(Case("relu6", "relu6", {"x": x * 4}, _np(F.relu6(tx * 4)), ulps=0))
    # epsilon as large as x: leaving it out is a 2x error, not a rounding one
    small = np.abs(_randn(2, 5, scale=0.1)) + 0.05
    ts = _t(small)
    add(Case("inverse_eps", "inverse", {"x": small, "epsilon": np.float32(0.1)}, _np(1.0 / (ts + 0.1)), tags=["mode"]))
    add(Case("inverse_default_eps", "inverse", {"x": small}, _np(1.0 / (ts + 1e-4))))
    add(Case("log_eps", "log", {"x": small, "epsilon": np.float32(0.1)}, _np(torch.log(ts + 0.1)), ulps=8, tags=["mode"]))
    add(Case("log_default_eps", "log", {"x": small}, _np(torch.log(ts)), ulps=8))
    add(Case("rsqrt_eps", "rsqrt", {"x": small, "epsilon": np.float32(0.1)}, _np(torch.rsqrt(ts + 0.1)), ulps=8, tags=["mode"]))
    add(Case("rsqrt_default_eps", "rsqrt", {"x": small}, _np(torch.rsqrt(ts + 1e-12)), ulps=8))
    add(Case("threshold", "threshold", {"x": x, "alpha": np.float32(0.3)}, _np(torch.clamp(tx, min=0.3)), ulps=0))
    flags = RNG.random((3, 4)) > 0.5
    add(Case("logical_not", "logical_not", {"x": flags}, _np(torch.logical_not(_t(flags))), "bool", exact=True, fp16=False))
    return cases


def _activation_cases() -> list[Case]:
    cases = []
    add = cases.append
    x = _randn(2, 3, 4, 5, scale=2.0)
    tx = _t(x)
    slopes = np.array([0.1, -0.5, 2.0], np.float32)  # per channel, axis 1
    add(Case("prelu_per_channel", "prelu", {"x": x, "alpha": slopes}, _np(F.prelu(tx, _t(slopes))), tags=["mode"]))
    alpha, beta = np.array([0.5, 1.0, 2.0], np.float32), np.array([1.0, 3.0, 0.5], np.float32)
    add(Case("softplus_parametric", "softplus_parametric", {"x": x, "alpha": alpha, "beta": beta},
             _np(_t(alpha)[:, None, None] * torch.log1p(torch.exp(tx * _t(beta)[:, None, None]))), ulps=8))
    add(Case("leaky_relu", "leaky_relu", {"x": x, "alpha": np.float32(0.2)}, _np(F.leaky_relu(tx, 0.2)), ulps=0))
    add(Case("elu", "elu", {"x": x, "alpha": np.float32(0.7)}, _np(F.elu(tx, 0.7)), ulps=8))
    add(Case("clamped_relu", "clamped_relu", {"x": x * 3, "alpha": np.float32(0.1), "beta": np.float32(4.0)},
             _np(torch.clamp(torch.where(tx * 3 >= 0, tx * 3, 0.1 * (tx * 3)), max=4.0)), ulps=0))
    add(Case("scaled_tanh", "scaled_tanh", {"x": x, "alpha": np.float32(1.7), "beta": np.float32(0.6)}, _np(1.7 * torch.tanh(0.6 * tx)), ulps=8))
    add(Case("linear_activation", "linear_activation", {"x": x, "alpha": np.float32(-0.5), "beta": np.float32(2.0)}, _np(-0.5 * tx + 2.0)))
    return cases


def _binary_cases() -> list[Case]:
    cases = []
    add = cases.append
    x = np.array([[-7.5, -3.0, -0.5, 0.0, 2.5, 7.0]], np.float32)
    y = np.array([[2.0], [-3.0]], np.float32)  # broadcast, both signs of divisor
    tx, ty = _t(x), _t(y)
    add(Case("floor_div_float", "floor_div", {"x": x, "y": y}, _np(torch.floor_divide(tx, ty)), ulps=0, tags=["mode"]))
    add(Case("mod_float", "mod", {"x": x, "y": y}, _np(torch.remainder(tx, ty)), tags=["mode"]))
    xi, yi = np.array([-7, -3, 0, 4, 9], np.int32), np.array([3, -2, 5, -3, 4], np.int32)
    add(Case("floor_div_int", "floor_div", {"x": xi, "y": yi}, _np(torch.floor_divide(_t(xi), _t(yi))), "int32", exact=True, fp16=False, tags=["mode"]))
    add(Case("mod_int", "mod", {"x": xi, "y": yi}, _np(torch.remainder(_t(xi), _t(yi))), "int32", exact=True, fp16=False, tags=["mode"]))
    base = np.abs(_randn(3, 4)) + 0.5
    add(Case("pow", "pow", {"x": base, "y": np.float32(1.7)}, _np(torch.pow(_t(base), 1.7)), ulps=8))
    a = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    b = np.float32(2.0)  # equal at the threshold tells <, <= apart
    for op, fn in (("equal", torch.eq), ("not_equal", torch.ne), ("greater", torch.gt), ("less", torch.lt), ("less_equal", torch.le)):
        add(Case(op, op, {"x": a, "y": b}, _np(fn(_t(a), 2.0)), "bool", exact=True, fp16=False))
    p, q = RNG.random((3, 4)) > 0.5, RNG.random((3, 4)) > 0.5
    add(Case("logical_or", "logical_or", {"x": p, "y": q}, _np(torch.logical_or(_t(p), _t(q))), "bool", exact=True, fp16=False))
    add(Case("logical_xor", "logical_xor", {"x": p, "y": q}, _np(torch.logical_xor(_t(p), _t(q))), "bool", exact=True, fp16=False))
    return cases


def _reduction_cases() -> list[Case]:
    cases = []
    add = cases.append
    r = _randn(2, 3, 4)
    tr = _t(r)
    axes = np.array([-1], np.int32)
    add(Case("reduce_max", "reduce_max", {"x": r, "axes": axes}, _np(tr.amax(-1)), ulps=0))
    add(Case("reduce_min_keep", "reduce_min", {"x": r, "axes": np.array([0, 2], np.int32), "keep_dims": np.bool_(True)},
             _np(tr.amin((0, 2), keepdim=True)), ulps=0))
    add(Case("reduce_prod", "reduce_prod", {"x": r, "axes": axes}, _np(tr.prod(-1))))
    add(Case("reduce_l1_norm", "reduce_l1_norm", {"x": r, "axes": axes}, _np(tr.abs().sum(-1))))
    add(Case("reduce_sum_square", "reduce_sum_square", {"x": r, "axes": axes}, _np(tr.square().sum(-1))))
    pos = np.abs(r) + 0.1
    add(Case("reduce_log_sum", "reduce_log_sum", {"x": pos, "axes": axes}, _np(torch.log(_t(pos).sum(-1))), ulps=8))
    add(Case("reduce_log_sum_exp", "reduce_log_sum_exp", {"x": r * 30, "axes": axes}, _np(torch.logsumexp(tr * 30, -1)), ulps=8))
    add(Case("reduce_log_sum_exp_all", "reduce_log_sum_exp", {"x": r}, _np(torch.logsumexp(tr.reshape(-1), 0)), ulps=8))
    ties = np.array([[1.0, 3.0, 3.0, 0.0], [-1.0, -1.0, -2.0, -2.0]], np.float32)  # the first of equals wins
    add(Case("reduce_argmax", "reduce_argmax", {"x": ties, "axis": np.int32(-1)}, _np(torch.argmax(_t(ties), -1)).astype(np.int32),
             "int32", exact=True, fp16=False, tags=["mode"]))
    add(Case("reduce_argmin_keep", "reduce_argmin", {"x": ties, "axis": np.int32(1), "keep_dims": np.bool_(True)},
             _np(torch.argmin(_t(ties), 1, keepdim=True)).astype(np.int32), "int32", exact=True, fp16=False))
    return cases


CASES = _unary_cases() + _activation_cases() + _binary_cases() + _reduction_cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op_matches_pytorch(case):
    outputs = len(case.expected) if isinstance(case.expected, list) else 1
    _check(case, run_op(case.op, case.params, case.dtype, outputs), case.expected)


@pytest.mark.parametrize("case", [c for c in CASES if c.fp16 and not c.exact and c.dtype == "float32"], ids=lambda c: c.id)
def test_fp16_typed_result_is_the_float32_result_rounded_once(case):
    got = run_op(case.op, case.params, "float16")
    np.testing.assert_array_equal(got, run_op(case.op, case.params, "float32").astype(np.float16), err_msg=case.id)
