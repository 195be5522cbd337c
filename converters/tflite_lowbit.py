"""TFLite / LiteRT low-bit weights (int4-dynamic): the plan's codes and scales packed into FULLY_CONNECTED.

LiteRT computes low-bit weights in one way only: a FULLY_CONNECTED with float input and an INT4 (or INT2)
weight, whose input rows are quantized to int8 at run time (dynamic range). XNNPACK runs it fast
(qd8-f32-qb4w blockwise, qc4w / qc2w per channel); the builtin kernel is a scalar loop ~1,000x slower, so the
converter fails an artifact whose low-bit layers XNNPACK does not take (validate/runners/litert_delegation.py).
Measured facts and sources: shared/research/lowbit-prune-peers.md §3.

Route: litert-torch converts the model with each planned linear layer as an int8 q/dq stand-in (lowbit_conversion
says why: a float FC would get a preceding LayerNorm's affine folded into its weights), then each stand-in's int8
constant (found by its module scope, as converters/tflite.py names int8 weights) is rewritten in the flatbuffer
and its DEQUANTIZE dropped, as
ai-edge-quantizer writes its own `dynamic_wi4b*_afp32` recipes (same bytes and parameters, checked on a
reference model), but with the plan's codes and scales verbatim:

  plan layer                         tensor   quantization                                     XNNPACK kernel
  int4/int3/int2 per group g         INT4     BlockwiseQuantization{scales: FLOAT16 [N, K/g]   qb4w
                                              tensor, zero_points -1, block_size g}
  int4/int3 per channel              INT4     scale [N] float32, zero point 0, dimension 0      qc4w
  int2 per channel                   INT2     scale [N] float32, zero point 0, dimension 0      qc2w
  int8 per channel (a fallback)      INT8     scale [N] float32, zero point 0, dimension 0      qd8-f32-qc8w (hybrid)

A blockwise FULLY_CONNECTED's fused activation (ReLU from litert-torch's fusion) becomes a separate op after it:
LiteRT 2.3's builtin blockwise kernel ignores fused activations (measured: ReLU outputs left negative, while
XNNPACK applies it), and edgeq's per-layer drift runs the builtin kernels; XNNPACK fuses the op back itself.

Codes are packed row-major, lowest bits first (parity_tflite.pack_codes). 3-bit codes, and 2-bit codes per
group, live in the INT4 container (LiteRT has no INT3, and XNNPACK refuses blockwise INT2: the whole model
then fails to load): exact values, 4 bits of storage each, said in the artifact's notes.

Refused before any work, per layer: asymmetric codes (no zero point in LiteRT's low-bit kernels), a group size
that is not a multiple of 32 or does not divide K, block scales not exactly representable in bfloat16 or outside
float16's normal range (XNNPACK reads the FLOAT16 scales and rounds them to bf16: the plan must already be on
that grid), per-channel int4 codes of -8 (LiteRT's builtin per-channel INT4 kernel computes them wrongly,
measured; XNNPACK does not: per channel the grid is [-7, 7]), static activations, and low-bit weights on
anything but a linear layer. Embedding tables (4-bit per group, int8 per row) are EMBEDDING_LOOKUP's:
converters/tflite_lowbit_tables.py.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from edgeq.converters.base import ConversionRequest, Refusal
from edgeq.errors import ConversionError
from edgeq.plan import LayerPlan, OpKind, PerChannel, PerGroup, QDtype, QuantPlan
from edgeq.targets import Precision

LOW_BIT = frozenset({Precision.INT4_DYNAMIC})
# Schemes with float activations: LiteRT has no fast kernel for them (an INT4 DEQUANTIZE runs in the reference
# kernel on every call, and it takes no blockwise parameters at all), so they are refused with what would work.
FLOAT_ACTIVATION_LOW_BIT = frozenset({
    Precision.INT4_WEIGHT, Precision.INT3_WEIGHT, Precision.INT2_WEIGHT,
    Precision.LUT2_WEIGHT, Precision.LUT3_WEIGHT, Precision.LUT4_WEIGHT, Precision.LUT6_WEIGHT, Precision.LUT8_WEIGHT,
})
BLOCK_MULTIPLE = 32  # XNNPACK's blockwise FC takes block sizes that are multiples of 32 (xnnpack_delegate.cc)
FP16_MIN_NORMAL = 2.0**-14  # XNNPACK checks every block scale is a normal float16 > 0
FP16_MAX = 65504.0
_LOW_BIT_DTYPES = (QDtype.INT2, QDtype.INT3, QDtype.INT4)
_HYBRID_FC_VERSION = 12  # litert-torch's version for float-input, int8 per-channel FULLY_CONNECTED
# Fused activation (ActivationFunctionType) -> the builtin op that computes it alone (BuiltinOperator code).
_ACTIVATION_OPS = {1: 19, 2: 20, 3: 21, 4: 28}  # RELU, RELU_N1_TO_1, RELU6, TANH


def float_activation_refusal(precision: Precision) -> Refusal:
    return Refusal("", (
        f"{precision}: LiteRT has no kernel that computes low-bit or palettized weights with float activations "
        "(an INT4 DEQUANTIZE runs in the reference kernel on every call, per channel only; there is no look-up-table "
        "op); use int4-dynamic (4-bit weights per group of 32-256 or per channel, input rows quantized to int8 at "
        "run time: XNNPACK's blockwise kernel), or int8-weight for float activations"
    ))


def bf16_exact(values: np.ndarray) -> np.ndarray:
    """Whether each float32 value is a bfloat16 value (its low 16 bits are zero)."""
    return (np.asarray(values, dtype=np.float32).view(np.uint32) & 0xFFFF) == 0


def layer_refusal(layer: LayerPlan, module: torch.nn.Module | None) -> str | None:
    """Why TFLite cannot hold this planned layer as a low-bit/hybrid FULLY_CONNECTED (None: it can)."""
    quant, codes = layer.weight, layer.weight_codes
    if quant is None:
        return None
    if layer.op == OpKind.EMBEDDING and layer.activation is None and layer.output is None:
        from edgeq.converters.tflite_lowbit_tables import table_refusal  # EMBEDDING_LOOKUP tables

        return table_refusal(layer, module)
    if layer.activation is not None or layer.output is not None:
        return "static activation quantization: LiteRT's low-bit FULLY_CONNECTED takes float input and quantizes it at run time; plan no activation scales"
    if layer.op != OpKind.LINEAR or not isinstance(module, torch.nn.Linear):
        return f"low-bit weights on a {layer.op.value} layer: LiteRT's low-bit kernels are FULLY_CONNECTED only; keep it float or int8 elsewhere"
    if quant.dtype == QDtype.INT8:
        if not isinstance(quant.granularity, PerChannel) or quant.granularity.axis != 0 or not quant.symmetric:
            return "int8 weights in a low-bit artifact run TFLite's hybrid kernel, which takes symmetric per-output-channel scales"
        if layer.dynamic_activation != QDtype.INT8:
            return "an int8 layer in a low-bit artifact runs hybrid (int8 activations at run time); plan it with dynamic int8 activations"
    elif layer.dynamic_activation not in (None, QDtype.INT8):  # low-bit layers run dynamic int8: no other kernel
        return f"dynamic {layer.dynamic_activation} activations: LiteRT quantizes a low-bit FULLY_CONNECTED's input to int8"
    elif quant.dtype not in _LOW_BIT_DTYPES:
        held = "signed int4/int3/int2 codes with zero point 0"
        if quant.dtype in (QDtype.UINT2, QDtype.UINT3, QDtype.UINT4):
            return f"asymmetric {quant.dtype} weights: LiteRT's low-bit kernels have no zero point; quantize symmetric ({held})"
        return f"{quant.dtype} weights: LiteRT's low-bit FULLY_CONNECTED holds {held}"
    if codes is None or codes.ndim != 2 or tuple(codes.shape) != tuple(module.weight.shape):
        shape = None if codes is None else tuple(codes.shape)
        return f"the plan's codes {shape} are not the layer's weight {tuple(module.weight.shape)}"
    if codes.min(initial=0) < quant.dtype.qmin or codes.max(initial=0) > quant.dtype.qmax:
        return f"codes outside the {quant.dtype} range [{quant.dtype.qmin}, {quant.dtype.qmax}]"
    columns = codes.shape[1]
    granularity = quant.granularity
    if isinstance(granularity, PerChannel):
        if granularity.axis != 0:
            return f"per-channel scales along axis {granularity.axis}: TFLite's FULLY_CONNECTED scales output channels (axis 0)"
        if quant.dtype == QDtype.INT4 and codes.min(initial=0) == QDtype.INT4.qmin:
            # Measured on LiteRT 2.3: XNNPACK computes -8 right, the builtin hybrid kernel does not (7 dB against
            # torch), and edgeq's per-layer drift and any runtime without XNNPACK use the builtin kernel.
            return ("per-channel int4 codes include -8, which LiteRT's builtin per-channel INT4 kernel computes wrongly; "
                    "quantize per channel on [-7, 7] (min-max scales do) or per group (blockwise codes may use -8)")
        return None
    if not isinstance(granularity, PerGroup) or granularity.axis != 1:
        return f"{granularity.to_json()['kind']} scales: TFLite's low-bit FULLY_CONNECTED takes per-channel or per-group (along K) scales"
    if quant.dtype == QDtype.INT8:
        return "int8 per group: LiteRT's blockwise FULLY_CONNECTED is INT4 only"
    size = granularity.size
    if size % BLOCK_MULTIPLE or columns % size:
        return (f"group size {size} over {columns} input features: XNNPACK's blockwise kernel takes groups that are a "
                f"multiple of {BLOCK_MULTIPLE} and divide K (e.g. 32, 64, 128) or per-channel scales")
    scale = quant.scale
    inexact = ~bf16_exact(scale)
    if inexact.any():
        return (f"{int(inexact.sum())} of {scale.size} block scales are not bfloat16 values (e.g. {float(scale[inexact][0])!r}): "
                "XNNPACK rounds block scales to bfloat16, so the plan must be made on the bfloat16 grid")
    if scale.min() < FP16_MIN_NORMAL or scale.max() > FP16_MAX:
        return (f"block scales from {float(scale.min()):.3g} to {float(scale.max()):.3g}: LiteRT stores them as float16 and "
                f"XNNPACK takes only normal values ({FP16_MIN_NORMAL:.3g} to {FP16_MAX:g})")
    return None


def lowbit_refusals(request: ConversionRequest) -> list[Refusal]:
    """Every planned layer TFLite cannot hold as the plan says, each with what would work."""
    plan = request.plan
    if plan is None:
        return []
    from edgeq.compress.apply import quantizable_layers

    modules = dict(quantizable_layers(request.model.module))  # by user FQN, as the plan names layers
    refusals = []
    for fqn, layer in plan.layers.items():
        reason = layer_refusal(layer, modules.get(fqn))
        if reason:
            refusals.append(Refusal(fqn, reason))
    return refusals


def checked_lowbit_plan(request: ConversionRequest) -> QuantPlan:
    """The request's plan, or one ConversionError listing every layer TFLite cannot hold, before any work."""
    target = request.profile.id
    if request.plan is None:
        raise ConversionError(f"target {target}: {request.precision} is lowered from a QuantPlan, and none was given")
    if not any(layer.weight is not None for layer in request.plan.layers.values()):
        raise ConversionError(f"target {target}: the {request.precision} plan quantizes no layer")
    refusals = lowbit_refusals(request)
    if refusals:
        raise ConversionError(f"target {target} cannot hold the {request.precision} plan:\n" + "\n".join(f"  - {r}" for r in refusals))
    return request.plan


