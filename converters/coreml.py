"""Core ML: an ML program (.mlpackage) from `torch.export(...).run_decompositions({})`.

The empty decomposition table keeps high-level ops (layer_norm, attention) that Core ML maps to fused MIL
ops; when the frontend lacks an op that the default table decomposes (e.g. `new_ones` in Hugging Face
models), the default table is used instead and the manifest says so. Integer inputs are int32 in Core ML.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from edgeq.converters.base import Artifact, ConversionRequest, Converter
from edgeq.converters.failures import explain_failure
from edgeq.converters.tracing import quiet, shape_notes
from edgeq.rewrites import apply_rewrites
from edgeq.targets import Precision, Runtime

_MISSING_OP = re.compile(r"Unsupported fx node|convert function for op .* not implemented")


class CoreMLConverter(Converter):
    runtime = Runtime.COREML
    filename = "model.mlpackage"

    def convert(self, request: ConversionRequest, dest: Path) -> Artifact:
        import coremltools as ct

        model, profile = request.model, request.profile
        module, rewrites = apply_rewrites(model.module, "coreml")
        examples = model.example_inputs
        notes = shape_notes(model, profile)
        options = dict(
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if request.precision == Precision.FP16 else ct.precision.FLOAT32,
            minimum_deployment_target=getattr(ct.target, profile.runtime_options.get("minimum_deployment_target", "iOS16")),
        )
        try:
            program = torch.export.export(module, examples, strict=False)
            try:
                with quiet():  # coremltools draws a progress bar for every pass
                    mlmodel = ct.convert(program.run_decompositions({}), **options)
            except Exception as exc:
                if not _MISSING_OP.search(str(exc)):
                    raise
                with quiet():
                    mlmodel = ct.convert(program.run_decompositions(), **options)
                rewrites.append(f"default-decomposition-table: {str(exc).strip().splitlines()[0][:120]}")
        except Exception as exc:
            raise explain_failure(profile.id, exc, module, examples) from exc
        mlmodel = _rename_features(mlmodel, model.input_names, model.outputs)
        mlmodel.save(str(dest))
        return Artifact(dest, self.runtime, request.precision, profile.id, self.versions(), rewrites, notes)

    @staticmethod
    def versions() -> dict[str, str]:
        import coremltools as ct

        return {"torch": torch.__version__, "coremltools": ct.__version__}


def _rename_features(mlmodel, input_names: list[str], output_names: list[str]):
    """Give the ML program's inputs and outputs the model's names (torch.export names them args_0, ...)."""
    import coremltools as ct

    spec = mlmodel.get_spec()
    current_inputs = [i.name for i in spec.description.input]
    current_outputs = [o.name for o in spec.description.output]
    changed = False
    for old, new in [*zip(current_inputs, input_names), *zip(current_outputs, output_names)]:
        if old != new:
            ct.utils.rename_feature(spec, old, new)
            changed = True
    if not changed:
        return mlmodel
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir)
