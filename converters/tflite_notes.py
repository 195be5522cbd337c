"""What a static-scheme TFLite artifact computes in integers and what in float, read from its ops, and whether
XNNPACK (LiteRT's default CPU delegate) takes each planned layer's kernel: the plan note of w8a8 on float-IO
targets (docs/research/tflite-w8a8-speed.md)."""

from __future__ import annotations

from edgeq.plan import QuantPlan

_FLOAT_TYPES = {0, 1}  # TFLite TensorType FLOAT32, FLOAT16


def compute_note(plan: QuantPlan, kernels: dict, dynamic: list[str], subgraph) -> str:
    """What a static scheme's artifact computes in integers and what in float, read from its ops (`kernels`: the
    FULLY_CONNECTED / CONV_2D op of each planned linear or conv layer, by FQN).

    A layer with static input and output ranges is an integer island (QUANTIZE -> int8 FULLY_CONNECTED / CONV_2D
    -> DEQUANTIZE). A layer with only its input planned computes in float between QUANTIZE and DEQUANTIZE: TFLite
    has no int8-in / float-out kernel (docs/research/tflite-w8a8-speed.md). The ops between layers stay float.
    """
    static = [fqn for fqn in kernels if plan.layers[fqn].activation is not None]
    islands = [fqn for fqn in static if subgraph.tensors[kernels[fqn].inputs[0]].type not in _FLOAT_TYPES]
    simulated = [fqn for fqn in static if fqn not in islands]
    bits = next(iter(plan.layers[fqn].activation.dtype.bits for fqn in static), 8)
    parts = [f"{len(islands)} of {len(kernels)} linear/conv layers run int{bits} kernels (int{bits} input and output, QUANTIZE/DEQUANTIZE around each)"]
    if dynamic:
        parts.append(f"{len(dynamic)} the hybrid kernel (int8 weights, input rows quantized per call)")
    if simulated:
        parts.append(
            f"{len(simulated)} with int{bits} activations in the plan compute in float (QUANTIZE/DEQUANTIZE around a float "
            "op, weights dequantized at load: the plan's numbers at about FP32's speed; an int8 kernel needs a planned output too)"
        )
    return (
        "; ".join(parts) + ". The ops between layers compute in float (in a transformer LayerNorm, softmax, GELU, attention "
        "matmuls: XNNPACK has no delegated int8 kernel for those, measured 5-8x slower, docs/research/tflite-w8a8-speed.md)"
    )


def delegation_note(flatbuffer: bytes, subgraph, kernels: dict) -> str:
    """Whether LiteRT's default delegate (XNNPACK) takes every planned layer's kernel; one it leaves to the
    builtin kernels runs there (slower; a low-bit or int16 FULLY_CONNECTED much slower), so the note names it."""
    from edgeq.validate.runners.litert_delegation import undelegated_ops

    position = {id(op): index for index, op in enumerate(subgraph.operators)}
    layers = {position[id(op)]: fqn for fqn, op in kernels.items() if id(op) in position}
    try:
        missed = undelegated_ops(flatbuffer, sorted(layers))
    except RuntimeError as exc:
        return f"Delegation not checked: {exc}"
    if not missed:
        return f"XNNPACK (the default delegate) takes all {len(layers)} of them"
    return f"XNNPACK (the default delegate) leaves {len(missed)} of {len(layers)} of them to the builtin kernels: " + ", ".join(
        f"{layers[p.index]} ({p.op_name})" for p in missed[:5])
