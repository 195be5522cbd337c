"""ONNX: `torch.onnx.export(..., dynamo=True)` at the profile's opset; FP16 by converting the graph's floats
(IO kept float32, so the artifact takes what the user declared)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from edgeq.converters.base import Artifact, ConversionRequest, Converter, Refusal
from edgeq.converters.failures import explain_failure, explained
from edgeq.compress.apply import apply_plan
from edgeq.compress.qdq import WeightForm
from edgeq.errors import ConversionError
from edgeq.converters.tracing import dynamic_examples, quiet, shape_notes
from edgeq.targets import Precision, Runtime


class OnnxConverter(Converter):
    runtime = Runtime.ONNX
    filename = "model.onnx"
    implemented = frozenset(
        {Precision.FP32, Precision.FP16, Precision.INT8_WEIGHT, Precision.INT8_DYNAMIC, Precision.W8A8, Precision.W8A16,
         Precision.INT4_WEIGHT, Precision.INT3_WEIGHT, Precision.INT2_WEIGHT, Precision.INT4_DYNAMIC}
    )

    def check(self, request: ConversionRequest) -> list[Refusal]:
        refusals = super().check(request)
        if not refusals and _is_lowbit(request.precision):
            from edgeq.converters.onnx_lowbit import check_plan

            refusals = check_plan(request.plan, request.precision)
        return refusals

    def convert(self, request: ConversionRequest, dest: Path) -> Artifact:
        return explained(self._convert, request, dest)

    def _convert(self, request: ConversionRequest, dest: Path) -> Artifact:
        import onnx

        model, profile = request.model, request.profile
        opset = profile.runtime_options.get("opset", 18)
        if request.plan is not None and _has_16bit_activations(request.plan) and opset < 21:
            opset = 21  # QuantizeLinear/DequantizeLinear take int16/uint16 from opset 21 (measured: 20 is invalid)
        notes = shape_notes(model, profile)
        if profile.dynamic_shapes:
            examples, dynamic_shapes = dynamic_examples(model)
        else:
            examples, dynamic_shapes = model.example_inputs, None
        module, lowbit = model.module, {}
        plan = request.plan
        if plan is not None and _is_lowbit(request.precision):
            from edgeq.converters.onnx_lowbit import split_plan, dequantized_weights

            # low-bit layers export as float (the plan's dequantized weights) and become MatMulNBits below
            lowbit, plan = split_plan(plan)
            module = dequantized_weights(module, lowbit)
        if plan is not None:
            # int8 codes as DequantizeLinear over int8 initializers named `<fqn>.weight.codes` (exact).
            module = apply_plan(module, plan, WeightForm.CODES)
        _reuse_torchlib_ops()
        try:
            with quiet():
                program = torch.onnx.export(
                    module,
                    examples,
                    dynamo=True,
                    opset_version=opset,
                    input_names=model.input_names,
                    # Output names are set afterwards by name_outputs: given here, a name that equals an
                    # internal value (e.g. 'linear') makes the exporter write an invalid (non-SSA) graph.
                    dynamic_shapes=dynamic_shapes,
                    verbose=False,
                )
            proto = program.model_proto
        except Exception as exc:
            raise explain_failure(profile.id, exc, model.module, model.example_inputs, traced=module) from exc
        proto = name_outputs(proto, model.outputs)
        if lowbit:
            from edgeq.converters.onnx_lowbit import lower_lowbit

            notes += lower_lowbit(proto, lowbit, request.precision, profile.id, model, profile)
        if request.precision == Precision.INT8_DYNAMIC:
            from edgeq.converters.onnx_dynamic import gather_int8_tables, rewrite_dynamic_matmuls

            rewritten = {name.removeprefix("inner.").removesuffix(".weight.codes") for name in rewrite_dynamic_matmuls(proto)}
            planned = {fqn for fqn, layer in request.plan.layers.items() if layer.dynamic_activation is not None}
            exported = {i.name.removeprefix("inner.").removesuffix(".weight.codes") for i in proto.graph.initializer}
            left = sorted((planned - rewritten) & exported)
            if left:  # better refuse than ship weight-only layers labelled dynamic
                raise ConversionError(
                    f"target {profile.id}: int8-dynamic could not rewrite layer(s) {', '.join(left[:5])} "
                    "(their weights are shared or not a MatMul/Gemm); keep them float with --keep-float"
                )
            notes.append(f"{len(rewritten)} linear layers run as dynamic int8 (DynamicQuantizeLinear + MatMulInteger)")
            tables = gather_int8_tables(proto, request.plan.layers)
            if tables:
                notes.append(f"{len(tables)} int8 table(s) gathered as int8 rows -> Cast -> Mul by row scale (constant indices: folded by ORT at load)")
        from edgeq.converters.onnx_graph_shape import shape_for_ort

        int8 = request.precision in (Precision.INT8_WEIGHT, Precision.INT8_DYNAMIC, Precision.W8A8, Precision.W8A16)
        cpu = list(profile.runtime_options.get("providers", ["CPUExecutionProvider"])) == ["CPUExecutionProvider"] and request.precision != Precision.FP16
        notes += shape_for_ort(proto, request.plan if int8 else None, static=request.precision in (Precision.W8A8, Precision.W8A16), cpu=cpu)
        if request.plan is not None:
            unshare_quantization_parameters(proto.graph)
        if request.precision == Precision.FP16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            # keep_io_types: inputs/outputs stay float32 with Cast nodes at the boundary.
            proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
            sort_nodes(proto.graph)  # the float16 pass appends its boundary Casts after their consumers
        portable_metadata(proto)
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise ConversionError(f"target {profile.id}: the exported ONNX graph is invalid: {exc}") from exc
        onnx.save_model(proto, str(dest))
        return Artifact(dest, self.runtime, request.precision, profile.id, self.versions(), notes=notes)

    @staticmethod
    def versions() -> dict[str, str]:
        import onnx
        import onnxscript

        return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__}


def _reuse_torchlib_ops() -> None:
    """Build onnxscript's list of torchlib functions once per process instead of once per export.

    torch.onnx rebuilds its op registry on every export from `get_torchlib_ops()`, which re-parses the source
    of ~2,000 onnxscript functions to read each one's domain: about a second per export (measured with
    cProfile, a quarter of a small model's export). The list depends only on the installed onnxscript, so it
    is the same every time. Where the private hook is not there (another onnxscript), nothing changes.
    """
    import functools
    import importlib

    try:
        from torch.onnx._internal._lazy_import import onnxscript_apis

        apis = importlib.import_module(onnxscript_apis._name)  # the module torch's registry calls into
    except (ImportError, AttributeError):
        return
    current = getattr(apis, "get_torchlib_ops", None)
    if current is not None and not hasattr(current, "cache_info"):
        apis.get_torchlib_ops = functools.cache(current)


def name_outputs(proto, names: list[str]):
    """Give graph outputs the model's output names, renaming any internal value that already holds one.

    ONNX is single-assignment: an output called like an internal value (e.g. 'add') makes the model invalid.
    """
    graph = proto.graph
    current = [output.name for output in graph.output]
    if current == names:
        return proto
    taken = {v for node in graph.node for v in (*node.input, *node.output)} | {i.name for i in graph.initializer}
    renames: dict[str, str] = {}
    for old, new in zip(current, names):
        if old == new:
            continue
        if new in taken and new not in current:
            renames[new] = _fresh(new, taken)  # move the internal value out of the way
        renames[old] = new
    for node in graph.node:
        node.input[:] = [renames.get(v, v) for v in node.input]
        node.output[:] = [renames.get(v, v) for v in node.output]
    for initializer in graph.initializer:
        initializer.name = renames.get(initializer.name, initializer.name)
    for value in list(graph.output) + list(graph.value_info):
        value.name = renames.get(value.name, value.name)
    return proto


_TRACE_FILE = re.compile(r'File "([^"]+)"')
# The exporter's per-node debug records that nothing downstream reads: about 1 kB a node (420 kB of MiniLM's
# int4 artifact, 3%; an unrolled recurrence repeats them per step, 146 kB of a small GRU's). Name scopes stay:
# per-layer taps and the low-bit rewrites read them.
EXPORTER_DEBUG_KEYS = frozenset({"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "pkg.torch.onnx.class_hierarchy", "namespace"})


def portable_metadata(proto) -> None:
    """Drop the exporter's debug records (EXPORTER_DEBUG_KEYS) and name the source files cited in what is left
    by import path, in place.

    `pkg.torch.onnx.stack_trace` (on every node) cites each frame's absolute file: the model's module, edgeq
    and torch in the venv. The same model exported from another folder or venv gave other bytes; with
    `File "torch/nn/modules/linear.py"` it does not (edgeq.reproducible). Name scopes, which the per-layer
    taps read, hold no paths and are left alone.
    """
    from edgeq.reproducible import module_files, source_file_label

    modules = module_files()

    def portable(text: str) -> str:
        if 'File "' not in text:
            return text
        return _TRACE_FILE.sub(lambda m: f'File "{source_file_label(m.group(1), modules)}"', text)

    def fix(item) -> None:
        if item.doc_string:
            item.doc_string = portable(item.doc_string)
        props = getattr(item, "metadata_props", None)
        if props is None:
            return
        kept = [prop for prop in props if prop.key not in EXPORTER_DEBUG_KEYS]
        if len(kept) != len(props):
            del props[:]
            props.extend(kept)
        for prop in props:
            prop.value = portable(prop.value)

    def walk(graph) -> None:
        fix(graph)
        for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            fix(value)
        for node in graph.node:
            walk_node(node)

    def walk_node(node) -> None:
        fix(node)
        for attribute in node.attribute:  # If/Loop/Scan bodies
            for graph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                walk(graph)

    fix(proto)
    walk(proto.graph)
    for function in proto.functions:
        fix(function)
        for node in function.node:
            walk_node(node)


def _is_lowbit(precision: Precision) -> bool:
    return precision in (Precision.INT4_WEIGHT, Precision.INT3_WEIGHT, Precision.INT2_WEIGHT, Precision.INT4_DYNAMIC)


def _has_16bit_activations(plan) -> bool:
    return any(
        quant is not None and quant.dtype.storage.itemsize == 2
        for layer in plan.layers.values()
        for quant in (layer.activation, layer.output)
    )


def unshare_quantization_parameters(graph) -> None:
    """Give every QuantizeLinear/DequantizeLinear its own scale and zero-point initializers.

    The exporter deduplicates equal constants (e.g. the zero-point vectors of several layers); ORT's
    x64quantprecision session option then fails on quantized conv models with "Attempt to replace the
    existing tensor" when a fusion rewrites one shared initializer twice (measured, docs/research A4).
    """
    from onnx import numpy_helper

    initializers = {i.name: i for i in graph.initializer}
    seen: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for position in (1, 2):
            if position >= len(node.input) or node.input[position] not in initializers:
                continue
            name = node.input[position]
            if name not in seen:
                seen.add(name)
                continue
            copy_name = _fresh(name, seen)
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(initializers[name]), copy_name))
            node.input[position] = copy_name


def sort_nodes(graph) -> None:
    """Reorder graph nodes topologically (ONNX requires producers before consumers); keeps order otherwise."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(v in available for v in n.input)]
        if not ready:
            raise ValueError("the ONNX graph has a cycle or an undefined input: " + pending[0].name)
        for node in ready:
            available.update(node.output)
        ready_ids = {id(n) for n in ready}
        ordered.extend(ready)
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _fresh(name: str, taken: set[str]) -> str:
    index = 0
    while f"{name}__{index}" in taken:
        index += 1
    taken.add(f"{name}__{index}")
    return f"{name}__{index}"
