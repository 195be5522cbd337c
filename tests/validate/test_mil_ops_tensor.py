"""MIL data-movement, indexing and tensor-building ops against PyTorch (method: test_mil_ops.py).

Inputs tell modes apart: repeated scatter indices (an add accumulates, an update does not), negative gather
indices, top-k over ties, band_part's causal and banded forms, cumsum exclusive and reversed, one-hot on a
middle axis.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.validate.test_mil_ops import Case, _check, _np, _randn, _t, run_op

I32 = np.int32
RNG = np.random.default_rng(2)


def _movement_cases() -> list[Case]:
    cases = []
    add = cases.append
    x = _randn(2, 3, 4)
    tx = _t(x)
    add(Case("reverse_axes", "reverse", {"x": x, "axes": np.array([0, -1], I32)}, _np(torch.flip(tx, (0, 2))), exact=True))
    add(Case("reverse_all", "reverse", {"x": x}, _np(torch.flip(tx, (0, 1, 2))), exact=True))
    add(Case("stack", "stack", {"values": [x, x * 2], "axis": I32(1)}, _np(torch.stack([tx, tx * 2], 1)), exact=True))
    add(Case("slice_by_size", "slice_by_size", {"x": x, "begin": np.array([1, 0, 1], I32), "size": np.array([1, -1, 2], I32)},
             _np(tx[1:2, :, 1:3]), exact=True))
    add(Case("flatten2d", "flatten2d", {"x": x, "axis": I32(2)}, _np(tx.reshape(6, 4)), exact=True))
    add(Case("identity", "identity", {"x": x}, x, exact=True))
    ref = np.zeros((4, 6), np.float32)
    add(Case("reshape_like", "reshape_like", {"x": x, "ref_tensors": [ref], "begins": np.array([0], I32), "ends": np.array([2], I32),
             "end_masks": np.array([False])}, _np(tx.reshape(4, 6)), exact=True))
    return cases


def _index_cases() -> list[Case]:
    cases = []
    add = cases.append
    x = _randn(3, 5)
    tx = _t(x)
    idx = np.array([[0, 4, -1], [2, 2, 1], [-5, 3, 0]], I32)
    add(Case("gather_along_axis_negative", "gather_along_axis", {"x": x, "indices": idx, "axis": I32(1)},
             _np(torch.gather(tx, 1, _t((idx % 5).astype(np.int64)))), exact=True))
    rows = np.array([[2, 0, 1, 1, 0]], I32)
    add(Case("gather_along_axis0", "gather_along_axis", {"x": x, "indices": rows, "axis": I32(0)},
             _np(torch.gather(tx, 0, _t(rows.astype(np.int64)))), exact=True))
    data = _randn(3, 5)
    updates = _randn(3, 3)
    dup = np.array([[0, 0, 4], [1, 3, 3], [2, 2, 2]], I32)  # repeated positions in a row: add accumulates
    td, tdup = _t(data), _t(dup.astype(np.int64))
    add(Case("scatter_along_axis_add", "scatter_along_axis", {"data": data, "indices": dup, "updates": updates, "axis": I32(1), "mode": "add"},
             _np(td.scatter_add(1, tdup, _t(updates))), tags=["mode"]))
    uniq = np.array([[0, 1, 4], [3, 2, 0], [4, 0, 1]], I32)
    add(Case("scatter_along_axis_update", "scatter_along_axis",
             {"data": data, "indices": uniq, "updates": updates, "axis": I32(1), "mode": "update"},
             _np(td.scatter(1, _t(uniq.astype(np.int64)), _t(updates))), exact=True, tags=["mode"]))
    rows_upd = _randn(2, 5)
    add(Case("scatter_rows_add", "scatter", {"data": data, "indices": np.array([2, 2], I32), "updates": rows_upd, "axis": I32(0), "mode": "add"},
             _np(td.index_add(0, torch.tensor([2, 2]), _t(rows_upd))), tags=["mode"]))
    add(Case("scatter_rows_update", "scatter", {"data": data, "indices": np.array([2, 0], I32), "updates": rows_upd, "mode": "update"},
             _np(td.index_copy(0, torch.tensor([2, 0]), _t(rows_upd))), exact=True))
    points = np.array([[0, 1], [2, 4], [0, 1]], I32)
    values = np.array([1.0, 2.0, 3.0], np.float32)
    expected = td.clone().index_put_((_t(points[:, 0].astype(np.int64)), _t(points[:, 1].astype(np.int64))), _t(values), accumulate=True)
    add(Case("scatter_nd_add", "scatter_nd", {"data": data, "indices": points, "updates": values, "mode": "add"}, _np(expected), tags=["mode"]))
    ties = np.array([[3.0, 1.0, 3.0, 2.0, 0.0], [5.0, 5.0, -1.0, 7.0, 7.0]], np.float32)
    # MIL leaves the order of ties open (and torch.topk's is not stable): top-k is checked on distinct values,
    # argsort on ties with the stable order edgeq keeps
    distinct = np.array([[3.0, 1.0, 3.5, 2.0, 0.0], [5.0, 5.5, -1.0, 7.0, 6.0]], np.float32)
    values_top, indices_top = torch.topk(_t(distinct), 3, dim=-1, sorted=True)
    add(Case("topk", "topk", {"x": distinct, "k": I32(3), "axis": I32(-1)}, [_np(values_top), _np(indices_top).astype(np.int32)], exact=True, fp16=False))
    low_v, low_i = torch.topk(_t(distinct), 2, dim=0, largest=False)
    add(Case("topk_ascending_axis0", "topk", {"x": distinct, "k": I32(1), "axis": I32(0), "ascending": np.bool_(True)},
             [_np(low_v[:1]), _np(low_i[:1]).astype(np.int32)], exact=True, fp16=False))
    add(Case("argsort_descending", "argsort", {"x": ties, "axis": I32(-1)},
             _np(torch.argsort(_t(ties), dim=-1, descending=True, stable=True)).astype(np.int32), "int32", exact=True, fp16=False))
    add(Case("argsort_ascending", "argsort", {"x": ties, "axis": I32(0), "ascending": np.bool_(True)},
             _np(torch.argsort(_t(ties), dim=0, stable=True)).astype(np.int32), "int32", exact=True, fp16=False))
    labels = np.array([[1, 0, 3], [2, 2, 0]], I32)
    hot = torch.nn.functional.one_hot(_t(labels.astype(np.int64)), 4).permute(0, 2, 1).float() * 2.5 - 0.5
    add(Case("one_hot_axis1", "one_hot", {"indices": labels, "one_hot_vector_size": I32(4), "axis": I32(1),
             "on_value": np.float32(2.0), "off_value": np.float32(-0.5)}, _np(hot), exact=True))
    return cases


def _building_cases() -> list[Case]:
    cases = []
    add = cases.append
    s = _randn(2, 4, 5)
    ts = _t(s)
    add(Case("band_part_causal", "band_part", {"x": s, "lower": I32(-1), "upper": I32(0)}, _np(torch.tril(ts)), exact=True, tags=["mode"]))
    add(Case("band_part_band", "band_part", {"x": s, "lower": I32(1), "upper": I32(2)}, _np(torch.triu(torch.tril(ts, 2), -1)), exact=True, tags=["mode"]))
    c = _randn(3, 4)
    tc = _t(c)
    add(Case("cumsum_axis1", "cumsum", {"x": c, "axis": I32(1)}, _np(torch.cumsum(tc, 1))))
    add(Case("cumsum_exclusive_reverse", "cumsum", {"x": c, "axis": I32(0), "exclusive": np.bool_(True), "reverse": np.bool_(True)},
             _np(torch.flip(torch.cumsum(torch.flip(tc, (0,)), 0), (0,)) - tc), ulps=8, tags=["mode"]))
    ints = np.array([[1, 0, 1, 1], [0, 1, 1, 0]], I32)  # RoBERTa's position ids: cumsum of a mask
    add(Case("cumsum_int", "cumsum", {"x": ints, "axis": I32(1)}, _np(torch.cumsum(_t(ints), 1)).astype(np.int32), "int32", exact=True, fp16=False))
    add(Case("shape", "shape", {"x": s}, np.array([2, 4, 5], I32), "int32", exact=True, fp16=False))
    add(Case("fill", "fill", {"shape": np.array([2, 3], I32), "value": np.float32(1.5)}, _np(torch.full((2, 3), 1.5)), exact=True))
    add(Case("fill_like", "fill_like", {"ref_tensor": s, "value": np.float32(-2.0)}, _np(torch.full_like(ts, -2.0)), exact=True))
    add(Case("range_1d_int", "range_1d", {"start": I32(2), "end": I32(11), "step": I32(3)},
             _np(torch.arange(2, 11, 3)).astype(np.int32), "int32", exact=True, fp16=False))
    add(Case("range_1d_float", "range_1d", {"start": np.float32(0.5), "end": np.float32(2.0), "step": np.float32(0.25)},
             _np(torch.arange(0.5, 2.0, 0.25)), exact=True))
    return cases


CASES = _movement_cases() + _index_cases() + _building_cases()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op_matches_pytorch(case):
    outputs = len(case.expected) if isinstance(case.expected, list) else 1
    _check(case, run_op(case.op, case.params, case.dtype, outputs), case.expected)
