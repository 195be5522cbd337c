"""A text-generation bundle on the device: a greedy generate loop with numpy and the runtime only, checked
against the golden continuations the host wrote into the bundle (issue 14).

The bundle's `generation.json` (written by `edgeq convert --task text-generation` through `generation_record`;
its sha256 is in manifest.json, so a changed golden is refused like a changed artifact):

    format, schema   "edgeq-generation", 1
    runtime          onnx | tflite | coreml;  artifact: the artifact's file name in the bundle
    max_context      positions the artifact's KV cache holds
    new_tokens       tokens decoded per prompt at most (a prompt's own `steps` is fewer where max_context is short)
    eos_token_ids    the model's end tokens: the loop stops after emitting one, and goldens are compared up to
                     and including their first one (what a chat app shows); the host decoded past them
    session          how the host ran the artifact, and so how the device does: {"threads": N or null}
    io               how to drive the artifact (the loop checks it against the artifact; an app can read it):
                     input/output or signature names, the KV cache's tensors, layout and dtype. An int8 ONNX cache
                     is quantized inside the graph (its scales are constants): it is carried as int8, nothing more
    prompts          [{ids, steps, artifact_tokens, fp32_tokens, and when the model has a tokenizer: text,
                     artifact_text, fp32_text}]: artifact_tokens is this artifact's own greedy continuation on the
                     host, fp32_tokens FP32 PyTorch's, both from the conversion's validation (report.json)

The loop drives the artifact through the host's own torch-free StepRunners (validate/runners/onnx_decoder.py,
tflite_decoder.py: the same cache layout and calls), so the device reruns exactly what the host validated, in
its own build of the runtime. Core ML prediction exists on macOS only: elsewhere the bundle is verified, not
run (verdict not_validated, exit 0, said so). Budget terms: greedy_match (tokens before the first divergence
from the artifact's golden, over the golden tokens, all prompts) and fp32_match (the same against FP32);
the default holds the golden exactly, greedy_match>=1.

The standard library and numpy; the runtime inside `open_runner`. No torch, no transformers.
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import SourceError, UsageError
from edgeq.hashing import sha256_path

GENERATION_FILE = "generation.json"
FORMAT, SCHEMA = "edgeq-generation", 1
TASK = "text-generation"  # manifest.json's "task" of a text-generation bundle
METRICS = ("greedy_match", "fp32_match")
DEFAULT_BUDGET = "greedy_match>=1"  # the device must reproduce the host artifact's continuation exactly
_TERM = re.compile(r"^\s*([a-z_0-9]+)\s*>=\s*([-+0-9.eE]+)\s*$")
_NAME = re.compile(r"\s*([a-z_0-9]*)")  # a term's metric name (matches any text, maybe empty)


# -- the host side: what write_bundle records ------------------------------------------------------------------


def io_record(runtime: str, layers: int, kv_heads: int, head_dim: int, max_context: int, *,
              cache_dtype: str = "float32", prefill_length: int | None = None) -> dict:
    """How to drive a decoder artifact of `runtime` (edgeq/llm/<runtime>_decoder.py's layouts)."""
    if runtime == "onnx":
        return {"inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.%d.key", "past_key_values.%d.value"],
                "outputs": ["logits", "present.%d.key", "present.%d.value"],
                "cache": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": cache_dtype,
                          "layout": "[batch, kv_heads, past_sequence, head_dim]: each call feeds the last presents "
                                    "as the past (empty at prefill), attention_mask ones over past + sequence"}}
    if runtime == "tflite":
        return {"signatures": {"prefill": prefill_length, "decode": 1},
                "inputs": ["tokens", "input_pos", "mask", "kv_cache_k_%d", "kv_cache_v_%d"],
                "outputs": ["logits", "kv_cache_k_%d", "kv_cache_v_%d"],
                "cache": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": cache_dtype,
                          "layout": f"k [1, kv_heads, {max_context}, head_dim], v [1, kv_heads, head_dim, {max_context}] "
                                    "(LiteRT-LM's), written at input_pos; mask additive [1, 1, T, max_context]"}}
    if runtime == "coreml":
        return {"inputs": ["input_ids", "cache_position", "causal_mask"], "outputs": ["logits"],
                "states": ["k_cache", "v_cache"],
                "cache": {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "float16",
                          "layout": "MLState, updated in place at cache_position"}}
    raise UsageError(f"runtime {runtime!r}: a text-generation bundle is onnx, tflite or coreml")


