"""What a plan's weights occupy in an artifact: bits per weight as the runtime stores them, per layer and for the
whole model, with codes, scales, zero points and look-up tables counted apart.

Counted as each packer writes them (read from the converters' own layouts, so the account follows them):

  runtime  layer                          codes                            scales            zero points
  onnx     int4/3/2 linear (MatMulNBits)  container bits (4) x N x blocks  float32 per block  packed container
                                          x block (per channel: K padded   (A's dtype)       bits per block, only
                                          to a power of two)                                 when stored
  onnx     other low-bit (embeddings)     container bits (4), packed       float32           container bits
  onnx     int8 per channel               8                                float32 [N]       int8 [N]
  tflite   int4/3/2 (tflite_lowbit)       INT4 (INT2 per-channel int2)     blockwise FLOAT16 none (symmetric);
                                                                           per channel f32   per channel int64
  tflite   int8 per channel               8                                float32 [N]       int64 [N] (schema)
  coreml   int4/3/2 affine                4 (Core ML's narrowest)          fp16              4 bits, only where
                                                                                             a zero point != 0
  coreml   palettes (lut*)                index bits                       -                 LUT entries fp16
  coreml   int8 per channel               8                                fp16 [N]          int8 [N]
  coreml   int8 per group (tables)        8                                fp16 per group    only where != 0

SmoothQuant factors (float, one per input channel) count with the scales. Float layers, biases, norms and every
other parameter count at the artifact's float width (16 in fp16 artifacts and Core ML's fp16 programs, else
32). Each parameter counts once (tied weights too). Graph structure, names and metadata are not weights: the
file's size_bytes holds them besides.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from edgeq.plan import LayerPlan, OpKind, PerGroup, QuantPlan

OTHER = "other parameters"  # biases, norms, and weights of layers the plan does not list
_SCALE_BITS = {"onnx": 32, "tflite": 32, "coreml": 16}  # an affine scale as stored (low-bit blockwise: below)
_ZERO_POINT_BITS = {"onnx": 8, "tflite": 64, "coreml": 8}  # an int8 zero point (TFLite's schema holds int64)


@dataclass(frozen=True)
class LayerStorage:
    """One layer's weight in the artifact, in bits. `container_bits`: what one code (or float) occupies."""

    name: str  # torch FQN, or OTHER
    op: str
    dtype: str  # int4, int3, lut4, int8, float32, float16, ...
    container_bits: int
    weights: int  # elements
    code_bits: int  # codes, indices, or the float values of a float layer
    scale_bits: int = 0
    zero_point_bits: int = 0
    lut_bits: int = 0

    @property
    def quantized(self) -> bool:
        return not self.dtype.startswith("float")

    @property
    def code_width(self) -> int:
        """Bits of information in one code (int3: 3, lut4: 4), whatever its container holds."""
        return int("".join(c for c in self.dtype if c.isdigit()))

    @property
    def side_bits(self) -> int:
        return self.scale_bits + self.zero_point_bits + self.lut_bits

    @property
    def bits(self) -> int:
        return self.code_bits + self.side_bits

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights if self.weights else 0.0

    def to_json(self) -> dict:
        return {
            "name": self.name, "op": self.op, "dtype": self.dtype, "container_bits": self.container_bits,
            "weights": self.weights, "bits_per_weight": round(self.bits_per_weight, 4),
            "bytes": {"codes": _bytes(self.code_bits), "scales": _bytes(self.scale_bits),
                      "zero_points": _bytes(self.zero_point_bits), "luts": _bytes(self.lut_bits)},
        }


