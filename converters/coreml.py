"""Core ML: an ML program (.mlpackage) from `torch.export(...).run_decompositions({})`.

The empty decomposition table keeps high-level ops (layer_norm, attention) that Core ML maps to fused MIL
ops; when the frontend lacks an op that the default table decomposes (e.g. `new_ones` in Hugging Face
models), the default table is used instead and the manifest says so. Integer inputs are int32 in Core ML.

Quantized schemes (measured, docs/research/coreml-quantized.md): the plan's layers become
`quantized_decomposed.dequantize_per_channel` over an int8 buffer of the plan's codes (WeightForm.CODES),
which coremltools' own frontend lowers to `constexpr_affine_dequantize` with the codes verbatim; static
activations become MIL `quantize`/`dequantize` with the plan's scale and zero point. Compute is float16,
so coremltools stores every scale as float16: the coreml profiles say `scale_dtype = "float16"` and the
plan's scales already lie on that grid, so the artifact holds exactly the plan's numbers.

Low-bit schemes (int4/int3/int2-weight, lut*-weight) are packed by converters/coreml_lowbit.py: each planned
linear layer's weight becomes constexpr_blockwise_shift_scale or constexpr_lut_to_dense (iOS18) built from the
plan's arrays; the plan's int8 layers, if any, take the int8 route above.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path

import torch

from edgeq.compress.apply import apply_plan
from edgeq.compress.qdq import WeightForm
from edgeq.converters.base import Artifact, ConversionRequest, Converter, Refusal
from edgeq.converters.coreml_frontend import register_corrections
from edgeq.converters.coreml_graph import decomposed, decompositions, fix_graph
from edgeq.converters.coreml_lowbit import LOWBIT, LOWBIT_MIN_TARGET, WEIGHT_OPS, check_plan, pack_module, register_frontend
from edgeq.converters.coreml_sparse import SPARSE_MIN_TARGET, SPARSE_WEIGHT_OPS, store_sparse
from edgeq.converters.coreml_sparse import register_frontend as register_sparse_frontend
from edgeq.converters.coreml_names import FEATURE_NAMES_KEY, describe, feature_names
from edgeq.converters.failures import explain_failure
from edgeq.converters.parity_coreml import mil_name
from edgeq.converters.tracing import quiet, shape_notes
from edgeq.errors import ConversionError
from edgeq.hashing import sha256_path
from edgeq.rewrites import apply_rewrites
from edgeq.targets import Precision, Runtime

_MISSING_OP = re.compile(r"Unsupported fx node \S+, kind ([\w.]+)|convert function for op '([\w.]+)' not implemented")
_MAX_DECOMPOSED = 8  # ops decomposed one by one before falling back to the whole default table
QUANTIZED = frozenset({Precision.INT8_WEIGHT, Precision.W8A8})
# The frontend casts a per-channel zero point to int8 with mb.cast, which the iOS16 opset lacks, and MIL's
# activation quantize/dequantize ops start at iOS17.
QUANTIZED_MIN_TARGET = "iOS17"


class CoreMLConverter(Converter):
    runtime = Runtime.COREML
    filename = "model.mlpackage"
    implemented = frozenset({Precision.FP32, Precision.FP16, *QUANTIZED, *LOWBIT})

    def check(self, request: ConversionRequest) -> list[Refusal]:
        refusals = super().check(request)
        if not refusals and request.precision in LOWBIT and request.plan is not None:
            refusals = check_plan(request.plan, request.profile, request.model.module)
        return refusals

    def convert(self, request: ConversionRequest, dest: Path) -> Artifact:
        import coremltools as ct

        model, profile = request.model, request.profile
        notes = shape_notes(model, profile)
        module = model.module
        lowbit = request.precision in LOWBIT
        quantized = request.precision in QUANTIZED or lowbit
        if quantized:
            if request.plan is None:
                raise ConversionError(
                    f"target {profile.id}: {request.precision} needs a plan with the layers' scales; none was given"
                )
            plan = request.plan
            if lowbit:
                refusals = check_plan(plan, profile, module)
                if refusals:
                    raise ConversionError(
                        f"target {profile.id} refuses {request.precision}:\n" + "\n".join(f"  - {r}" for r in refusals)
                    )
                register_frontend()
                module, plan = pack_module(module, plan)
            # CODES, not QDQ: the frontend has no converter for quantize_per_channel (QDQ's weight form), while
            # dequantize_per_channel over a constant int8 tensor becomes constexpr_affine_dequantize as is.
            module = apply_plan(module, plan, WeightForm.CODES)
        fp16 = quantized or request.precision == Precision.FP16  # quantized: the deployed path (ANE, GPU)
        module, sparse = store_sparse(module, fp16, request.plan)  # mostly-zero weights as mask + non-zeros (coreml_sparse.py)
        if sparse:
            register_sparse_frontend()
            notes.extend(sparse)
        module, rewrites = apply_rewrites(module, "coreml")
        examples = model.example_inputs
        target = profile.runtime_options.get("minimum_deployment_target", "iOS16")
        minimum, why = (
            (LOWBIT_MIN_TARGET, "4-bit blockwise weights and per-grouped-channel palettes are iOS18 ops")
            if lowbit else (QUANTIZED_MIN_TARGET, "coremltools lowers int8 weights and activation quantize ops from iOS17")
        )
        if sparse:
            minimum, why = SPARSE_MIN_TARGET, "sparse weights (1-bit masks, sparse quantized codes) are iOS18 ops"
        if (quantized or sparse) and getattr(ct.target, target) < getattr(ct.target, minimum):
            notes.append(f"minimum deployment target raised from {target} to {minimum}: {why}")
            target = minimum
        # The default pass pipeline keeps every constexpr_affine_dequantize (measured: DEFAULT and EMPTY store
        # the same codes). Its `common::nullify_redundant_quantization_zero_point` rewrites an int8 activation
        # quantize with zero point -128 to uint8 with none (and drops a zero point of 0): the same values, so
        # activation checks must accept both spellings; weights are symmetric and untouched.
        options = dict(
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
            minimum_deployment_target=getattr(ct.target, target),
        )
        # Names Core ML cannot take (`state`, `input.1`) get coremltools' own spelling; the artifact records the
        # mapping and edgeq's Core ML runner shows the model's names to validation and bundles.
        renamed = feature_names(model.input_names, model.outputs)
        input_names = [renamed["inputs"].get(n, n) for n in model.input_names]
        output_names = [renamed["outputs"].get(n, n) for n in model.outputs]
        io_names = {*input_names, *output_names}
        register_corrections()
        failing = _FailingNode()
        fixes: list[str] = []  # exact graph fixes for the frontend (coreml_graph), of the program converted
        try:
            with failing:
                program = torch.export.export(module, examples, strict=False)
                mlmodel = _convert_program(ct, program, options, io_names, failing, fixes, rewrites)
                mlmodel = _rename_features(mlmodel, input_names, output_names, renamed)
                mlmodel.save(str(dest))
                make_reproducible(dest)
        except Exception as exc:  # every toolchain exception leaves as a ConversionError naming op, module, target
            raise explain_failure(profile.id, exc, module, examples, op=failing.kind) from exc
        rewrites.extend(fixes)
        for kind in ("inputs", "outputs"):
            rewrites.extend(f"coreml-feature-name: {name} -> {core}" for name, core in renamed[kind].items())
        notes.extend(describe(renamed))
        return Artifact(dest, self.runtime, request.precision, profile.id, self.versions(), rewrites, notes)

    @staticmethod
    def versions() -> dict[str, str]:
        import coremltools as ct

        return {"torch": torch.__version__, "coremltools": ct.__version__}


def _convert_program(ct, program, options: dict, io_names: set[str], failing, fixes: list[str], rewrites: list[str]):
    """ct.convert on `program` with the fewest decompositions: high-level ops stay whole for Core ML's fused
    ops, and each op the frontend lacks (`new_ones`, `lstm`, `celu`) is replaced by its entry of torch's default
    decomposition table, one at a time. Decomposing everything (the whole default table) is the last resort: it
    turns some ops the frontend takes into ones it lacks (torch.roll into fmod)."""
    table = decompositions()
    default = torch.export.default_decompositions()
    steps = []  # one rewrite line per op decomposed
    for _ in range(_MAX_DECOMPOSED):
        fixes.clear()
        fixes.extend(decomposed(program))
        failing.kind = None
        try:
            mlmodel = _ct_convert(ct, _named(_fixed(program.run_decompositions(table), fixes), io_names), options, steps)
            rewrites.extend(steps)
            return mlmodel
        except Exception as exc:
            missing = _MISSING_OP.search(str(exc))
            if not missing:
                raise
            kind = (missing.group(1) or missing.group(2)).split(".")[0]
            entries = {op: fn for op, fn in default.items() if getattr(op, "__name__", "").split(".")[0] == kind}
            if not entries or all(op in table for op in entries):
                break
            table.update(entries)
            steps.append(f"default-decomposition-table: {kind} decomposed ({str(exc).strip().splitlines()[0][:120]})")
    fixes.clear()
    failing.kind = None
    steps = ["default-decomposition-table: the whole table (an op the frontend lacks has no decomposition of its own)"]
    mlmodel = _ct_convert(ct, _named(_fixed(program.run_decompositions(), fixes), io_names), options, steps)
    rewrites.extend(steps)
    return mlmodel


# Optimization passes of coremltools' default pipeline that crash on some valid programs (measured, coremltools
# 9.0): reduce_transposes reads `axes` from every reduce op, and a reduce over all axes (x.max()) has none
# (KeyError 'axes'). Skipping an optimization pass changes no value; the artifact keeps those transposes.
_FRAGILE_PASSES = {"_reduce_transposes_block": "common::reduce_transposes"}


def _ct_convert(ct, program, options: dict, steps: list[str]):
    """ct.convert, retried without a fragile optimization pass where that pass is what failed."""
    try:
        with quiet():  # coremltools draws a progress bar for every pass
            return ct.convert(program, **options)
    except Exception as exc:
        import traceback

        frames = {frame.name for frame in traceback.extract_tb(exc.__traceback__)}
        skipped = [name for function, name in _FRAGILE_PASSES.items() if function in frames]
        if not skipped:
            raise
        pipeline = ct.PassPipeline.DEFAULT
        pipeline.remove_passes(skipped)
        with quiet():
            mlmodel = ct.convert(program, **options, pass_pipeline=pipeline)
        steps.extend(f"coreml-pass-skipped: {name} (coremltools failed in it: {type(exc).__name__} {exc})" for name in skipped)
        return mlmodel


def _fixed(program: torch.export.ExportedProgram, applied: list[str]) -> torch.export.ExportedProgram:
    applied.extend(fix_graph(program))
    return program


def _named(program: torch.export.ExportedProgram, io_names: set[str]) -> torch.export.ExportedProgram:
    """Name the fx nodes coremltools turns into MIL values, in place.

    - Each weight's dequantize node (int8 dequantize_per_channel, low-bit coreml_lowbit.WEIGHT_OPS) after its
      module's FQN (the spelling: parity_coreml): left alone, coremltools names the constexpr op
      `dequantize_per_channel_3`, which no reader can tie to a layer.
    - An op whose name is one the model's inputs or outputs will take (an output named `linear` beside the
      `linear` op) gets a fresh name: renaming the features afterwards would otherwise define that value
      twice, and ops reading it would read the wrong one (measured: coremltools 9 renames without checking).
    """
    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    buffers = program.graph_signature.inputs_to_buffers
    taken = {node.name for node in program.graph.nodes} | io_names
    for node in program.graph.nodes:
        if (node.target == dequantize or node.target in WEIGHT_OPS or node.target in SPARSE_WEIGHT_OPS) and getattr(node.args[0], "name", None) in buffers:
            base = mil_name(buffers[node.args[0].name].rpartition(".")[0])  # the weight module's FQN (<layer>.weight)
        elif node.op == "call_function" and node.name in io_names:
            base = f"{node.name}_value"
        else:
            continue
        name, count = base, 1
        while name in taken:  # a weight used twice: one node per use
            count += 1
            name = f"{base}_{count}"
        taken.add(name)
        for spec in program.graph_signature.output_specs:  # coremltools finds the outputs by these names
            if getattr(spec.arg, "name", None) == node.name:
                spec.arg.name = name
        node.name = name
    return program


class _FailingNode(logging.Handler):
    """Catches the torch op coremltools' frontend was converting when it failed: it logs
    "ERROR - converting '<op>' op" and re-raises a message that often lacks the op (a ValueError from an op's
    type inference), so the error can still name the op and, through it, the module."""

    _PATTERN = re.compile(r"converting '([\w.]+)' op")

    def __init__(self):
        super().__init__(logging.ERROR)
        self.kind: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        match = self._PATTERN.search(record.getMessage())
        if match:
            self.kind = match.group(1).split(".")[0]

    def __enter__(self):
        logging.getLogger("coremltools").addHandler(self)
        return self

    def __exit__(self, *exc_info):
        logging.getLogger("coremltools").removeHandler(self)
        return False


def _rename_features(mlmodel, input_names: list[str], output_names: list[str], renamed: dict):
    """Give the ML program's inputs and outputs the model's names (torch.export names them args_0, ...), in
    their Core ML spelling, and record the names Core ML could not take (`renamed`) in the artifact."""
    import coremltools as ct

    spec = mlmodel.get_spec()
    if renamed["inputs"] or renamed["outputs"]:
        spec.description.metadata.userDefined[FEATURE_NAMES_KEY] = json.dumps(renamed, sort_keys=True)
    current_inputs = [i.name for i in spec.description.input]
    current_outputs = [o.name for o in spec.description.output]
    changed = False
    for old, new in [*zip(current_inputs, input_names), *zip(current_outputs, output_names)]:
        if old != new:
            ct.utils.rename_feature(spec, old, new)
            changed = True
    if not changed and not (renamed["inputs"] or renamed["outputs"]):
        return mlmodel
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir)


# What coremltools writes that changes from run to run (measured, docs/research/determinism.md): the day of
# the conversion. Its version, source framework and dialect stay: they describe how the model was made.
VOLATILE_METADATA = ("com.github.apple.coremltools.conversion_date",)
_SPEC = Path("Data") / "com.apple.CoreML" / "model.mlmodel"
_ITEM_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "edgeq:mlpackage-item")  # fixed: ids depend on content only


def make_reproducible(package: Path) -> None:
    """Rewrite a saved .mlpackage so that the same model gives the same bytes, in place:

    - model.mlmodel without the conversion date, serialized deterministically: protobuf maps (the user
      metadata, every MIL op's attributes) otherwise come out in an order that changes from process to process;
    - Manifest.json with each item's identifier derived from its path and content (uuid5) instead of a
      random uuid4, so the package's identity follows what it holds.
    Core ML and coremltools read the package as before (tests/test_determinism.py loads it).
    """
    from coremltools.proto import Model_pb2

    spec_path = package / _SPEC
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    metadata = spec.description.metadata.userDefined
    for key in VOLATILE_METADATA:
        if key in metadata:
            del metadata[key]
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries = manifest.get("itemInfoEntries", {})
    renamed = {
        old: str(uuid.uuid5(_ITEM_NAMESPACE, f"{entry['path']}\0{sha256_path(package / 'Data' / entry['path'])}"))
        for old, entry in entries.items()
    }
    manifest["itemInfoEntries"] = {renamed[old]: entry for old, entry in entries.items()}
    if manifest.get("rootModelIdentifier") in renamed:
        manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