def storage(layer: LayerPlan) -> tuple[int, int]:
    """(TFLite tensor type, bits per stored code) of a checked layer."""
    from edgeq.converters.parity_tflite import INT2, INT4, INT8

    dtype = layer.weight.dtype
    if dtype == QDtype.INT8:
        return INT8, 8
    if dtype == QDtype.INT2 and isinstance(layer.weight.granularity, PerChannel):
        return INT2, 2
    return INT4, 4


def pack_lowbit(flatbuffer: bytes, plan: QuantPlan, scopes: dict[str, str], request: ConversionRequest, notes: list[str]) -> bytes:
    """Rewrite each planned layer's float FULLY_CONNECTED weight as the plan's packed codes and scales, named
    `<fqn>.weight` (the parity reader finds it so); then require XNNPACK to take every rewritten op."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    from edgeq.converters.parity_tflite import INT8, WEIGHT_SUFFIX, op_names, read_model, tensor_name, weight_uses

    target = request.profile.id
    model = read_model(flatbuffer)
    names = op_names(model)
    subgraph = model.subgraphs[0]  # one signature, one subgraph
    planned = {fqn for fqn, layer in plan.layers.items() if layer.weight is not None and layer.op != OpKind.EMBEDDING}
    uses: dict[str, list] = {}  # fqn -> the ops computing with its weight (a module called twice has two)
    owners: dict[int, str] = {}  # weight tensor -> fqn
    for use in weight_uses(model, subgraph, names):
        tensor = subgraph.tensors[use.tensor]
        fqn = next((scopes[s] for s in tensor_name(tensor).split(";") if s in scopes), None)
        if fqn not in planned:
            continue
        if use.op_name != "FULLY_CONNECTED" or use.dequantize is None:
            raise ConversionError(f"target {target}: layer {fqn} was lowered to {use.op_name}, not a FULLY_CONNECTED over its int8 stand-in weight; LiteRT's low-bit kernels are FULLY_CONNECTED only")
        if any(other.tensor != use.tensor for other in uses.get(fqn, [])):
            raise ConversionError(f"target {target}: layer {fqn}'s weight is stored twice in the TFLite model")
        if owners.setdefault(use.tensor, fqn) != fqn:
            raise ConversionError(f"target {target}: layers {owners[use.tensor]} and {fqn} share one weight tensor; keep them float")
        uses.setdefault(fqn, []).append(use)
    # A layer none of whose tensors carries its scope was removed as dead code (e.g. BERT's pooler under a mean-pooled
    # sentence embedding): noted, as weight parity reports it. One whose scope is there but not as a FULLY_CONNECTED
    # weight was lowered otherwise: refused.
    segments = {part for tensor in subgraph.tensors for part in tensor_name(tensor).split(";")}
    seen = {scopes[part] for part in segments if part in scopes}
    lost = sorted((planned - set(uses)) & seen)
    if lost:
        raise ConversionError(
            f"target {target}: no FULLY_CONNECTED float weight found for layer(s) {', '.join(lost[:5])} in the converted "
            "model (litert-torch lowered them otherwise, or folded them)"
        )
    unused = sorted(planned - set(uses) - seen)
    if unused:
        notes.append(f"not in the converted model (removed by litert-torch as unused): {', '.join(unused)}")
    fc_ops = _bypass_stand_ins(subgraph, uses, target)
    references: dict[int, int] = {}
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            references[tensor.buffer] = references.get(tensor.buffer, 0) + 1
    containers, hybrid_ops, blockwise_ops = [], [], []
    for fqn, fqn_uses in uses.items():
        layer = plan.layers[fqn]
        tensor = subgraph.tensors[fqn_uses[0].tensor]
        if [int(d) for d in tensor.shape] != list(layer.weight_codes.shape):
            raise ConversionError(f"target {target}: layer {fqn}'s FULLY_CONNECTED weight is {list(tensor.shape)}, the plan's codes {list(layer.weight_codes.shape)}")
        tensor_type, bits = storage(layer)
        data = _packed(layer.weight_codes, bits)
        if references.get(tensor.buffer, 0) > 1:  # litert-torch shares equal constants: give this one its own buffer
            buffer = schema.BufferT()
            model.buffers.append(buffer)
            tensor.buffer = len(model.buffers) - 1
        model.buffers[tensor.buffer].data = data
        model.buffers[tensor.buffer].offset, model.buffers[tensor.buffer].size = 0, 0
        tensor.type = tensor_type
        tensor.name = (fqn + WEIGHT_SUFFIX).encode()
        tensor.quantization = _quantization(model, subgraph, fqn, layer, schema)
        if bits != layer.weight.dtype.bits:
            containers.append(f"{fqn} ({layer.weight.dtype})")
        if tensor_type == INT8:
            hybrid_ops += fc_ops[fqn]
        if isinstance(layer.weight.granularity, PerGroup):
            blockwise_ops += fc_ops[fqn]
    positions = {id(op): index for index, op in enumerate(subgraph.operators)}
    hybrid_ops, blockwise_ops = ([positions[id(op)] for op in ops] for ops in (hybrid_ops, blockwise_ops))
    _raise_versions(model, subgraph, hybrid_ops)
    from edgeq.converters.tflite_lowbit_tables import pack_tables

    pack_tables(model, subgraph, plan, notes, target)  # embedding tables: EMBEDDING_LOOKUP
    rewritten = {id(op): fqn for fqn, ops in fc_ops.items() for op in ops}
    _unfuse_activations(model, subgraph, blockwise_ops, target)  # last: it moves operator positions
    if containers:
        notes.append(f"{len(containers)} layer(s) hold their codes in LiteRT's INT4 type, 4 bits each (no INT3; XNNPACK refuses blockwise INT2): {', '.join(containers[:5])}")
    notes.append(
        f"{len(uses)} linear layer(s) run LiteRT's low-bit FULLY_CONNECTED: packed weights, input rows quantized to int8 "
        "per call (XNNPACK: asymmetric per row), so outputs differ from float math with the same weights"
    )
    packed = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    positions = {id(op): index for index, op in enumerate(subgraph.operators)}
    _require_delegated(packed, {positions[key]: fqn for key, fqn in rewritten.items()}, target)
    return packed


def lowbit_conversion(module: torch.nn.Module, request: ConversionRequest, plan: QuantPlan):
    """(module to convert, quant_config, strict) for a low-bit plan: the plan's dequantized tables, and each planned
    linear layer as an int8 per-channel q/dq stand-in, converted in litert-torch's strict q/dq mode.

    Why a stand-in: converting float linear layers lets the TFLite converter fold a preceding LayerNorm's affine
    (gamma, beta) into the FULLY_CONNECTED weights and bias (measured on all-MiniLM-L6-v2: every q/k/v and
    intermediate FC reads the un-scaled normalized tensor), and no plan's codes are codes of those folded weights
    (gamma varies within a block): writing them there computed another function (cosine 0.03 against FP32). An
    int8 constant behind a DEQUANTIZE is not folded (as int8-dynamic artifacts show); pack_lowbit then replaces
    it with the plan's codes and drops the DEQUANTIZE."""
    from edgeq.calibration.weights import quantize_weight_per_channel
    from edgeq.compress.apply import apply_plan, quantizable_layers
    from edgeq.compress.qdq import WeightForm
    from edgeq.converters.tflite import qdq_mode
    from edgeq.converters.tflite_lowbit_tables import dequantized_tables

    modules = dict(quantizable_layers(module))
    stand_ins = QuantPlan(plan.scheme, plan.target)
    for fqn, layer in plan.layers.items():
        if layer.weight is not None and layer.op == OpKind.LINEAR:
            quant, codes = quantize_weight_per_channel(modules[fqn].weight, QDtype.INT8, axis=0)
            stand_ins.layers[fqn] = LayerPlan(fqn, OpKind.LINEAR, quant, codes)
    quant_config, strict = qdq_mode(request)
    return apply_plan(dequantized_tables(module, plan), stand_ins, WeightForm.QDQ), quant_config, strict