@dataclass(frozen=True)
class WeightStorage:
    """Every parameter of a model as one runtime stores it: the plan's layers, then OTHER."""

    runtime: str
    float_bits: int
    layers: tuple[LayerStorage, ...]

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return sum(layer.bits for layer in self.layers) / max(self.weights, 1)

    @property
    def quantized(self) -> list[LayerStorage]:
        return [layer for layer in self.layers if layer.quantized]

    def bytes_by_kind(self) -> dict[str, int]:
        """quantized_weights: codes and indices; scales_zero_points_luts: what dequantizes them; float_weights."""
        quantized = self.quantized
        return {
            "quantized_weights": _bytes(sum(layer.code_bits for layer in quantized)),
            "scales_zero_points_luts": _bytes(sum(layer.side_bits for layer in quantized)),
            "float_weights": _bytes(sum(layer.bits for layer in self.layers if not layer.quantized)),
        }

    def to_json(self) -> dict:
        return {
            "bits_per_weight": round(self.bits_per_weight, 4),
            "weights": self.weights,
            "float_bits": self.float_bits,
            "bytes": self.bytes_by_kind(),
            "layers": [layer.to_json() for layer in self.layers],
        }


def _bytes(bits: int) -> int:
    return -(-bits // 8)


def float_bits_of(runtime: str, precision: str) -> int:
    """The width float weights are stored at: fp16 artifacts, and Core ML's quantized programs (fp16 compute
    stores float constants as fp16: converters/coreml.py), hold 16 bits; everything else 32."""
    if precision == "fp16" or (runtime == "coreml" and precision != "fp32"):
        return 16
    return 32


def tied_head(module):
    """The LM head of `module` when it shares its weight tensor with the input embedding table, else None."""
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    table = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    tied = head is not None and table is not None and getattr(head, "weight", None) is getattr(table, "weight", False)
    return head if tied else None


def weight_storage(module, plan: QuantPlan | None, runtime: str, float_bits: int = 32) -> WeightStorage:
    """The storage account of `module` (its parameters, each once) under `plan` (None: all float) on `runtime`
    (onnx, tflite, coreml). Layers appear in the module's order; parameters that are no plan layer's weight
    (biases, norms, layers the plan does not list) are summed in one OTHER row."""
    from edgeq.compress.apply import user_fqn

    by_weight = {f"{fqn}.weight": layer for fqn, layer in (plan.layers.items() if plan is not None else ())}
    counted: set[int] = set()
    rows, seen, rest = [], set(), 0
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in counted:  # tied to a parameter already counted: stored once
            continue
        counted.add(id(param))
        layer = by_weight.get(user_fqn(name))
        if layer is None:
            rest += param.numel()
        else:
            rows.append(layer_storage(layer, runtime, float_bits, param.numel()))
            seen.add(layer.fqn)
    for layer in by_weight.values():  # a planned layer whose weight is not a parameter (a plan for another module)
        if layer.fqn not in seen and layer.weight_codes is not None:
            rows.append(layer_storage(layer, runtime, float_bits))
    if rest:
        rows.append(LayerStorage(OTHER, "other", f"float{float_bits}", float_bits, rest, rest * float_bits))
    return WeightStorage(runtime, float_bits, tuple(rows))


def layer_storage(layer: LayerPlan, runtime: str, float_bits: int = 32, elements: int | None = None) -> LayerStorage:
    """One plan layer as `runtime` stores it (the table in the module docstring). `elements`: the weight's size,
    needed for float layers (a plan holds no float weights). Core ML stores mostly-zero int8/int4 codes sparse
    (converters/coreml_sparse.py: a 1-bit mask plus the non-zero codes)."""
    row = _layer_storage(layer, runtime, float_bits, elements)
    if runtime == "coreml" and row.quantized and layer.palette is None:
        from edgeq.converters.coreml_sparse import sparse_code_bits

        sparse = sparse_code_bits(layer)
        if sparse is not None:
            row = dataclasses.replace(row, code_bits=sparse)
    return row


def _layer_storage(layer: LayerPlan, runtime: str, float_bits: int = 32, elements: int | None = None) -> LayerStorage:
    op = layer.op.value
    if layer.palette is not None:
        index_bits = int(layer.palette.shape[1]).bit_length() - 1
        lut_bits = 16 if runtime == "coreml" else float_bits
        size = int(layer.weight_codes.size)
        return LayerStorage(layer.fqn, op, f"lut{index_bits}", index_bits, size, size * index_bits, lut_bits=layer.palette.size * lut_bits)
    if layer.weight is None:
        size = int(elements or 0)
        return LayerStorage(layer.fqn, op, f"float{float_bits}", float_bits, size, size * float_bits)
    quant, size = layer.weight, int(layer.weight_codes.size)
    smooth = 0 if layer.smooth is None else layer.smooth.size * float_bits
    if quant.dtype.bits >= 8 and runtime == "coreml" and isinstance(quant.granularity, PerGroup):
        return _coreml_lowbit(layer, container=8)  # int8 per group: constexpr_blockwise_shift_scale with int8 data
    if quant.dtype.bits >= 8:
        zero_bits = _ZERO_POINT_BITS.get(runtime, 8)
        return LayerStorage(layer.fqn, op, quant.dtype.value, quant.dtype.bits, size, size * quant.dtype.bits,
                            quant.scale.size * _SCALE_BITS.get(runtime, 32) + smooth, quant.zero_point.size * zero_bits)
    low = {"onnx": _onnx_lowbit, "tflite": _tflite_lowbit, "coreml": _coreml_lowbit}.get(runtime, _packed_lowbit)
    return low(layer)


def _packed_lowbit(layer: LayerPlan, container: int = 4, scale_bits: int = 32, zero_bits: int | None = None) -> LayerStorage:
    """Codes packed tight in `container` bits; zero points (`zero_bits` each, default the container) only where
    a packer stores them: unsigned codes, or a signed zero point other than 0."""
    quant, size = layer.weight, int(layer.weight_codes.size)
    stored = not quant.dtype.signed or bool(np.any(quant.zero_point))
    zeros = quant.zero_point.size * (container if zero_bits is None else zero_bits) if stored else 0
    return LayerStorage(layer.fqn, layer.op.value, quant.dtype.value, container, size, size * container, quant.scale.size * scale_bits, zeros)


def _onnx_lowbit(layer: LayerPlan) -> LayerStorage:
    from edgeq.converters.onnx_lowbit import CONTAINER_BITS, layout_of

    container = CONTAINER_BITS.get(layer.weight.dtype, 4)
    found = layout_of(layer) if layer.op == OpKind.LINEAR else None
    if found is None or isinstance(found, str):  # not a MatMulNBits layer (an embedding table): packed tight
        return _packed_lowbit(layer, container)
    quant = layer.weight
    codes = found.n * found.k_blocks * found.block_size * found.bits  # per channel: K padded to the block
    stored = not quant.dtype.signed or bool(np.any(quant.zero_point))
    zeros = found.n * math.ceil(found.k_blocks * found.bits / 8) * 8 if stored else 0  # packed per row, byte-aligned
    return LayerStorage(layer.fqn, layer.op.value, quant.dtype.value, found.bits, int(layer.weight_codes.size), codes,
                        found.n * found.k_blocks * 32, zeros)


def _tflite_lowbit(layer: LayerPlan) -> LayerStorage:
    from edgeq.converters.tflite_lowbit import storage

    _, container = storage(layer)
    if isinstance(layer.weight.granularity, PerGroup):  # BlockwiseQuantization: FLOAT16 scale table, no zero points
        return _packed_lowbit(layer, container, scale_bits=16, zero_bits=0)
    # per channel: QuantizationParameters hold float32 scales and int64 zero points, zero or not
    base = _packed_lowbit(layer, container, scale_bits=32)
    return LayerStorage(base.name, base.op, base.dtype, container, base.weights, base.code_bits, base.scale_bits,
                        layer.weight.zero_point.size * 64)


def _coreml_lowbit(layer: LayerPlan, container: int | None = None) -> LayerStorage:
    from edgeq.converters.coreml_lowbit import CONTAINER_BITS

    container = container or CONTAINER_BITS
    # constexpr_blockwise_shift_scale: an offset tensor only where some zero point is not 0
    base = _packed_lowbit(layer, container, scale_bits=16)
    zeros = layer.weight.zero_point.size * container if np.any(layer.weight.zero_point) else 0
    return LayerStorage(base.name, base.op, base.dtype, base.container_bits, base.weights, base.code_bits, base.scale_bits, zeros)
