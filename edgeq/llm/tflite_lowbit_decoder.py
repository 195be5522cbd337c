"""4-bit weights (int4-dynamic) in a decoder .tflite: the plan's codes and scales, verbatim, in every signature.

The same route as converters/tflite_lowbit.py (whose per-layer checks and flatbuffer helpers this calls): the
decoder is converted with each planned linear layer as an int8 per-channel q/dq stand-in (a float FC would get a
preceding norm's gain folded into its weights, and the plan's codes are not codes of folded weights), then each
stand-in's int8 constant becomes the plan's packed INT4 codes with FLOAT16 block scales, its DEQUANTIZE is
dropped, and LiteRT runs a FULLY_CONNECTED with int8-quantized input rows (XNNPACK qd8-f32-qb4w). Planned
embedding tables become EMBEDDING_LOOKUP over packed codes (converters/tflite_lowbit_tables.py).

What differs from the single-signature converter: "prefill" and "decode" are two subgraphs that share their weight
buffers, so each buffer is rewritten once and every subgraph's tensors over it are retyped; and stand-ins are
found by value, not by module scope. Why by value: litert-torch names tensors after the modules on the call stack
of the signature that traced them, and the two signatures' wrappers differ, while a stand-in's int8 codes are
exactly what was stored. Two planned layers with identical stand-in codes are refused unless their plans agree
(identical weights, identical codes and scales: either attribution is right).
"""

from __future__ import annotations

import numpy as np

from edgeq.errors import ConversionError

TARGET = "tflite decoder"  # what error messages name, as converters name their target


def int4_plan(hf_model, token_ids: np.ndarray, *, group_size: int = 32, algorithm: str = "rtn", keep_float: tuple = (),
              target: str = "tflite", overrides: tuple = ()):
    """The int4-dynamic QuantPlan of `hf_model` on a tflite profile through edgeq's low-bit resolver
    (targets/resolve_lowbit.py): 4-bit symmetric codes per group along K with bfloat16 scales on every linear
    layer, 4-bit tables for embeddings. `token_ids` int [n] (or a list of them) are the calibration samples
    (GPTQ/AWQ fit on them; RTN only runs them to find the executed layers)."""
    import torch

    from edgeq.scheme import scheme_for
    from edgeq.targets import Precision
    from edgeq.targets.profile import load_profile
    from edgeq.targets.resolve import Calibration
    from edgeq.targets.resolve_lowbit import resolve_lowbit_plan

    profile = load_profile(target)
    scheme = scheme_for(Precision.INT4_DYNAMIC, algorithm=algorithm, group_size=group_size,
                        symmetric=profile.quantization.weight_symmetric)
    sequences = token_ids if isinstance(token_ids, (list, tuple)) else [token_ids]
    samples = [{"input_ids": torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]} for ids in sequences]
    return resolve_lowbit_plan(torch.nn.Module.float(hf_model).eval(), profile, Precision.INT4_DYNAMIC, scheme, list(keep_float),
                               (samples[0]["input_ids"],), Calibration(samples, ["input_ids"]), overrides=tuple(overrides))


def stand_in_model(model, plan):
    """(model with int8 q/dq stand-ins for the planned linear layers and the plan's dequantized tables,
    litert-torch quant_config, stand-in codes -> FQN) after checking every planned layer; refuses all unsupported ones at once."""
    from litert_torch.quantize import pt2e_quantizer, quant_config

    from edgeq.calibration.weights import quantize_weight_per_channel
    from edgeq.compress.apply import apply_plan, quantizable_layers
    from edgeq.compress.qdq import WeightForm
    from edgeq.converters.tflite_lowbit import layer_refusal
    from edgeq.converters.tflite_lowbit_tables import dequantized_tables
    from edgeq.plan import LayerPlan, OpKind, QDtype, QuantPlan

    modules = dict(quantizable_layers(model))
    planned = {fqn: layer for fqn, layer in plan.layers.items() if layer.weight is not None}
    if not planned:
        raise ConversionError(f"target {TARGET}: the plan quantizes no layer")
    refusals = [f"  - {fqn}: {reason}" for fqn, layer in planned.items()
                if (reason := "not a layer of this model" if fqn not in modules else layer_refusal(layer, modules[fqn]))]
    if refusals:
        raise ConversionError(f"target {TARGET} cannot hold the {plan.scheme} plan:\n" + "\n".join(refusals))
    stand_ins = QuantPlan(plan.scheme, plan.target)
    owners: dict[tuple, str] = {}  # (shape, int8 stand-in code bytes) -> FQN: how pack_decoder finds each layer
    for fqn, layer in planned.items():
        if layer.op == OpKind.LINEAR:
            quant, codes = quantize_weight_per_channel(modules[fqn].weight, QDtype.INT8, axis=0)
            stand_ins.layers[fqn] = LayerPlan(fqn, OpKind.LINEAR, quant, codes)
            key = codes.shape, np.ascontiguousarray(codes, dtype=np.int8).tobytes()
            other = owners.setdefault(key, fqn)
            if other != fqn and not _same_plan(planned[other], layer):
                raise ConversionError(f"target {TARGET}: layers {other} and {fqn} have identical weights but different plans; "
                                      "edgeq finds stand-ins by value and cannot tell them apart")
    # As converters/tflite.py's qdq_mode: the PT2E config only selects litert-torch's q/dq lowering (strict mode).
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    converted = apply_plan(dequantized_tables(model, plan), stand_ins, WeightForm.QDQ)
    return converted.eval(), quant_config.QuantConfig(pt2e_quantizer=quantizer), owners