def _bypass_stand_ins(subgraph, uses: dict[str, list], target: str) -> dict[str, list]:
    """Feed each planned FULLY_CONNECTED its weight constant directly and drop the stand-in's DEQUANTIZE;
    returns FQN -> the FC operators (objects: positions change here)."""
    consumers: dict[int, int] = {}
    for op in subgraph.operators:
        for index in op.inputs:
            consumers[index] = consumers.get(index, 0) + 1
    fc_ops: dict[str, list] = {}
    dropped: set[int] = set()
    for fqn, fqn_uses in uses.items():
        for use in fqn_uses:
            op = subgraph.operators[use.op]
            dequantized = op.inputs[use.operand]
            op.inputs[use.operand] = use.tensor
            consumers[dequantized] -= 1
            dropped.add(use.dequantize)
            fc_ops.setdefault(fqn, []).append(op)
    shared = [index for index in dropped if consumers[subgraph.operators[index].outputs[0]] > 0]
    if shared:
        raise ConversionError(f"target {target}: a planned layer's weight also feeds an op other than its FULLY_CONNECTED; keep it float")
    subgraph.operators = [op for index, op in enumerate(subgraph.operators) if index not in dropped]
    return fc_ops


def _packed(codes: np.ndarray, bits: int) -> np.ndarray:
    from edgeq.converters.parity_tflite import pack_codes

    return np.ascontiguousarray(codes, dtype=np.int8).view(np.uint8).ravel() if bits == 8 else pack_codes(codes, bits)


