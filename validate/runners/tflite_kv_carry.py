"""Carrying a TFLite decoder's KV cache from one signature call to the next.

A decoder `.tflite` in litert-torch's generative layout takes every cache tensor as a signature input and returns
the updated one as an output. LiteRT's public signature runner copies all of them in and out of Python on every
call: 60 tensors and 11.8 MB a token for SmolLM2-135M at a context of 256, a fixed cost that is as large as the
4-bit model's own decode compute here (SmolLM2 int4 decode 82-85 tokens/s that way, 110-117 with the cache kept
in place, one thread: benchmarks/bench_llm.py --tflite).

`InPlaceCarry` keeps the cache in the interpreter's own input tensors. A call writes cache rows
[position, position + rows) into its outputs (DYNAMIC_UPDATE_SLICE of the input), so afterwards only those rows
are copied from each output tensor back into the same signature's input tensor; the rest is already there. Each
signature is its own subgraph with its own tensors, so switching from prefill to decode copies the whole cache
once into the other signature's inputs. It reaches the interpreter through the wrapper that ai-edge-litert's and
tflite-runtime's `Interpreter` both hold (`_interpreter`: tensor views per subgraph, SetTensor, Invoke); LiteRT
keeps graph inputs out of the arena's reuse, so the views stay valid between calls. Where that wrapper is
missing, `NumpyCarry` does what the public API allows. Both give bit-identical logits
(tests/llm/test_tflite_decoder.py).

Imports numpy only (runs on a device image).
"""

from __future__ import annotations

import numpy as np

CACHE_PREFIX = "kv_cache_"
# litert-torch's generative layout: K [1, kv_heads, S, head_dim], V [1, kv_heads, head_dim, S].
SEQUENCE_AXIS = {"k": 2, "v": 3}


def sequence_axis(name: str) -> int:
    return SEQUENCE_AXIS[name[len(CACHE_PREFIX)]]


def row_slice(name: str, start: int, stop: int) -> tuple:
    index = [slice(None)] * 4
    index[sequence_axis(name)] = slice(start, stop)
    return tuple(index)


class NumpyCarry:
    """The whole cache passed in and copied out on every call, through LiteRT's public signature runners."""

    mode = "numpy"

    def __init__(self, interpreter, keys: list[str], cache_names: list[str]):
        self._runners = {key: interpreter.get_signature_runner(key) for key in keys}
        details = self._runners[keys[0]].get_input_details()
        self.cache_names = cache_names
        self._specs = {n: (tuple(int(s) for s in details[n]["shape"]), np.dtype(details[n]["dtype"])) for n in cache_names}
        self.cache_dtype = self._specs[cache_names[0]][1]
        self.reset()

    def reset(self) -> None:
        self._cache = {name: np.zeros(shape, dtype) for name, (shape, dtype) in self._specs.items()}

    def run(self, key: str, feeds: dict[str, np.ndarray], start: int, rows: int, fetch: tuple[str, ...]) -> dict:
        result = self._runners[key](**feeds, **self._cache)
        # Copies: the runner's arrays may alias interpreter memory that the next call overwrites.
        self._cache = {name: np.array(result[name]) for name in self.cache_names}
        return {name: np.array(result[name]) for name in fetch}


class _Signature:
    def __init__(self, wrapper, runner, cache_names: list[str]):
        self.subgraph = int(runner._subgraph_index)
        self.inputs = {name: int(d["index"]) for name, d in runner.get_input_details().items()}
        self.outputs = {name: int(d["index"]) for name, d in runner.get_output_details().items()}
        self.cache_in = {n: wrapper.tensor(wrapper, self.inputs[n], self.subgraph) for n in cache_names}
        self.cache_out = {n: wrapper.tensor(wrapper, self.outputs[n], self.subgraph) for n in cache_names}


class InPlaceCarry:
    """The cache kept in the interpreter's input tensors; a call copies back only the rows it wrote."""

    mode = "in-place"

    def __init__(self, interpreter, keys: list[str], cache_names: list[str]):
        self._wrapper = interpreter._interpreter
        self.cache_names = cache_names
        runners = {key: interpreter.get_signature_runner(key) for key in keys}
        # Every subgraph before any view is taken: the first allocation (-1: the primary subgraph) applies the
        # default delegate, which may lay out tensors again.
        self._wrapper.AllocateTensors(-1)
        for runner in runners.values():
            self._wrapper.AllocateTensors(int(runner._subgraph_index))
        self._signatures = {key: _Signature(self._wrapper, runner, cache_names) for key, runner in runners.items()}
        self.cache_dtype = np.dtype(next(iter(self._signatures.values())).cache_in[cache_names[0]].dtype)
        self.reset()

    def reset(self) -> None:
        for signature in self._signatures.values():
            for view in signature.cache_in.values():
                view.fill(0)
        self._owner = None  # every signature's inputs hold the (empty) cache

    def run(self, key: str, feeds: dict[str, np.ndarray], start: int, rows: int, fetch: tuple[str, ...]) -> dict:
        signature, wrapper = self._signatures[key], self._wrapper
        if self._owner is not None and self._owner is not signature:
            for name in self.cache_names:
                np.copyto(signature.cache_in[name], self._owner.cache_in[name])
        self._owner = signature
        for name, value in feeds.items():
            wrapper.SetTensor(signature.inputs[name], value, signature.subgraph)
        wrapper.Invoke(signature.subgraph)
        for name in self.cache_names:
            rows_written = row_slice(name, start, start + rows)  # numpy clips a slice at the context's end
            signature.cache_in[name][rows_written] = signature.cache_out[name][rows_written]
        return {name: wrapper.GetTensor(signature.outputs[name], signature.subgraph) for name in fetch}


def open_carry(interpreter, keys: list[str], cache_names: list[str]):
    """InPlaceCarry where the interpreter exposes its wrapper, NumpyCarry otherwise."""
    wrapper = getattr(interpreter, "_interpreter", None)
    needed = ("tensor", "SetTensor", "GetTensor", "Invoke", "AllocateTensors")
    if wrapper is not None and all(hasattr(wrapper, name) for name in needed):
        try:
            return InPlaceCarry(interpreter, keys, cache_names)
        except (AttributeError, TypeError, ValueError):
            pass  # a wrapper of another shape: the public path below still works
    return NumpyCarry(interpreter, keys, cache_names)
