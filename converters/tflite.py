"""TFLite / LiteRT: `litert_torch.convert`, keeping the PyTorch (e.g. NCHW) input layout and names.

FP16 is TFLite's float16 quantization: float16 weights for FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D,
CONV_2D_TRANSPOSE and EMBEDDING_LOOKUP, dequantized to float32 at load (ai-edge-quantizer's float casting).
Integer inputs are stored as int32, the TFLite index type; runners cast int64 feeds losslessly.

Quantized schemes lower the plan's exact numbers (measured in docs/research/qdq-onnx-tflite.md, B and C):
the model is rewritten with `apply_plan(..., WeightForm.QDQ)` (float weights equal to codes * scale, then
quantize_per_channel -> dequantize_per_channel), and litert-torch turns each q/dq pair into TFLite quantized
tensors: it re-rounds weight / scale, which gives the codes back exactly, and takes the scales verbatim.
A PT2E quant_config only selects its q/dq conversion mode; no prepare/calibrate step runs.

  int8-weight   strict q/dq mode: int8 weight constant -> DEQUANTIZE -> float FULLY_CONNECTED / CONV_2D;
                EMBEDDING_LOOKUP reads its int8 table directly (it dequantizes the rows it gathers).
  int8-dynamic  as int8-weight, then every planned linear layer's FULLY_CONNECTED takes the int8 constant
                itself: TFLite's hybrid kernel, which quantizes each input row to int8 at run time
                (asymmetric under XNNPACK, the default CPU delegate). Convolutions stay weight-only, as in the plan.
  w8a8, w8a16   activation q/dq pairs with the plan's per-tensor scale and zero point become int8 (int16)
                FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D kernels when the plan quantizes the layer's input
                AND output (TFLite has no int8-in / float-out kernel; an input-only pair stays a float op between
                QUANTIZE and DEQUANTIZE). On float-IO targets w8a8 plans do (targets/resolve.py), so each layer is
                an int8 island that XNNPACK runs, with the ops between (LayerNorm, softmax, GELU, attention
                matmuls) float; a layer --auto-fallback moved to per-call rows (`dynamic_activation`) runs the
                hybrid kernel as in int8-dynamic. The plan note counts each kind and checks XNNPACK takes them
                (docs/research/tflite-w8a8-speed.md). Targets with integer IO (Edge TPU)
                use STATIC mode: the graph's inputs and outputs become int8 with the plan's parameters, and
                the plan's tensor points (model inputs, outputs of the leaf modules between layers) make the
                ops between layers (RELU, HARD_SWISH, MAX_POOL_2D, MEAN, TRANSPOSE, ...) int8 as well; where
                two points meet with different parameters (a max pool into a conv) the converter adds an
                int8 -> int8 QUANTIZE (a requantize).
                The int32 bias is derived by the converter as round(bias / (s_in * s_w[c])): weights and
                activation parameters are exact, the bias is rounded to the accumulator's grid.

  int4-dynamic  low-bit weights (converters/tflite_lowbit.py): the float model is converted, then each planned
                layer's FULLY_CONNECTED weight is rewritten as the plan's packed INT4/INT2 codes with blockwise or
                per-channel scales; LiteRT quantizes its input rows to int8 per call.

Why strict mode: without it, litert-torch's DYNAMIC mode also quantizes float weights the plan keeps float
(--keep-float layers, LSTM cells) with scales of its own, and STATIC mode folds weight-only
FULLY_CONNECTED weights back to float32 (so no int8 weight is stored). Strict mode lowers exactly the
q/dq pairs present, which is what the plan says.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from edgeq.compress.apply import apply_plan, quantizable_layers, user_fqn
from edgeq.compress.qdq import QuantizedConv, QuantizedEmbedding, QuantizedLinear, WeightForm
from edgeq.converters.base import Artifact, ConversionRequest, Converter, Refusal
from edgeq.converters.failures import explain_failure, explained
from edgeq.converters.tracing import quiet, shape_notes
from edgeq.errors import ConversionError
from edgeq.plan import OpKind, QDtype, QuantPlan
from edgeq.targets import Precision, Runtime

_FP16_WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE", "EMBEDDING_LOOKUP")
_QUANTIZED = (Precision.INT8_WEIGHT, Precision.INT8_DYNAMIC, Precision.W8A8, Precision.W8A16)
_STATIC = (Precision.W8A8, Precision.W8A16)
# The op versions litert-torch's own DYNAMIC mode writes for hybrid kernels (float input, int8 per-channel
# weight): interpreters and delegates pick kernels by version, so a rewired op must not claim an older one.
_HYBRID_VERSIONS = {"FULLY_CONNECTED": 12}
_FLOAT_TYPES = {0, 1}  # TFLite TensorType FLOAT32, FLOAT16


class KeywordIO(torch.nn.Module):
    """Keyword inputs and dict outputs: litert-torch turns both into the signature's tensor names."""

    def __init__(self, flat: torch.nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.flat = flat
        self.input_names = input_names
        self.output_names = output_names

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.flat(*(inputs[name] for name in self.input_names))
        return dict(zip(self.output_names, outputs))


class TFLiteConverter(Converter):
    runtime = Runtime.TFLITE
    filename = "model.tflite"
    implemented = frozenset({Precision.FP32, Precision.FP16, *_QUANTIZED, Precision.INT4_DYNAMIC})

    def check(self, request: ConversionRequest) -> list[Refusal]:
        from edgeq.converters import tflite_lowbit

        if request.precision in tflite_lowbit.FLOAT_ACTIVATION_LOW_BIT:
            return [tflite_lowbit.float_activation_refusal(request.precision)]
        refusals = super().check(request)
        if not refusals and request.precision in tflite_lowbit.LOW_BIT:
            refusals = tflite_lowbit.lowbit_refusals(request)
        return refusals

    def convert(self, request: ConversionRequest, dest: Path) -> Artifact:
        return explained(self._convert, request, dest)

    def _convert(self, request: ConversionRequest, dest: Path) -> Artifact:
        import litert_torch

        model, profile = request.model, request.profile
        notes = shape_notes(model, profile)
        examples = model.example_inputs
        module, plan, quant_config, strict = model.module, None, None, False
        if request.precision in _QUANTIZED:
            plan = checked_plan(request)
            try:
                module = apply_plan(module, plan, WeightForm.QDQ)
            except ValueError as exc:  # a plan form the QDQ layers do not lower (e.g. int4 per group)
                raise ConversionError(f"target {profile.id}: {exc}") from exc
            quant_config, strict = qdq_mode(request)
        low_bit = request.precision == Precision.INT4_DYNAMIC
        if low_bit:  # converted with int8 stand-ins; the planned weights are rewritten afterwards
            from edgeq.converters.tflite_lowbit import checked_lowbit_plan, lowbit_conversion, pack_lowbit

            plan = checked_lowbit_plan(request)
            module, quant_config, strict = lowbit_conversion(module, request, plan)  # int8 stand-ins, tables dequantized
        wrapper = KeywordIO(module, model.input_names, model.outputs).eval()
        sample = dict(zip(model.input_names, examples))
        try:
            planned = {fqn for fqn, layer in plan.layers.items() if layer.weight is not None} if low_bit else None
            scopes = layer_scopes(wrapper, sample, planned) if plan is not None else {}
            with quiet(), strict_qdq(strict):
                edge_model = litert_torch.convert(wrapper, sample_kwargs=sample, quant_config=quant_config)
                flatbuffer = edge_model.model_content()
        except Exception as exc:
            raise explain_failure(profile.id, exc, model.module, examples, traced=wrapper) from exc
        if request.precision == Precision.FP16:
            flatbuffer = float16_weights(flatbuffer)
        if low_bit:
            flatbuffer = pack_lowbit(flatbuffer, plan, scopes, request, notes)
        elif plan is not None:
            flatbuffer = lower_plan(flatbuffer, plan, scopes, request, notes)
        Path(dest).write_bytes(flatbuffer)
        return Artifact(dest, self.runtime, request.precision, profile.id, self.versions(), notes=notes)

    @staticmethod
    def versions() -> dict[str, str]:
        import litert_torch

        versions = {"torch": torch.__version__, "litert-torch": litert_torch.__version__}
        try:
            from importlib.metadata import version

            versions["ai-edge-quantizer"] = version("ai-edge-quantizer")
        except Exception:
            pass
        return versions


def checked_plan(request: ConversionRequest) -> QuantPlan:
    """The request's plan, refused before any work when TFLite cannot run it as planned."""
    plan, target, precision = request.plan, request.profile.id, request.precision
    if precision in _STATIC and (plan is None or not any(layer.activation for layer in plan.layers.values())):
        raise ConversionError(
            f"target {target}: {precision} needs activation scales from calibration, and the request's plan has "
            "none; int8-dynamic and int8-weight need none"
        )
    if plan is None:
        raise ConversionError(f"target {target}: {precision} is lowered from a QuantPlan, and none was given")
    # TFLite's integer kernels take int8 (asymmetric) or int16 (zero point 0) activations; uint8 fails to load.
    unsupported = sorted({
        fqn for fqn, layer in plan.layers.items() for quant in (layer.activation, layer.output)
        if quant is not None and not (quant.dtype == QDtype.INT8 or (quant.dtype == QDtype.INT16 and not quant.zero_point.any()))
    })
    if unsupported:
        raise ConversionError(
            f"target {target}: layer(s) {', '.join(unsupported[:5])} quantize activations to a type TFLite has no "
            "kernels for; it runs int8 (any zero point) and int16 (zero point 0)"
        )
    # LiteRT's int16x8 DEPTHWISE_CONV_2D kernel wants an int64 bias; litert-torch writes int32, and the
    # artifact then fails to load ("bias->type != kTfLiteInt64"). Plain CONV_2D and FULLY_CONNECTED run.
    depthwise = [
        fqn for fqn, layer in quantizable_layers(request.model.module)
        if fqn in plan.layers and isinstance(layer, torch.nn.Conv2d) and 1 < layer.groups == layer.in_channels
        and plan.layers[fqn].activation is not None and plan.layers[fqn].activation.dtype == QDtype.INT16
    ]
    if depthwise:
        raise ConversionError(
            f"target {target}: int16 activations into depthwise convolution(s) {', '.join(depthwise[:5])} do not "
            "load in LiteRT (its int16 depthwise kernel needs an int64 bias, litert-torch writes int32); "
            "give them int8 activations or keep them float with --keep-float"
        )
    return plan


def qdq_mode(request: ConversionRequest):
    """(quant_config, strict) for litert-torch: which q/dq conversion mode lowers this scheme."""
    from litert_torch.quantize import pt2e_quantizer, quant_config

    # Full-integer targets: STATIC (non-strict) turns the graph's boundary q/dq into int8 inputs/outputs.
    integer_io = request.precision in _STATIC and request.profile.quantization.integer_io
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    )
    return quant_config.QuantConfig(pt2e_quantizer=quantizer), not integer_io


