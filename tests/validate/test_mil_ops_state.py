"""The MIL executor's state ops (validate/mil/ops_state.py) and what stateful decoders need beside them.

A stateful program is built with coremltools' own Builder (read_state, coreml_update_state: stored as
write_state + read_state), saved as an .mlpackage and run several times: the executor must carry the state
from run to run, round it to the state's fp16, zero it on reset, and refuse a fed state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.validate.test_mil_ops import Case, _check, _np, _randn, _t, program, run_op

I32 = np.int32


def _slice_update_cases() -> list[Case]:
    x, update = _randn(2, 6, 4), _randn(2, 3, 4)
    want = _t(x).clone()
    want[:, 1:4, :] = _t(update)
    return [Case("slice_update_middle", "slice_update",
                 {"x": x, "update": update, "begin": np.array([0, 1, 0], I32), "end": np.array([2, 4, 4], I32)},
                 _np(want), exact=True)]


CASES = _slice_update_cases()
# State ops read and write a state<tensor> input, which a one-op program without inputs cannot hold: each is run
# in a stateful program below (a coremltools-saved one for read_state/write_state, an in-memory one for
# coreml_update_state) against the same arithmetic in numpy. The meta-test in test_mil_ops.py counts these.
COVERED_IN_PROGRAMS = {"read_state", "write_state", "coreml_update_state"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op_matches_pytorch(case):
    _check(case, run_op(case.op, case.params, case.dtype), case.expected)


@pytest.fixture(scope="module")
def accumulator(tmp_path_factory):
    """y = (acc + x) * 2 with acc += x each run: acc an fp16 state [2, 3]."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((2, 3), dtype=types.fp16), mb.StateTensorSpec((2, 3), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def program(x, acc):
        total = mb.add(x=mb.read_state(input=acc), y=x)
        stored = mb.coreml_update_state(state=acc, value=total)
        return mb.mul(x=stored, y=np.float16(2.0), name="y")

    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16)
    path = tmp_path_factory.mktemp("state") / "acc.mlpackage"
    model.save(str(path))
    return path


def test_state_carried_between_runs(accumulator):
    from edgeq.validate.mil import MILExecutor

    executor = MILExecutor(accumulator)
    types = {op.type for op in executor.program.operations()}
    assert {"read_state", "write_state"} <= types  # what coremltools stores for coreml_update_state
    assert list(executor.states) == ["acc"]
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((2, 3)).astype(np.float16) for _ in range(3)]
    acc = np.zeros((2, 3), np.float16)
    for x in feeds:
        acc = (acc.astype(np.float32) + x.astype(np.float32)).astype(np.float16)  # the sum rounded to the fp16 state
        y = executor.run({"x": x})["y"]
        np.testing.assert_array_equal(y, (acc.astype(np.float32) * 2).astype(np.float16))
        np.testing.assert_array_equal(executor.states["acc"].value, acc.astype(np.float32))
    executor.reset_states()
    np.testing.assert_array_equal(executor.run({"x": feeds[0]})["y"], (feeds[0].astype(np.float32) * 2).astype(np.float16))


def test_coreml_update_state_in_memory_writes_and_returns_the_rounded_value():
    """The dialect op as an in-memory program holds it (saved programs store write_state + read_state instead)."""
    from edgeq.validate.mil import MILExecutor
    from edgeq.validate.mil.program import Const, Op, ValueType

    state_type = ValueType("float16", (2, 3), state=True)
    update = Op("coreml_update_state", "update", {"state": ["acc"], "value": [Const(np.full((2, 3), 1 / 3, np.float32))]}, {},
                [("stored", ValueType("float16", (2, 3)))])
    executor = MILExecutor(program([update], ["stored"], inputs=[("acc", state_type)]))
    third = np.float32(np.float16(1 / 3))
    np.testing.assert_array_equal(executor.run({})["stored"], np.full((2, 3), third, np.float16))
    np.testing.assert_array_equal(executor.states["acc"].value, np.full((2, 3), third, np.float32))


def test_fed_state_is_refused(accumulator):
    from edgeq.validate.mil import MILError, MILExecutor

    executor = MILExecutor(accumulator)
    with pytest.raises(MILError, match="state of the program"):
        executor.run({"x": np.zeros((2, 3), np.float16), "acc": np.zeros((2, 3), np.float16)})


def test_state_write_of_wrong_shape_is_refused():
    from edgeq.validate.mil.ops_state import StateBuffer
    from edgeq.validate.mil.program import MILError, ValueType

    buffer = StateBuffer("kv", ValueType("float16", (2, 4), state=True))
    with pytest.raises(MILError, match=r"writes shape \(4, 2\) into state 'kv'"):
        buffer.write(np.zeros((4, 2), np.float32), "a test")
    buffer.write(np.full((2, 4), 1 / 3, np.float32), "a test")
    assert buffer.read()[0, 0] == np.float32(np.float16(1 / 3))  # stored as fp16


def test_slice_update_matches_torch_assignment():
    x, update = _randn(2, 6, 4), _randn(2, 3, 4)
    want = _t(x).clone()
    want[:, 1:4, :] = _t(update)
    got = run_op("slice_update", {"x": x, "update": update, "begin": np.array([0, 1, 0], I32), "end": np.array([2, 4, 4], I32)})
    np.testing.assert_array_equal(got, _np(want))
    # masks and stride as slice_by_index reads them: x[1, ::2, :] = u (axis 0 squeezed, axis 2 whole by mask)
    row = _randn(3, 4)
    want = _t(x).clone()
    want[1, ::2, :] = _t(row)
    got = run_op("slice_update", {"x": x, "update": row, "begin": np.array([1, 0, 0], I32), "end": np.array([2, 6, 0], I32),
                                  "stride": np.array([1, 2, 1], I32), "end_mask": np.array([False, False, True]),
                                  "squeeze_mask": np.array([True, False, False])})
    np.testing.assert_array_equal(got, _np(want))


def test_slice_update_refuses_a_mismatched_update():
    from edgeq.validate.mil.program import MILError

    with pytest.raises(MILError, match="does not match the slice"):
        run_op("slice_update", {"x": _randn(2, 6), "update": _randn(2, 2), "begin": np.array([0, 1], I32), "end": np.array([2, 4], I32)})


def test_integer_real_div_and_scalar_concat():
    """Shape arithmetic of flexible inputs (a decoder's tile repeats): int32 / int32 stays int32; scalars concat to a vector."""
    got = run_op("real_div", {"x": np.array([6, 7, -7], I32), "y": np.array([3, 2, 2], I32)}, dtype="int32")
    np.testing.assert_array_equal(got, np.trunc(torch.tensor([6, 7, -7]) / torch.tensor([3, 2, 2])).int().numpy())
    got = run_op("concat", {"values": [I32(1), I32(5), I32(2)], "axis": I32(0)}, dtype="int32")
    np.testing.assert_array_equal(got, np.array([1, 5, 2], I32))