def _quantization(model, subgraph, fqn: str, layer: LayerPlan, schema):
    """The weight's QuantizationParameters: per-channel float32 scales, or a FLOAT16 scale table by index."""
    quant = schema.QuantizationParametersT()
    quant.quantizedDimension = 0
    if isinstance(layer.weight.granularity, PerChannel):
        quant.scale = layer.weight.scale.astype(np.float32).ravel()
        quant.zeroPoint = np.zeros(quant.scale.size, dtype=np.int64)
        return quant
    scales = layer.weight.scale.astype(np.float16)  # exact: checked to be bf16 values in float16's normal range
    buffer = schema.BufferT()
    buffer.data = scales.view(np.uint8).ravel()
    model.buffers.append(buffer)
    table = schema.TensorT()
    table.shape = np.asarray(scales.shape, dtype=np.int32)
    table.type = 1  # FLOAT16
    table.buffer = len(model.buffers) - 1
    table.name = f"{fqn}.weight.scales".encode()
    subgraph.tensors.append(table)
    details = schema.BlockwiseQuantizationT()
    details.scales = len(subgraph.tensors) - 1
    details.zeroPoints = -1  # symmetric: LiteRT's blockwise kernels have no zero point
    details.blockSize = layer.weight.granularity.size
    quant.detailsType = schema.QuantizationDetails.BlockwiseQuantization
    quant.details = details
    return quant


