"""edgeq's MIL reference executor: runs an ML program's main function op by op in numpy.

It exists so that Core ML artifacts are executed, not just converted, where Apple's runtime is missing
(MLModel.predict is macOS-only). It is a reference for the program's semantics, not Apple's runtime: Core ML
on a device may pick other kernels (fp16 accumulation on the GPU or Neural Engine, fused ops), so its drift
can differ from this executor's. Reports say which executed an artifact (`label`).

Arithmetic: float32 throughout. A value the program declares float16 is rounded to float16 as soon as the op
producing it returns (fp16 emulation: compute in float32, round every fp16-typed result); constants typed
float16 are exact float16 numbers. Compile-time ops (constexpr_*) are evaluated once, when the program is
loaded, as Core ML materializes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.validate.mil.ops import CONSTEXPR, OPS, Args, UnsupportedOp
from edgeq.validate.mil.ops_state import StateBuffer
from edgeq.validate.mil.program import Const, MILError, Program, ValueType, read_program

_FLOATS = ("float16", "float32")


class MILExecutor:
    """Load once, run many times: `MILExecutor(path).run({input name: array})` -> {output name: array}."""

    def __init__(self, program: Program | Path | str):
        self.program = program if isinstance(program, Program) else read_program(Path(program))
        self.function = self.program.main
        self.types: dict[str, ValueType] = dict(self.function.inputs)
        producers = {name: "the function's inputs" for name in self.types}
        for op in self.function.ops:
            for name, vtype in op.outputs:
                if name in producers:  # MIL is SSA: a second definition makes every later read ambiguous
                    raise MILError(
                        f"the ML program defines value {name!r} twice ({producers[name]} and MIL op {op.type!r} "
                        f"named {op.name!r}); it is not a valid MIL program"
                    )
                producers[name] = f"MIL op {op.type!r} named {op.name!r}"
                self.types[name] = vtype
        self._check_supported()
        self.fp16 = any(t.dtype == "float16" for t in self.types.values())
        self.label = (
            "edgeq MIL reference executor (numpy, "
            + ("fp16 emulated: float32 arithmetic rounded to float16 per op" if self.fp16 else "fp32")
            + "), not Apple's Core ML runtime"
        )
        # state<tensor> inputs (stateful models): held here across runs, zero-filled as MLModel.make_state() does
        self.states = {name: StateBuffer(name, vtype) for name, vtype in self.function.inputs if vtype.state}
        self.constants: dict[str, object] = {}  # const and constexpr outputs, in compute form
        self._steps = []
        for op in self.function.ops:
            if op.type == "const":
                (name, vtype), = op.outputs
                self.constants[name] = _compute_form(op.constant("val"), vtype, op)
            elif op.type in CONSTEXPR:
                self._execute(op, self.constants)
            else:
                self._steps.append(op)

    def _check_supported(self) -> None:
        for op in self.program.operations():
            if op.blocks:
                raise UnsupportedOp(f"MIL op {op.type!r} (named {op.name!r}): control flow is not supported by edgeq's MIL reference executor")
            if op.type != "const" and op.type not in OPS:
                raise UnsupportedOp(
                    f"MIL op {op.type!r} (named {op.name!r}) is not supported by edgeq's MIL reference executor "
                    f"(it runs {len(OPS)} op types, listed in edgeq.validate.mil.OPS and the README's Core ML on Linux section)"
                )

    def constant(self, name: str) -> np.ndarray:
        """A constant or constexpr output (e.g. a dequantized weight) in its declared dtype."""
        return _declared(self.constants[name], self.types[name])

    def reset_states(self) -> None:
        """Zero every state, as a fresh MLModel.make_state() is."""
        for buffer in self.states.values():
            buffer.reset()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One prediction; a stateful program reads and updates `self.states` (Core ML: predict(..., state=))."""
        values = dict(self.constants)
        for name, vtype in self.function.inputs:
            if vtype.state:
                if name in feeds:
                    raise MILError(f"{name!r} is a state of the program, held by the executor; it is not fed")
                values[name] = self.states[name]
                continue
            if name not in feeds:
                raise MILError(f"input {name!r} is missing; the program takes {[n for n, _ in self.function.inputs]}")
            array = np.asarray(feeds[name])
            if array.dtype != vtype.numpy:
                raise MILError(f"input {name!r} is {array.dtype}; the program declares {vtype.dtype}")
            _check_shape(array, vtype, f"input {name!r}")
            values[name] = _compute_form(array, vtype)
        for op in self._steps:
            self._execute(op, values)
        return {name: _declared(values[name], self.types[name]) for name in self.function.outputs}

    def _execute(self, op, values: dict) -> None:
        def resolve(bound):
            if isinstance(bound, Const):
                return bound.value
            try:
                return values[bound]
            except KeyError:
                raise MILError(f"MIL op {op.type!r} (named {op.name!r}) reads {bound!r}, which no earlier op produced") from None

        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            try:
                result = OPS[op.type](Args(op, resolve, self.types.get))
            except (MILError, UnsupportedOp):
                raise
            except Exception as exc:  # a numpy error inside an op: name the op, keep the cause
                raise MILError(f"MIL op {op.type!r} (named {op.name!r}) failed: {exc}") from exc
        results = list(result) if isinstance(result, (list, tuple)) else [result]
        if len(results) != len(op.outputs):
            raise MILError(f"MIL op {op.type!r} (named {op.name!r}) gave {len(results)} outputs; the program declares {len(op.outputs)}")
        for value, (name, vtype) in zip(results, op.outputs):
            value = _compute_form(np.asarray(value), vtype, op)
            _check_shape(value, vtype, f"MIL op {op.type!r} (named {op.name!r}) output {name!r}")
            values[name] = value


def _compute_form(value, vtype: ValueType, op=None):
    """A value as ops receive it: float16/float32 as float32 (fp16 rounded first); others in their dtype."""
    if vtype.dtype == "string":
        return value
    array = np.asarray(value)
    if vtype.dtype == "float16":
        return array.astype(np.float16).astype(np.float32)
    if vtype.dtype == "float32":
        return array.astype(np.float32)
    where = f" of MIL op {op.type!r} (named {op.name!r})" if op is not None else ""
    if array.dtype.kind == "f" and vtype.numpy.kind in "iub":
        raise MILError(f"a float result{where} where the program declares {vtype.dtype}")
    bounds = vtype.value_range()  # sub-byte values live in int8/uint8: they must fit the declared width
    if bounds is not None and array.size and (array.min() < bounds[0] or array.max() > bounds[1]):
        raise MILError(f"a value{where} outside {vtype.dtype}'s range {list(bounds)}")
    return array.astype(vtype.numpy)


def _declared(value, vtype: ValueType):
    return value if vtype.dtype == "string" else np.asarray(value).astype(vtype.numpy)


def _check_shape(array: np.ndarray, vtype: ValueType, what: str) -> None:
    if vtype.shape is None:
        return
    if len(array.shape) != len(vtype.shape) or any(d is not None and d != s for s, d in zip(array.shape, vtype.shape)):
        raise MILError(f"{what}: shape {tuple(array.shape)}, the program declares {list(vtype.shape)}")