def generation_record(runtime: str, artifact: str, max_context: int, new_tokens: int, eos_token_ids, io: dict,
                      threads: int | None, prompts: list[dict]) -> dict:
    """generation.json's content. `prompts`: [{ids, steps, artifact_tokens, fp32_tokens, [text, ...]}]."""
    eos = [] if eos_token_ids is None else [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    return {"format": FORMAT, "schema": SCHEMA, "runtime": runtime, "artifact": artifact, "max_context": int(max_context),
            "new_tokens": int(new_tokens), "eos_token_ids": [int(e) for e in eos], "session": {"threads": threads},
            "io": io, "prompts": prompts}


def record_text(record: dict) -> str:
    """generation.json's text: indented, each list of token ids on one line (only the indenter's lists hold a raw
    newline: a string's "[1,2]" is left alone)."""
    return re.sub(r"\[\n[-0-9,\s]*\]", lambda m: json.dumps(json.loads(m[0])), json.dumps(record, indent=1)) + "\n"


# -- the device side ------------------------------------------------------------------------------------------


def is_generation_bundle(folder: Path) -> bool:
    """True for a folder whose manifest says task text-generation (read leniently: anything else goes the usual way)."""
    try:
        return json.loads((Path(folder) / "manifest.json").read_text()).get("task") == TASK
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class GenerationBundle:
    path: Path
    manifest: dict
    record: dict
    artifact: Path

    @property
    def runtime(self) -> str:
        return self.record["runtime"]

    @property
    def name(self) -> str:
        return bundle_label(self.path)


def bundle_label(folder: Path) -> str:
    """`<model>/<runtime>/<precision>` from the folder layout convert writes (out/<model>/<runtime>/<precision>)."""
    folder = Path(folder)
    return "/".join(p.name for p in (folder.parent.parent, folder.parent, folder))


def read_generation_bundle(folder: Path) -> GenerationBundle:
    """The manifest and generation.json, both files checked against the manifest's sha256; else SourceError (3)."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        artifact = folder / _plain(manifest["artifact"]["file"])
        record_file = folder / _plain(manifest["generation"]["file"])
        expected = {artifact: manifest["artifact"]["sha256"], record_file: manifest["generation"]["sha256"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"{manifest_path}: not a text-generation bundle the device can run: {exc!r} is missing or "
                          f"malformed (a bundle written before {GENERATION_FILE} existed needs `edgeq convert` again)") from exc
    for path, digest in expected.items():
        if not path.exists():
            raise SourceError(f"{path}: missing from the bundle (its manifest lists it)")
        actual = sha256_path(path)
        if actual != digest:
            raise SourceError(f"{path}: sha256 {actual[:16]}... does not match the manifest's {str(digest)[:16]}...: "
                              "changed after edgeq wrote it; refusing to run it")
    try:
        record = json.loads(record_file.read_text())
        if record.get("format") != FORMAT or int(record.get("schema", 0)) > SCHEMA:
            raise ValueError(f"not {FORMAT} schema <= {SCHEMA}")
        for prompt in record["prompts"]:
            prompt["ids"], prompt["artifact_tokens"], prompt["fp32_tokens"] = (
                [int(t) for t in prompt[key]] for key in ("ids", "artifact_tokens", "fp32_tokens"))
        missing = [key for key in ("runtime", "max_context", "session", "io") if key not in record]
        if missing:
            raise KeyError(", ".join(missing))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SourceError(f"{record_file}: malformed ({exc})") from exc
    return GenerationBundle(folder, manifest, record, artifact)


def as_bundle_files(bundle: GenerationBundle):
    """The view a lab archive packs (edgeq/device/archive.py): generation.json in the golden file's place, the
    manifest's plain-string model and target as the dicts an ordinary bundle's manifest has (in memory only)."""
    from edgeq.validate.bundle_check import BundleFiles

    manifest = dict(bundle.manifest, golden=bundle.manifest["generation"], model={"name": bundle.path.parent.parent.name},
                    target={"id": bundle.runtime, "runtime": bundle.runtime},
                    budget={"verdict": bundle.manifest.get("verdict")}, plan=None)
    return BundleFiles(bundle.path, manifest, bundle.artifact, bundle.path / GENERATION_FILE, bundle.runtime, {}, [])


def _plain(name) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"file name {name!r} is not a plain name in the bundle folder")
    return name


def parse_generation_budget(text: str | None) -> list[tuple[str, float]]:
    """'greedy_match>=0.9,fp32_match>=0.5' -> [(metric, limit)]; None -> the default; '' or 'none' -> no bounds."""
    text = DEFAULT_BUDGET if text is None else text
    if not text.strip() or text.strip().lower() == "none":
        return []
    bounds = []
    for part in text.split(","):
        match = _TERM.match(part)
        try:
            limit = float(match[2]) if match else None
        except ValueError:
            limit = None
        if limit is None or match[1] not in METRICS or not 0.0 <= limit <= 1.0:
            raise UsageError(f"--budget {part.strip()!r}: a text-generation bundle takes "
                             f"{' and '.join(m + '>=R' for m in METRICS)}, R from 0 to 1")
        bounds.append((match[1], limit))
    return bounds


def is_generation_budget(text: str) -> bool:
    """Whether `text` names a text-generation metric anywhere: then it is read (and refused) as one."""
    return any(_NAME.match(part)[1] in METRICS for part in text.split(","))


@dataclass
class PromptRun:
    """One prompt's device continuation against both goldens (each cut after its first EOS)."""

    index: int
    prompt_tokens: int
    tokens: list[int]
    golden: list[int]           # the host artifact's continuation, up to its first EOS
    fp32: list[int]             # FP32 PyTorch's
    matched: int                # device tokens equal to `golden` before the first difference
    fp32_matched: int
    prefill_s: float
    decode_s: float
    text: str | None = None
    golden_text: str | None = None

    @property
    def equal(self) -> bool:
        return self.tokens == self.golden

    def to_json(self) -> dict:
        divergence = None if self.equal else {
            "step": self.matched, "golden": _at(self.golden, self.matched), "device": _at(self.tokens, self.matched)}
        return {"prompt": self.index, "prompt_tokens": self.prompt_tokens, "text": self.text, "equal": self.equal,
                "tokens": self.tokens, "golden_tokens": self.golden, "golden_text": self.golden_text,
                "tokens_to_divergence": self.matched, "first_divergence": divergence,
                "fp32_tokens_to_divergence": self.fp32_matched, "fp32_golden_tokens": len(self.fp32),
                "prefill_seconds": round(self.prefill_s, 5), "decode_seconds": round(self.decode_s, 5)}


@dataclass
class GenerationResult:
    executor: str
    prompts: list[PromptRun] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        golden = sum(len(p.golden) for p in self.prompts)
        fp32 = sum(len(p.fp32) for p in self.prompts)
        return {"greedy_match": sum(p.matched for p in self.prompts) / golden if golden else 1.0,
                "fp32_match": sum(p.fp32_matched for p in self.prompts) / fp32 if fp32 else 1.0}

    def speed(self) -> dict:
        """Tokens per second of the golden loop itself (its first pass: no warm-up, one prompt after another)."""
        prefill_s, decode_s = sum(p.prefill_s for p in self.prompts), sum(p.decode_s for p in self.prompts)
        prefilled = sum(p.prompt_tokens for p in self.prompts)
        decoded = sum(max(len(p.tokens) - 1, 0) for p in self.prompts)  # the first new token comes from the prefill
        return {"prefill_tokens_per_s": round(prefilled / prefill_s, 1) if prefill_s else None,
                "decode_tokens_per_s": round(decoded / decode_s, 1) if decode_s else None}

    def violations(self, bounds: list[tuple[str, float]]) -> list[str]:
        values = self.metrics()
        lines = [f"{metric} {values[metric]:.4g} breaks {metric}>={limit:g}" for metric, limit in bounds
                 if values[metric] < limit]
        if lines:
            lines += [f"prompt {p.index}: device leaves the golden at token {p.matched} of {len(p.golden)} "
                      f"(golden {_at(p.golden, p.matched)}, device {_at(p.tokens, p.matched)})"
                      for p in self.prompts if not p.equal]
        return lines

    def to_json(self) -> dict:
        return {"executor": self.executor, "metrics": self.metrics(), "speed": self.speed(),
                "prompts": [p.to_json() for p in self.prompts]}


def _at(tokens: list[int], index: int):
    return tokens[index] if index < len(tokens) else "end"


class NotRunHere(Exception):
    """This device cannot run the bundle's runtime at all (Core ML off macOS): not a failure of the artifact."""


def open_runner(bundle: GenerationBundle):
    """(the artifact's StepRunner in its runtime with the host's session settings, what executes it), its cache
    checked against the record. ImportError: the runtime is not installed; RunnerError: it cannot load the artifact."""
    from edgeq.validate.runners.base import RunnerError

    record, runtime = bundle.record, bundle.runtime
    max_context, threads = int(record["max_context"]), record["session"].get("threads")
    cache = (record.get("io") or {}).get("cache") or {}
    if runtime == "onnx":
        from edgeq.validate.runners.onnx_decoder import OnnxDecoderRunner

        runner = OnnxDecoderRunner(bundle.artifact, max_context, threads=1 if threads is None else int(threads))
        executor = f"onnxruntime (CPU, {runner.session.get_session_options().intra_op_num_threads} intra-op thread(s))"
        found = {"layers": len(runner.past_names) // 2, "dtype": runner.cache_dtype.name}
    elif runtime == "tflite":
        from edgeq.validate.runners.tflite_decoder import TFLiteDecoderRunner

        runner = TFLiteDecoderRunner(bundle.artifact, max_context, threads)
        executor = runner.executor
        found = {"layers": len(runner.cache_names) // 2, "dtype": runner.cache_dtype.name}
        want = (record["io"].get("signatures") or {}).get("prefill")
        if want is not None and want != runner.prefill_length:
            raise RunnerError(f"{bundle.artifact.name}: prefill signature of {runner.prefill_length} rows, "
                              f"{GENERATION_FILE} says {want}")
    elif runtime == "coreml":
        if platform.system() != "Darwin":
            raise NotRunHere(f"not run here: Core ML prediction needs macOS (this is {platform.system()}); "
                             "the bundle's files were verified against its manifest")
        from edgeq.validate.runners.coreml_decoder import CoreMLDecoderRunner

        runner = CoreMLDecoderRunner(bundle.artifact, max_context, executor="coreml")
        executor, found = "Core ML (MLModel.predict with MLState)", {}
    else:
        raise RunnerError(f"{GENERATION_FILE}: runtime {runtime!r} is not onnx, tflite or coreml")
    wrong = {k: (v, cache[k]) for k, v in found.items() if k in cache and cache[k] != v}
    if wrong:
        raise RunnerError(f"{bundle.artifact.name} does not match {GENERATION_FILE}'s io.cache: "
                          + ", ".join(f"{k} {have} (recorded {want})" for k, (have, want) in wrong.items()))
    return runner, executor


def greedy(runner, prompt: list[int], steps: int, eos: set[int]) -> tuple[list[int], float, float]:
    """(new tokens, prefill seconds, decode seconds): prefill `prompt`, then argmax and decode one token at a time,
    `steps` tokens at most, stopping after the first end token."""
    runner.reset()
    started = time.perf_counter()
    logits = np.asarray(runner.prefill(np.asarray(prompt, np.int64)))[-1]
    prefill_s = time.perf_counter() - started
    tokens: list[int] = []
    started = time.perf_counter()
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))  # the first maximum, as numpy's argmax on the host picked it
        if tokens[-1] in eos or len(tokens) == steps:
            break
        logits = np.asarray(runner.decode(tokens[-1]))
    return tokens, prefill_s, time.perf_counter() - started


def run_generation(bundle: GenerationBundle) -> GenerationResult:
    """Every prompt of the bundle through the greedy loop, compared with both goldens.
    Raises NotRunHere, ImportError (no runtime), or RunnerError / EdgeqError (the runtime failed)."""
    runner, executor = open_runner(bundle)
    eos = set(bundle.record.get("eos_token_ids") or [])
    result = GenerationResult(executor)
    for index, prompt in enumerate(bundle.record["prompts"]):
        golden, fp32 = _until_eos(prompt["artifact_tokens"], eos), _until_eos(prompt["fp32_tokens"], eos)
        tokens, prefill_s, decode_s = greedy(runner, prompt["ids"], int(prompt["steps"]), eos)
        result.prompts.append(PromptRun(index, len(prompt["ids"]), tokens, golden, fp32, _common(tokens, golden),
                                        _common(tokens, fp32), prefill_s, decode_s, prompt.get("text"),
                                        prompt.get("artifact_text")))
    return result


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return list(tokens)


def _common(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def check_generation(bundle: GenerationBundle, budget_text: str | None):
    """(BundleCheck, GenerationResult or None) for a verified bundle: the verdict the device CLI reports."""
    from edgeq.validate.bundle_check import BundleCheck
    from edgeq.validate.drift import DriftReport, Status
    from edgeq.validate.verdict import Verdict

    bounds = parse_generation_budget(budget_text)
    shown = ",".join(f"{m}>={limit:g}" for m, limit in bounds)
    started = time.perf_counter()
    prompts = len(bundle.record["prompts"])
    try:
        result = run_generation(bundle)
    except NotRunHere as exc:
        report = DriftReport(Status.NOT_EXECUTED, executor="none", samples=0, reason=str(exc))
        return BundleCheck(bundle.path, bundle.manifest, report, shown, Verdict.NOT_VALIDATED, latency_reason="not run"), None
    except ImportError as exc:
        from edgeq.device.runtime import INSTALL_HINTS

        reason = f"{exc}; install it with: {INSTALL_HINTS.get(bundle.runtime, 'its runtime')}"
        report = DriftReport(Status.ERROR, executor="none", reason=reason)
        return BundleCheck(bundle.path, bundle.manifest, report, shown, Verdict.VALIDATION_FAILED, latency_reason="not run"), None
    except Exception as exc:  # RunnerError, UsageError (a prompt past max_context), ORT's own errors (plain Exceptions)
        report = DriftReport(Status.ERROR, executor=bundle.runtime, reason=f"the runtime failed: {type(exc).__name__}: {exc}")
        return BundleCheck(bundle.path, bundle.manifest, report, shown, Verdict.VALIDATION_FAILED, latency_reason="not run"), None
    violations = result.violations(bounds)
    equal = sum(p.equal for p in result.prompts)
    reason = f"greedy continuations: {equal} of {prompts} prompts equal the host artifact's golden"
    report = DriftReport(Status.VALIDATED, executor=result.executor, samples=prompts, reason=reason)
    verdict = Verdict.OVER_BUDGET if violations else Verdict.PASSED
    checked = BundleCheck(bundle.path, bundle.manifest, report, shown, verdict, violations,
                          latency_reason="text generation: see the decode speed", seconds=time.perf_counter() - started)
    return checked, result