def pack_decoder(flatbuffer: bytes, plan, owners: dict) -> bytes:
    """Rewrite every subgraph's stand-in FULLY_CONNECTED weights as the plan's codes (`<fqn>.weight`, as the
    parity reader finds them) and the planned tables; then require XNNPACK to take every low-bit op in every
    signature (the builtin kernel is a reference loop ~1,000x slower)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    from edgeq.converters.parity_tflite import INT8, WEIGHT_SUFFIX, constant, op_names, read_model
    from edgeq.converters.tflite_lowbit import _bypass_stand_ins, _packed, _raise_versions, _unfuse_activations, storage
    from edgeq.converters.tflite_lowbit_tables import pack_tables
    from edgeq.plan import OpKind, PerGroup
    from edgeq.validate.runners.tflite_decoder_delegation import undelegated_by_signature

    tflite = read_model(flatbuffer)
    names = op_names(tflite)
    linear = {fqn: layer for fqn, layer in plan.layers.items() if layer.weight is not None and layer.op == OpKind.LINEAR}
    packed_buffers: dict[int, str] = {}  # buffer -> fqn, rewritten once for all subgraphs
    scale_buffers: dict[str, int] = {}  # fqn -> its FLOAT16 block-scale buffer, shared by the subgraphs' scale tensors
    notes: list[str] = []
    low_bit_ops: dict[str, set[int]] = {}  # signature -> rewritten op positions
    found: set[str] = set()
    # Every subgraph's uses are found before any buffer is rewritten: the subgraphs share the buffers.
    all_uses = [_uses_by_layer(tflite, subgraph, names, owners, constant) for subgraph in tflite.subgraphs]
    for subgraph, uses in zip(tflite.subgraphs, all_uses):
        found |= set(uses)
        fc_ops = _bypass_stand_ins(subgraph, uses, TARGET)
        hybrid, blockwise = [], []
        for fqn, layer_uses in uses.items():
            layer = linear[fqn]
            tensor_type, bits = storage(layer)
            tensor = subgraph.tensors[layer_uses[0].tensor]
            first = tensor.buffer not in packed_buffers  # else an earlier subgraph rewrote the shared buffer
            if packed_buffers.setdefault(tensor.buffer, fqn) != fqn:
                raise ConversionError(f"target {TARGET}: layers {packed_buffers[tensor.buffer]} and {fqn} share one weight buffer; keep one float")
            if first:
                buffer = tflite.buffers[tensor.buffer]
                buffer.data, buffer.offset, buffer.size = _packed(layer.weight_codes, bits), 0, 0
            tensor.type = tensor_type
            tensor.name = (fqn + WEIGHT_SUFFIX).encode()
            tensor.quantization = _quantization(tflite, subgraph, fqn, layer, scale_buffers, schema)
            (blockwise if isinstance(layer.weight.granularity, PerGroup) else hybrid if tensor_type == INT8 else []).extend(fc_ops[fqn])
        positions = {id(op): index for index, op in enumerate(subgraph.operators)}
        _raise_versions(tflite, subgraph, [positions[id(op)] for op in hybrid])
        pack_tables(tflite, subgraph, plan, notes, TARGET)  # tables shared by signatures end up one copy per signature
        _unfuse_activations(tflite, subgraph, [positions[id(op)] for op in blockwise], TARGET)
        rewritten = {id(op) for ops in fc_ops.values() for op in ops}
        low_bit_ops[subgraph.name.decode()] = {index for index, op in enumerate(subgraph.operators) if id(op) in rewritten}
    _share_equal_weights(tflite)
    missing = sorted(set(linear) - found)
    if missing:
        raise ConversionError(f"target {TARGET}: no int8 stand-in weight found for layer(s) {', '.join(missing[:5])} in the converted decoder")
    packed = bytes(flatbuffer_utils.convert_object_to_bytearray(tflite))
    try:
        missed = undelegated_by_signature(packed, low_bit_ops)
    except RuntimeError as exc:
        raise ConversionError(f"target {TARGET}: the low-bit decoder does not load in LiteRT: {exc}") from exc
    if any(missed.values()):
        where = "; ".join(f"{sig}: {len(ops)} op(s)" for sig, ops in missed.items() if ops)
        raise ConversionError(f"target {TARGET}: XNNPACK did not take every low-bit FULLY_CONNECTED ({where}); "
                              "LiteRT's builtin kernel for them is a reference loop, so the artifact is not usable")
    return packed


def _share_equal_weights(tflite) -> None:
    """One buffer per distinct weight: pack_tables gives a table read by both signatures a buffer per signature
    (SmolLM2-135M: 16 MB of int4 embedding twice), and a tied LM head holds the same int8 codes as the input
    table (28.3 MB twice); weight tensors over equal bytes are pointed at one buffer (constant buffers are
    read-only, and TFLite lets tensors share them; each tensor keeps its own type and scales), the others emptied."""
    from edgeq.converters.parity_tflite import WEIGHT_SUFFIX, tensor_name

    first: dict[bytes, int] = {}
    moved: set[int] = set()
    for subgraph in tflite.subgraphs:
        for tensor in subgraph.tensors:
            name = tensor_name(tensor)
            buffer = tflite.buffers[tensor.buffer]
            if not name.endswith((WEIGHT_SUFFIX, ".weight.scales")) or buffer.data is None or not len(buffer.data):
                continue
            key = np.asarray(buffer.data).tobytes()
            keep = first.setdefault(key, tensor.buffer)
            if keep != tensor.buffer:
                moved.add(tensor.buffer)
                tensor.buffer = keep
    referenced = {tensor.buffer for subgraph in tflite.subgraphs for tensor in subgraph.tensors}
    for index in moved - referenced:
        tflite.buffers[index].data = None


def _same_plan(a, b) -> bool:
    return np.array_equal(a.weight_codes, b.weight_codes) and np.array_equal(a.weight.scale, b.weight.scale)


def _uses_by_layer(tflite, subgraph, names, owners: dict, constant) -> dict[str, list]:
    """FQN -> the FULLY_CONNECTED uses of its stand-in (int8 constant behind a DEQUANTIZE) in `subgraph`."""
    from edgeq.converters.parity_tflite import INT8, weight_uses

    uses: dict[str, list] = {}
    for use in weight_uses(tflite, subgraph, names):
        tensor = subgraph.tensors[use.tensor]
        if tensor.type != INT8 or use.dequantize is None:
            continue
        values = constant(tflite, tensor)
        fqn = owners.get((values.shape, np.ascontiguousarray(values).tobytes()))
        if fqn is None:
            raise ConversionError(f"target {TARGET}: an int8 weight in the converted decoder is no planned layer's stand-in")
        if use.op_name != "FULLY_CONNECTED":
            raise ConversionError(f"target {TARGET}: layer {fqn} was lowered to {use.op_name}; LiteRT's low-bit kernels are FULLY_CONNECTED only")
        uses.setdefault(fqn, []).append(use)
    return uses


def _quantization(tflite, subgraph, fqn: str, layer, scale_buffers: dict, schema):
    """converters/tflite_lowbit.py's parameters (per-channel float32, or a FLOAT16 block-scale table by index), the
    table's buffer shared between subgraphs."""
    from edgeq.plan import PerChannel

    quant = schema.QuantizationParametersT()
    quant.quantizedDimension = 0
    if isinstance(layer.weight.granularity, PerChannel):
        quant.scale = layer.weight.scale.astype(np.float32).ravel()
        quant.zeroPoint = np.zeros(quant.scale.size, dtype=np.int64)
        return quant
    scales = layer.weight.scale.astype(np.float16)  # exact: layer_refusal checked bf16 values in float16's normal range
    if fqn not in scale_buffers:
        buffer = schema.BufferT()
        buffer.data = scales.view(np.uint8).ravel()
        tflite.buffers.append(buffer)
        scale_buffers[fqn] = len(tflite.buffers) - 1
    table = schema.TensorT()
    table.shape = np.asarray(scales.shape, dtype=np.int32)
    table.type = 1  # FLOAT16
    table.buffer = scale_buffers[fqn]
    table.name = f"{fqn}.weight.scales".encode()
    subgraph.tensors.append(table)
    details = schema.BlockwiseQuantizationT()
    details.scales = len(subgraph.tensors) - 1
    details.zeroPoints = -1  # symmetric: LiteRT's blockwise kernels have no zero point
    details.blockSize = layer.weight.granularity.size
    quant.detailsType = schema.QuantizationDetails.BlockwiseQuantization
    quant.details = details
    return quant