def _raise_versions(model, subgraph, ops: list[int]) -> None:
    """int8 hybrid FULLY_CONNECTEDs claim the version litert-torch writes for them (a code of their own)."""
    raised: dict[int, int] = {}
    for index in ops:
        op = subgraph.operators[index]
        code = model.operatorCodes[op.opcodeIndex]
        if code.version >= _HYBRID_FC_VERSION:
            continue
        if op.opcodeIndex not in raised:
            hybrid = copy.copy(code)
            hybrid.version = _HYBRID_FC_VERSION
            model.operatorCodes.append(hybrid)
            raised[op.opcodeIndex] = len(model.operatorCodes) - 1
        op.opcodeIndex = raised[op.opcodeIndex]


def _unfuse_activations(model, subgraph, ops: list[int], target: str) -> None:
    """Move each op's fused activation into its own op right after it (see the module docstring)."""
    from ai_edge_litert import schema_py_generated as schema

    from edgeq.converters.parity_tflite import tensor_name

    for index in sorted(set(ops), reverse=True):  # from the end, so earlier positions stay valid
        op = subgraph.operators[index]
        fused = op.builtinOptions.fusedActivationFunction
        if fused == schema.ActivationFunctionType.NONE:
            continue
        if fused not in _ACTIVATION_OPS:
            raise ConversionError(f"target {target}: a low-bit FULLY_CONNECTED fuses activation {fused}, which edgeq cannot split off")
        output = subgraph.tensors[op.outputs[0]]
        before = copy.copy(output)
        before.name = (tensor_name(output) + "/pre_activation").encode()
        before.buffer = _empty_buffer(model, schema)
        subgraph.tensors.append(before)
        activation = schema.OperatorT()
        activation.opcodeIndex = _opcode(model, schema, _ACTIVATION_OPS[fused])
        activation.inputs = np.asarray([len(subgraph.tensors) - 1], dtype=np.int32)
        activation.outputs = np.asarray([op.outputs[0]], dtype=np.int32)
        op.outputs = np.asarray([len(subgraph.tensors) - 1], dtype=np.int32)
        op.builtinOptions.fusedActivationFunction = schema.ActivationFunctionType.NONE
        subgraph.operators.insert(index + 1, activation)


def _empty_buffer(model, schema) -> int:
    model.buffers.append(schema.BufferT())
    return len(model.buffers) - 1


def _opcode(model, schema, builtin: int) -> int:
    """Index of the operator code of `builtin` (version 1), added if the model has none."""
    for index, code in enumerate(model.operatorCodes):
        if code.builtinCode == builtin and code.version == 1 and not code.customCode:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _require_delegated(flatbuffer: bytes, ops: dict[int, str], target: str) -> None:
    """Load the artifact in LiteRT with its default delegate; every rewritten op must be in an XNNPACK partition."""
    from edgeq.validate.runners.litert_delegation import undelegated_ops

    try:
        missed = undelegated_ops(flatbuffer, sorted(ops))
    except RuntimeError as exc:
        raise ConversionError(f"target {target}: the low-bit TFLite model does not load: {exc}") from exc
    if missed:
        layers = ", ".join(sorted({ops[p.index] for p in missed})[:5])
        raise ConversionError(
            f"target {target}: LiteRT's XNNPACK delegate did not take the low-bit FULLY_CONNECTED of {layers}; "
            "its builtin kernel is a reference loop ~1,000x slower, so the artifact is not usable"
        )
