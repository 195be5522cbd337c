"""State MIL ops (iOS18 stateful models: a decoder's KV cache kept between predictions), in numpy.

As coremltools defines them (coremltools/converters/mil/mil/ops/defs/iOS18/states.py, coreml_dialect/ops.py,
iOS18/tensor_transformation.py):
- `read_state(input=state)` -> a copy of the state's tensor;
- `write_state(input=state, data=x)` -> nothing; the state holds x from now on (what the program stores:
  coremltools' `coreml_update_state` is lowered to write_state + read_state when the program is saved);
- `coreml_update_state(state, value)` -> write, then a copy of what was written (the dialect op, for programs
  built in memory);
- `slice_update(x, update, begin, end, stride, masks)` -> x with x[slice] = update, the slice read exactly as
  slice_by_index reads it (how torch's in-place slice assignment into a cache buffer reaches MIL).

A state is a function input of type state<tensor>. The executor keeps one `StateBuffer` per state input from
one `run` to the next, zero-filled at the start, as `MLModel.make_state()` allocates them (Core ML zero-fills
new state buffers); `MILExecutor.reset_states()` zero-fills them again. Values are held in compute form (an
fp16 state's numbers as float16-rounded float32), and a write rounds to the state's declared dtype, as the
state's storage does.
"""

from __future__ import annotations

import numpy as np

from edgeq.validate.mil.args import Args
from edgeq.validate.mil.program import MILError, ValueType


class StateBuffer:
    """The storage behind one state input: its declared type and current value (compute form)."""

    def __init__(self, name: str, vtype: ValueType):
        if vtype.shape is None or any(d is None for d in vtype.shape):
            raise MILError(f"state {name!r} has no static shape ({vtype.shape}); Core ML states are fixed-size tensors")
        self.name, self.vtype = name, vtype
        self.value = np.zeros(vtype.shape, dtype=np.float32 if vtype.dtype in ("float16", "float32") else vtype.numpy)

    def reset(self) -> None:
        self.value = np.zeros_like(self.value)

    def write(self, data, what: str) -> None:
        data = np.asarray(data)
        if tuple(data.shape) != tuple(self.vtype.shape):
            raise MILError(f"{what} writes shape {tuple(data.shape)} into state {self.name!r} of shape {list(self.vtype.shape)}")
        if self.vtype.dtype == "float16":
            data = data.astype(np.float16)
        self.value = data.astype(self.value.dtype)

    def read(self) -> np.ndarray:
        return self.value.copy()


def _state(a: Args, key: str) -> StateBuffer:
    buffer = a(key)
    if not isinstance(buffer, StateBuffer):
        raise MILError(f"MIL op {a.op.type!r} (named {a.op.name!r}): {key!r} is not a state input")
    return buffer


def read_state(a: Args):
    return _state(a, "input").read()


def write_state(a: Args):
    _state(a, "input").write(a("data"), f"MIL op 'write_state' (named {a.op.name!r})")
    return []  # write_state has no outputs


def coreml_update_state(a: Args):
    state = _state(a, "state")
    state.write(a("value"), f"MIL op 'coreml_update_state' (named {a.op.name!r})")
    return state.read()


def slice_update(a: Args):
    """x with the slice (begin, end, stride, begin/end/squeeze masks: slice_by_index's reading) set to update."""
    x = np.array(a("x"), copy=True)
    update = np.asarray(a("update"))
    rank = x.ndim
    begin = [int(b) for b in np.atleast_1d(a("begin"))]
    end = [int(e) for e in np.atleast_1d(a("end"))]
    stride = [int(s) for s in np.atleast_1d(a("stride", np.ones(rank, np.int32)))]
    begin_mask = [bool(m) for m in np.atleast_1d(a("begin_mask", np.zeros(rank, bool)))]
    end_mask = [bool(m) for m in np.atleast_1d(a("end_mask", np.zeros(rank, bool)))]
    squeeze_mask = [bool(m) for m in np.atleast_1d(a("squeeze_mask", np.zeros(rank, bool)))]
    index = tuple(
        begin[i] if squeeze_mask[i] else slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i])
        for i in range(rank)
    )
    target = x[index]
    if tuple(np.shape(target)) != tuple(update.shape):  # MIL: the update has exactly the slice's shape, no broadcast
        raise MILError(f"MIL op 'slice_update' (named {a.op.name!r}): update {list(update.shape)} does not match the "
                       f"slice {list(np.shape(target))} of x {list(x.shape)}")
    x[index] = update
    return x


def real_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x / y; int32 by int32 (the shape arithmetic of flexible inputs, e.g. tile repeats) stays int32, the quotient
    truncated as coremltools' value inference casts it (operator.truediv, then the declared int32)."""
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        return np.trunc(np.divide(x, y)).astype(np.result_type(x, y))
    return np.divide(x, y)


STATE_OPS = {
    "read_state": read_state,
    "write_state": write_state,
    "coreml_update_state": coreml_update_state,
    "slice_update": slice_update,
}
