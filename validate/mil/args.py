"""The inputs of one MIL op as the op functions in ops_*.py read them, and the error for what they do not run."""

from __future__ import annotations

import numpy as np

from edgeq.validate.mil.program import Const, MILError


class UnsupportedOp(MILError):
    """An op type, or a parameter value of a supported op, that edgeq's MIL reference executor does not implement."""


class Args:
    """The inputs of one op, resolved to arrays (names looked up in the executor's values)."""

    def __init__(self, op, resolve, declared=None):
        self.op = op
        self._resolve = resolve
        self._declared = declared  # value name -> ValueType, where the executor knows it

    def vtype(self, key: str):
        """The declared type (ValueType) of the value bound to `key`; None where unknown (an attribute, a value
        built in memory without a type)."""
        bound = self.op.inputs.get(key)
        if not bound or len(bound) != 1:
            return None
        if isinstance(bound[0], Const):
            return bound[0].vtype
        return self._declared(bound[0]) if self._declared else None

    def __call__(self, key: str, default=None):
        bound = self.op.inputs.get(key)
        if bound is None:
            return self.op.constant(key, default)
        if len(bound) != 1:
            raise MILError(f"op {self.op.name!r} ({self.op.type}): parameter {key!r} binds {len(bound)} values, expected 1")
        return self._resolve(bound[0])

    def many(self, key: str) -> list:
        return [self._resolve(item) for item in self.op.inputs.get(key, [])]

    def scalar(self, key: str, default=None):
        value = self(key, default)
        if isinstance(value, np.ndarray):
            return value.item() if value.ndim == 0 else value.tolist()
        return value

    def unsupported(self, what: str):
        return UnsupportedOp(f"MIL op {self.op.type!r} (named {self.op.name!r}): {what} is not supported by edgeq's MIL reference executor")


def f32(x) -> np.ndarray:
    """A float operand as float32 (fp16 values are already float16-exact in float32)."""
    return np.asarray(x, dtype=np.float32)

