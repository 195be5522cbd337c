"""MIL op semantics in numpy, one function per op type, as coremltools' op definitions state them
(coremltools/converters/mil/mil/ops/defs/iOS15..iOS18: docstrings and `value_inference`).

Every float value reaches an op as float32 (an fp16-typed value holds float16-rounded numbers in a float32
array) and the executor rounds each result to the dtype the program declares for it: float arithmetic is FP32,
and fp16-typed ops are emulated as "compute in float32, round the result to float16". Integer and bool
values keep their own dtypes. A parameter value or mode an op function does not implement raises
UnsupportedOp naming it; nothing falls back to a guess.

The op functions live in themed modules (ops_elementwise, ops_linalg, ops_conv, ops_tensor, ops_quant, ...);
this module is the registry the executor reads.
"""

from __future__ import annotations

import numpy as np

from edgeq.validate.mil import ops_conv as conv
from edgeq.validate.mil import ops_elementwise as ew
from edgeq.validate.mil import ops_index as index
from edgeq.validate.mil import ops_linalg as linalg
from edgeq.validate.mil import ops_quant as quant
from edgeq.validate.mil import ops_recurrent as recurrent
from edgeq.validate.mil import ops_resize as resize
from edgeq.validate.mil import ops_state as state
from edgeq.validate.mil import ops_tensor as tensor
from edgeq.validate.mil.args import Args, UnsupportedOp
from edgeq.validate.mil.decompress import DECOMPRESSION_OPS

__all__ = ["Args", "CONSTEXPR", "OPS", "UnsupportedOp"]

OPS = {
    "add": ew._binary(np.add),
    "sub": ew._binary(np.subtract),
    "mul": ew._binary(np.multiply),
    "real_div": ew._binary(state.real_div),
    "maximum": ew._binary(np.maximum),
    "minimum": ew._binary(np.minimum),
    "greater_equal": ew._binary(np.greater_equal),
    "logical_and": ew._binary(np.logical_and),
    "relu": ew._unary(lambda x: np.maximum(x, np.float32(0.0))),
    "tanh": ew._unary(np.tanh),
    "sigmoid": ew.sigmoid,
    "sigmoid_hard": ew.sigmoid_hard,
    "thresholded_relu": ew.thresholded_relu,
    "clip": ew.clip,
    "gelu": ew.gelu,
    "softmax": ew.softmax,
    "select": ew.select,
    "cast": ew.cast,
    "linear": linalg.linear,
    "matmul": linalg.matmul,
    "layer_norm": linalg.layer_norm,
    "reduce_mean": linalg.reduce_mean,
    "reduce_sum": linalg._reduce(np.sum),
    "reduce_l2_norm": linalg._reduce(linalg._l2_norm),
    "expand_dims": tensor.expand_dims,
    "tile": tensor.tile,
    "conv": conv.conv,
    "max_pool": conv.max_pool,
    "avg_pool": conv.avg_pool,
    "l2_pool": conv.l2_pool,
    "conv_transpose": conv.conv_transpose,
    "batch_norm": linalg.batch_norm,
    "instance_norm": linalg.instance_norm,
    "l2_norm": linalg.l2_norm,
    "local_response_norm": linalg.local_response_norm,
    "einsum": linalg.einsum,
    "reshape": tensor.reshape,
    "transpose": tensor.transpose,
    "squeeze": tensor.squeeze,
    "concat": tensor.concat,
    "split": tensor.split,
    "slice_by_index": tensor.slice_by_index,
    "gather": tensor.gather,
    "gather_nd": tensor.gather_nd,
    "quantize": quant.quantize,
    "dequantize": quant.dequantize,
    "constexpr_affine_dequantize": quant.constexpr_affine_dequantize,
    **ew.MORE_ELEMENTWISE,
    **linalg.REDUCTIONS,
    **tensor.TENSOR_MORE,
    **index.INDEX_OPS,
    **resize.RESIZE_OPS,
    **recurrent.RECURRENT_OPS,
    **DECOMPRESSION_OPS,
    **state.STATE_OPS,
}
# compile-time ops: evaluated once when the program is loaded, as Core ML materializes them
CONSTEXPR = frozenset({"constexpr_affine_dequantize", *DECOMPRESSION_OPS})