@contextlib.contextmanager
def strict_qdq(enabled: bool):
    """Run litert-torch's converter passes with `strict_qdq_mode` (its V2 converter always sets it; the V1
    converter used without tf-nightly has no argument for it, so the config it builds is patched here)."""
    if not enabled:
        yield
        return
    from litert_torch._convert import litert_converter

    api = litert_converter.converter_api_ext
    original = api.ConvertToTFLConfig
    if not hasattr(original(), "strict_qdq_mode"):
        raise ConversionError("this litert-torch has no strict q/dq mode; edgeq lowers quantized TFLite with litert-torch 0.10")

    def strict_config():
        config = original()
        config.strict_qdq_mode = True
        return config

    api.ConvertToTFLConfig = strict_config
    try:
        yield
    finally:
        api.ConvertToTFLConfig = original


def _class_name(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def layer_scopes(wrapper: torch.nn.Module, sample: dict, planned: set[str] | None = None) -> dict[str, str]:
    """Module scope -> user FQN of each quantized layer (and of its weight module); with `planned`, of the
    float layers of those FQNs instead (low-bit weights are rewritten after a float conversion).

    litert-torch names a tensor after the torch modules on the call stack that produced it:
    `<module.Class>_<attribute>` per called module, joined by '/', e.g. `...BertEncoder_encoder/...BertLayer_0/`
    (a ModuleList is not called, so its name is not in the scope and the FQN cannot be parsed back). One
    forward with hooks that mirror that naming gives the scope of every quantized layer, from the modules'
    identities rather than from their values.
    """
    paths = {id(m): name for name, m in wrapper.named_modules()}
    layers = {}
    for name, module in wrapper.named_modules():
        fqn = user_fqn(name.removeprefix("flat."))
        quantized = isinstance(module, (QuantizedLinear, QuantizedConv, QuantizedEmbedding))
        if (fqn in planned) if planned is not None else quantized:
            layers[id(module)] = layers[id(module.weight)] = fqn
    stack: list[str] = []
    scopes: dict[str, str] = {}

    def enter(module, _args):
        path = paths.get(id(module), "")
        stack.append(_class_name(type(module)) + (f"_{path.rsplit('.', 1)[-1]}" if path else ""))
        if id(module) in layers:
            scopes["/".join(stack)] = layers[id(module)]

    def leave(_module, _args, _output):
        stack.pop()

    handles = []
    for module in wrapper.modules():
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with torch.no_grad():
            wrapper(**sample)
    finally:
        for handle in handles:
            handle.remove()
    return scopes


def lower_plan(flatbuffer: bytes, plan: QuantPlan, scopes: dict[str, str], request: ConversionRequest, notes: list[str]) -> bytes:
    """Name each planned layer's weight `<fqn>.weight` (the parity reader finds it so), make int8-dynamic
    layers hybrid, and hold full-integer targets to integer ops. Refuses what it cannot attribute."""
    from ai_edge_litert.tools import flatbuffer_utils

    from edgeq.converters.parity_tflite import CONV1D_SUFFIX, INT8, WEIGHT_SUFFIX, op_names, read_model, tensor_name, weight_uses

    target = request.profile.id
    model = read_model(flatbuffer)
    names = op_names(model)
    planned = {fqn for fqn, layer in plan.layers.items() if layer.weight is not None}
    conv1d = {fqn for fqn, layer in quantizable_layers(request.model.module) if isinstance(layer, torch.nn.Conv1d)}
    subgraph = model.subgraphs[0]  # one signature, one subgraph
    named, unattributed, shared = {}, [], []
    for use in weight_uses(model, subgraph, names):
        tensor = subgraph.tensors[use.tensor]
        if any(use.tensor == first.tensor for first in named.values()):  # one weight read by several ops (each
            shared.append(use)  # step of an unrolled recurrence): attributed, and renamed, at its first use
            continue
        fqn = next((scopes[s] for s in tensor_name(tensor).split(";") if s in scopes), None)
        if fqn not in planned:
            if tensor.type == INT8:
                unattributed.append(tensor_name(tensor))
            continue
        if fqn in named and named[fqn].tensor != use.tensor:
            raise ConversionError(f"target {target}: layer {fqn}'s weight is stored twice in the TFLite model")
        tensor.name = (fqn + (CONV1D_SUFFIX if fqn in conv1d else WEIGHT_SUFFIX)).encode()
        named[fqn] = use
    if unattributed:  # strict mode stores int8 weights only for planned layers; anything else is unexplained
        raise ConversionError(
            f"target {target}: the TFLite model holds int8 weights edgeq cannot attribute to a planned layer: "
            + ", ".join(unattributed[:3])
        )
    # each planned layer's computing op (embedding lookups gather rows, in float as in FP32), before make_hybrid drops ops
    kernels = {fqn: subgraph.operators[use.op] for fqn, use in named.items() if plan.layers[fqn].op != OpKind.EMBEDDING}
    lookups = {fqn: subgraph.operators[use.op] for fqn, use in named.items() if plan.layers[fqn].op == OpKind.EMBEDDING}
    # int8-dynamic layers, and the layers --auto-fallback moved from static ranges to per-call ones in a w8a8 plan
    dynamic = [fqn for fqn in named if plan.layers[fqn].dynamic_activation is not None]
    if dynamic:
        hybrid = {named[fqn].tensor for fqn in dynamic}
        make_hybrid(model, subgraph, names, [named[fqn] for fqn in dynamic] + [u for u in shared if u.tensor in hybrid], target)
        notes.append(f"{len(dynamic)} linear layer(s) run TFLite's hybrid int8 kernels (int8 weights, input rows quantized to int8 per call)")
    if lookups and not request.profile.quantization.integer_io:
        from edgeq.converters.tflite_fold_lookups import fold_constant_lookups

        folded = fold_constant_lookups(model, subgraph, names, lookups, plan)
        if folded:
            notes.append(f"{len(folded)} int8 table lookup(s) at constant indices folded into float32 rows (codes x scale, what the "
                         f"lookup computed; no run-time EMBEDDING_LOOKUP): {', '.join(folded)}")
    if request.precision in _STATIC and request.profile.quantization.integer_io:
        float_ops = {
            names[op.opcodeIndex] for op in subgraph.operators
            if any(i >= 0 and subgraph.tensors[i].type in _FLOAT_TYPES for i in [*op.inputs, *op.outputs])
        }
        computing = sorted(float_ops - {"QUANTIZE", "DEQUANTIZE"})  # the (de)quantizes only mark the float region
        if float_ops:
            where = f"computes {', '.join(computing)} in float" if computing else "takes or returns float tensors"
            raise ConversionError(
                f"target {target} runs integer ops only, but the converted model still {where}: edgeq quantizes the "
                "model inputs, the linear and conv layers, and the output of every leaf module between them, so "
                "what stays float is an op with no quantized output of its own: one of several ops a module "
                "lowers to (LayerNorm, attention), or a function called in forward() (x * y, F.gelu) whose "
                "result does not go straight into a quantized layer; make it a module, or use a target that "
                "runs float ops too (tflite-xnnpack)"
            )
    lowered = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    if request.precision in _STATIC and not request.profile.quantization.integer_io:
        from edgeq.converters.tflite_notes import compute_note, delegation_note

        note = f"{compute_note(plan, kernels, dynamic, subgraph)}. {delegation_note(lowered, subgraph, kernels)}"
        plan.notes.append(note)  # a plan note: the CLI summary and the reports show it
    return lowered


def make_hybrid(model, subgraph, names: list[str], uses: list, target: str) -> None:
    """Feed each op its int8 weight directly (dropping the DEQUANTIZE between): TFLite's hybrid kernels."""
    consumers: dict[int, int] = {}
    for op in subgraph.operators:
        for i in op.inputs:
            consumers[i] = consumers.get(i, 0) + 1
    dropped, hybrid_codes = set(), {}
    for use in uses:
        if use.dequantize is None:
            continue  # already reads int8 itself (EMBEDDING_LOOKUP)
        if use.op_name not in _HYBRID_VERSIONS:
            raise ConversionError(f"target {target}: edgeq has no hybrid lowering for {use.op_name}")
        op = subgraph.operators[use.op]
        dequantized = op.inputs[use.operand]
        op.inputs[use.operand] = use.tensor
        consumers[dequantized] -= 1
        if consumers[dequantized] == 0:
            dropped.add(use.dequantize)
        code = model.operatorCodes[op.opcodeIndex]
        if code.version < _HYBRID_VERSIONS[use.op_name]:  # a code of its own: float ops keep theirs
            if op.opcodeIndex not in hybrid_codes:
                hybrid = copy.copy(code)
                hybrid.version = _HYBRID_VERSIONS[use.op_name]
                model.operatorCodes.append(hybrid)
                hybrid_codes[op.opcodeIndex] = len(model.operatorCodes) - 1
            op.opcodeIndex = hybrid_codes[op.opcodeIndex]
    # The dropped DEQUANTIZEs' float outputs stay in the tensor table unreferenced; LiteRT never allocates them.
    subgraph.operators = [op for index, op in enumerate(subgraph.operators) if index not in dropped]


def float16_weights(flatbuffer: bytes) -> bytes:
    """Store the weights of weight-carrying ops as float16 (computed in float32 after dequantize)."""
    from ai_edge_quantizer import qtyping, quantizer

    engine = quantizer.Quantizer(bytearray(flatbuffer))
    config = qtyping.OpQuantizationConfig(
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
        compute_precision=qtyping.ComputePrecision.FLOAT,
        explicit_dequantize=True,
    )
    for op in _FP16_WEIGHT_OPS:
        engine.update_quantization_recipe(
            regex=".*",
            operation_name=getattr(qtyping.TFLOperationName, op),
            algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING,
            op_config=config,
        )
    with quiet():  # it prints a size summary and progress bars
        return bytes(engine.quantize().quantized_model)
