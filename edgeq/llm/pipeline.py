"""`edgeq convert SRC --task text-generation`: a causal LM exported per runtime with its KV cache, each
artifact checked token by token against FP32 PyTorch (validate/generation.py), one bundle per target x precision.

Per-runtime modules plug in by name: edgeq/llm/<runtime>_decoder.py exposing
    export_decoder(hf_model, max_context, dest, *, plan=None) -> Path
    open_runner(path, max_context) -> StepRunner
A runtime whose module is not there is refused before any work ("not yet").
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError, SourceError, UsageError

RUNTIMES = {"onnx": "onnx_decoder", "tflite": "tflite_decoder", "coreml": "coreml_decoder"}
FILENAMES = {"onnx": "model.onnx", "tflite": "model.tflite", "coreml": "model.mlpackage"}
# The 4-bit scheme each runtime runs (ONNX: MatMulNBits at fp32 math; TFLite: XNNPACK's int8-activation kernel).
LOWBIT = {"onnx": ("int4-weight", "int4-dynamic"), "tflite": ("int4-dynamic",), "coreml": ("int4-weight",)}
DEFAULT_MAX_CONTEXT = 256
GREEDY_STEPS = 20            # tokens decoded per prompt: enough for a sentence, and for drift to compound
PROMPT_TOKENS = 32           # a prompt's length at most (the rest of max_context is for its continuation)
SEQUENCE_TOKENS = 128        # a teacher-forced sequence's length at most
BUDGET_METRICS = {"token_agreement": ">=", "greedy_agreement": ">=", "logit_cosine_min": ">=",
                  "step_cosine_min": ">=", "ppl_delta": "<="}


@dataclass
class Options:
    source: str
    targets: list[str]
    precisions: list[str]
    out: Path
    max_context: int = DEFAULT_MAX_CONTEXT
    data: Path | None = None
    text_column: str | None = None
    samples: int = 16
    calibration_samples: int = 16
    algo: str | None = None
    group_size: int = 32
    budget: str | None = None
    name: str | None = None
    seed: int = 0
    keep_float: list[str] = field(default_factory=list)
    kv_cache: str = "float"  # float | int8 (edgeq/llm/kv_cache.py; onnx only)
    per_layer: list[str] = field(default_factory=list)  # --per-layer PATTERN=SCHEME (edgeq/layer_overrides.py)
    source_grid: str = "keep"  # keep | requantize: a source's own 4-bit grid (edgeq/llm/source_grid.py)
    outlier_channels: int | None = None  # tflite int4: input channels in float per linear (edgeq/llm/outlier_split.py)


def check_options(options: Options) -> list[tuple[str, str, object]]:
    """(runtime, precision, module) for every requested pair, refusing any unknown or not-yet one first."""
    if options.max_context < 2:
        raise UsageError(f"--max-context {options.max_context}: a decoder needs at least 2 positions")
    parse_budget(options.budget)
    if options.per_layer:
        from edgeq.layer_overrides import parse_per_layer

        parse_per_layer(list(options.per_layer), "--per-layer")
    if options.source_grid not in ("keep", "requantize"):
        raise UsageError(f"--source-grid {options.source_grid}: expected keep or requantize")
    if options.outlier_channels is not None and not 0 <= options.outlier_channels <= 256:
        raise UsageError(f"--outlier-channels {options.outlier_channels}: expected 0 (none) to 256 input channels per linear")
    if options.outlier_channels is not None and "tflite" not in (options.targets or ["onnx"]):
        raise UsageError("--outlier-channels: only -t tflite needs it (LiteRT's 4-bit kernel quantizes input rows to int8; "
                         "ONNX's int4 kernels quantize blocks of 32, Core ML's keep float inputs)")
    from edgeq.llm.kv_cache import check_runtimes

    check_runtimes(options.kv_cache, options.targets or ["onnx"])
    jobs = []
    for runtime in options.targets or ["onnx"]:
        if runtime not in RUNTIMES:
            raise UsageError(f"-t {runtime}: --task text-generation exports to {', '.join(RUNTIMES)}")
        name = f"edgeq.llm.{RUNTIMES[runtime]}"
        if importlib.util.find_spec(name) is None:
            raise UsageError(f"-t {runtime}: the {runtime} decoder export is not yet available (no {name})")
        for precision in options.precisions or ["fp32"]:
            if precision != "fp32" and precision not in LOWBIT[runtime]:
                raise UsageError(f"-p {precision}: text-generation on {runtime} takes fp32 or {', '.join(LOWBIT[runtime])}")
            jobs.append((runtime, precision, name))
    return jobs


def parse_budget(text: str | None) -> list[tuple[str, str, float]]:
    """'token_agreement>=0.98,ppl_delta<=0.5' -> [(metric, op, limit)]; 'none' or None -> []."""
    import re

    if not text or text.strip() == "none":
        return []
    bounds = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*([a-z_]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", part)
        if not match or match[1] not in BUDGET_METRICS or BUDGET_METRICS[match[1]] != match[2]:
            allowed = ", ".join(f"{m}{op}" for m, op in BUDGET_METRICS.items())
            raise UsageError(f"--budget {part.strip()!r}: text-generation budgets are {allowed} a number")
        bounds.append((match[1], match[2], float(match[3])))
    return bounds


def run(options: Options, echo=print) -> int:
    """Convert and validate every target x precision; returns the exit code (0, or 6 when over budget)."""
    jobs = check_options(options)
    from edgeq.threads import limited_threads

    # edgeq's own torch work on one thread (edgeq/threads.py: workers spinning on a shared machine cost
    # several times the CPU); the runtimes' sessions keep their own settings
    with limited_threads():
        return _run(options, jobs, echo)


def _run(options: Options, jobs, echo) -> int:
    from edgeq.llm.reference import TorchStepRunner
    from edgeq.llm.source import load_decoder
    from edgeq.validate import generation

    echo(f"loading {options.source}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the GGUF dequantization bar; edgeq prints its own steps
    source = load_decoder(options.source)
    sequences, prompts, calibration = token_data(source, options)
    reference = TorchStepRunner(source.model, options.max_context)
    bounds = parse_budget(options.budget)
    kv_plan = kv_block = None
    if options.kv_cache == "int8":
        from edgeq.llm import kv_cache

        kv_plan, kv_block = kv_cache.prepare(source.model, options.max_context, reference, calibration, sequences,
                                             prompts, GREEDY_STEPS, echo, tokenizer=source.tokenizer)
    code, lowbit_source = 0, None  # (the model low-bit plans take, its notes): split once, shared by the runtimes
    for runtime, precision, module_name in jobs:
        module = importlib.import_module(module_name)
        bundle = options.out / (options.name or source.name) / runtime / precision
        if bundle.exists():
            shutil.rmtree(bundle)
        bundle.mkdir(parents=True)
        started = time.perf_counter()
        plan, notes, exported = None, [], source.model
        if precision != "fp32":
            lowbit_source = lowbit_source or source_grid_model(source.model, options, echo)
            exported, grid_notes = lowbit_source
            plan_options = options
            if runtime == "tflite":  # LiteRT's 4-bit kernel quantizes input rows to int8: outliers beside it in float
                exported, split_notes, plan_options = outlier_split_model(exported, calibration, options, echo)
                grid_notes = [*grid_notes, *split_notes]
            echo(f"{runtime} {precision}: resolving the plan ({options.algo or 'rtn'}, group {options.group_size})")
            plan = lowbit_plan(runtime, exported, calibration, precision, plan_options)
            plan.notes[:0] = grid_notes
        echo(f"{runtime} {precision}: exporting the decoder (max context {options.max_context})")
        dest = bundle / FILENAMES[runtime]
        if runtime == "onnx":
            from edgeq.targets import Precision

            dest, notes = module.export_with_notes(exported, options.max_context, dest, plan=plan,
                                                   precision=Precision(precision), kv_cache=kv_plan)
        else:
            dest = module.export_decoder(exported, options.max_context, dest, plan=plan)
        seconds = time.perf_counter() - started
        echo(f"{runtime} {precision}: validating on {len(sequences)} sequences and {len(prompts)} prompts")
        candidate = module.open_runner(dest, options.max_context)
        report = generation.compare(reference, candidate, sequences, prompts, GREEDY_STEPS)
        metrics = report.metrics()
        violations = [f"{m}{op}{limit:g} (got {metrics[m]:.4g})" for m, op, limit in bounds
                      if not (metrics[m] >= limit if op == ">=" else metrics[m] <= limit)]
        write_bundle(bundle, dest, source, options, runtime, precision, plan, notes, report, violations, seconds,
                     kv=kv_block, prompts=prompts)
        verdict = "over budget: " + "; ".join(violations) if violations else "ok"
        echo(f"{runtime} {precision}: token agreement {metrics['token_agreement']:.4f}, ppl delta "
             f"{metrics['ppl_delta']:+.4g}, greedy {metrics['greedy_agreement']:.3f} -> {bundle} ({verdict})"
             + (f"; int8 KV cache alone: {kv_cache.summary(kv_block['cache_only_drift'])}" if kv_block else ""))
        if violations:
            code = 6
    return code


def source_grid_model(model, options: Options, echo):
    """(the model the low-bit plan and export take, notes): with `--source-grid keep` (the default), a copy whose
    linears already on an affine 4-bit grid of 32 inputs (a GGUF Q4_1 source) are split into symmetric codes plus
    float group offsets and keep their codes (edgeq/llm/source_grid.py); otherwise `model` itself."""
    import copy

    from edgeq.llm.source_grid import GROUP, split_source_grids

    if options.source_grid == "requantize":
        return model, ["--source-grid requantize: every linear quantized again from its float weights"]
    if options.algo not in (None, "rtn") or options.group_size != GROUP:
        why = f"--algo {options.algo}" if options.algo not in (None, "rtn") else f"--group-size {options.group_size}"
        return model, [f"{why}: linears quantized again from their float weights (a source grid is kept only at "
                       f"group {GROUP} without --algo; --source-grid requantize says so explicitly)"]
    split = copy.deepcopy(model)
    names = split_source_grids(split)
    if not names:
        return model, []
    echo(f"source grid: {len(names)} linears already hold 4-bit codes per group of {GROUP}: kept verbatim")
    return split, [f"{len(names)} linears keep the source's own 4-bit grid (per group of {GROUP} inputs, w = d * q + m, "
                   f"as GGUF Q4_1 stores it): symmetric codes q - 8 with scale d verbatim, plus the float offsets "
                   f"m + 8 d over the group sums (exact; edgeq/llm/source_grid.py). --source-grid requantize "
                   f"quantizes them again instead"]


def outlier_split_model(model, calibration, options: Options, echo):
    """(a copy of `model` whose linears compute their largest input channels in float beside the 4-bit kernel,
    and the few whose int8 rows still cost most float whole (edgeq/llm/row_sensitivity.py), notes, the options with
    --keep-float / --per-layer names of those linears moved to the planned inner layer `NAME.linear`); `model` and
    `options` themselves with --outlier-channels 0 (edgeq/llm/outlier_split.py)."""
    import copy
    import dataclasses

    from edgeq.llm.outlier_split import DEFAULT_CHANNELS, describe, split_outlier_inputs
    from edgeq.llm.row_sensitivity import describe_float, keep_sensitive_float

    channels = DEFAULT_CHANNELS if options.outlier_channels is None else options.outlier_channels
    if channels == 0:
        return model, ["--outlier-channels 0: every linear's input rows go to the int8 kernel whole, none kept float for them"], options
    split = copy.deepcopy(model)
    names = split_outlier_inputs(split, calibration, channels)  # planned layer name before -> now
    echo(f"outlier channels: {channels} input channels of {len(names)} linears in float beside the 4-bit kernel")
    floated = keep_sensitive_float(split, calibration)  # the few whose int8 rows still cost most: float whole
    for before, now in list(names.items()):
        if (owner := now.rpartition(".")[0]) in floated:  # the wrapper's planned layer is gone: the name is the layer's
            names[before] = owner
    if floated:
        echo(f"int8 rows: {len(floated)} linears float whole ({', '.join(floated)})")

    def moved(pattern: str) -> str:  # an exact name of a wrapped layer now names its planned layer; globs match both
        return names.get(pattern, pattern)

    renamed = dataclasses.replace(options, keep_float=[moved(p) for p in options.keep_float],
                                  per_layer=[moved(p) + "=" + v for p, _, v in (e.rpartition("=") for e in options.per_layer)])
    notes = ([describe(sorted(names), channels)] if names else []) + ([describe_float(floated)] if floated else [])
    return split, notes, renamed


def token_data(source, options: Options):
    """(teacher-forced sequences, greedy prompts, calibration sequences) as int64 arrays, disjoint sets."""
    texts = read_texts(options.data, options.text_column) if options.data else None
    tokenizer = source.tokenizer
    if texts is not None and tokenizer is None:
        raise SourceError(f"{options.source}: the model has no tokenizer to read the text in {options.data}")
    if texts is None:
        if tokenizer is not None:
            texts = list(DEFAULT_TEXTS)
        else:  # no tokenizer, no data: seeded random ids (the figures then say nothing about language)
            rng = np.random.default_rng(options.seed)
            vocab = source.model.config.vocab_size
            texts = [rng.integers(0, vocab, size=24, dtype=np.int64) for _ in range(options.samples + options.calibration_samples)]
    limit = min(SEQUENCE_TOKENS, options.max_context)
    encoded = [np.asarray(t if tokenizer is None or not isinstance(t, str) else tokenizer(t)["input_ids"], np.int64)[:limit]
               for t in texts]
    encoded = [e for e in encoded if e.size >= 2]
    if not encoded:
        raise SourceError(f"{options.data}: no text of two tokens or more")
    validation = encoded[:options.samples]
    calibration = encoded[options.samples:options.samples + options.calibration_samples] or validation
    prompt_len = max(1, min(PROMPT_TOKENS, options.max_context - GREEDY_STEPS))
    prompts = [e[:prompt_len] for e in validation]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) and texts and isinstance(texts[0], str):
        # a chat model answers a user turn: the prompts are the texts as user messages, whole (a template's system
        # turn makes them longer than PROMPT_TOKENS; cut, the model would go on writing the user's text), or their
        # last tokens, which hold the assistant's turn, where the context is too short
        room = max(1, options.max_context - GREEDY_STEPS)
        prompts = [np.asarray(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                            tokenize=True, return_dict=True)["input_ids"], np.int64)[-room:]
                   for t in texts[:options.samples]]
    return validation, prompts, calibration


DEFAULT_TEXTS = (  # chat prompts: the first --samples (32) are validated, the next ones calibrate (disjoint)
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "List three primary colors.", "How many legs does a spider have?", "Translate 'good morning' into Spanish.",
    "What is 12 times 12?", "Name a famous painting by Leonardo da Vinci.",
    "Why is the sky blue?", "Give me a tip for sleeping better.", "What is the boiling point of water in Celsius?",
    "Who wrote Romeo and Juliet?", "Suggest a name for a pet goldfish.", "What does a bee make?",
    "How do I make a cup of tea?", "What is the largest planet in the solar system?",
    "Write one sentence about autumn.", "What is the opposite of 'ancient'?", "How many days are in a leap year?",
    "Recommend a book for a long train ride.", "What language is spoken in Brazil?", "Describe a cat in three words.",
    "What is the square root of 81?", "Why do we need to drink water?", "What is the chemical symbol for gold?",
    "Tell me a fun fact about octopuses.", "How can I save money on groceries?", "What is the tallest mountain on Earth?",
    "Write a short greeting for a birthday card.", "What is the freezing point of water in Fahrenheit?",
    "Name three fruits that are red.", "What is the main ingredient of guacamole?",
    # calibration prompts (never validated with the default --samples)
    "Summarize the plot of Cinderella in two sentences.", "What are the three states of matter?",
    "How does a rainbow form?", "Give an example of a renewable energy source.", "What is a synonym for 'happy'?",
    "Explain what a noun is.", "What continent is Egypt in?", "How many minutes are in two hours?",
    "What do plants need to grow?", "Write a sentence using the word 'bright'.", "Who painted the Starry Night?",
    "What is the capital of Japan?",
)


def read_texts(path: Path, column: str | None) -> list[str]:
    """Lines of a .txt, or one column of a .csv/.tsv (`column` an index or header name; default the last)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such text file")
    if path.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in path.read_text(errors="replace")[:4096] else ","
        rows = list(csv.reader(path.open(newline="", errors="replace"), delimiter=delimiter, quoting=csv.QUOTE_NONE))
        if column is None:
            index = -1
        elif column.lstrip("-").isdigit():
            index = int(column)
        elif rows and column in rows[0]:
            index, rows = rows[0].index(column), rows[1:]
        else:
            raise UsageError(f"--text-column {column}: not an index or a header of {path}")
        return [row[index].strip() for row in rows if len(row) > abs(index) - (index < 0) and row[index].strip()]
    return [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]


def lowbit_plan(runtime: str, model, calibration, precision: str, options: Options):
    """The runtime's low-bit plan: its own `int4_plan` (edgeq/llm/<runtime>_lowbit_decoder.py) where it has one."""
    from edgeq.layer_overrides import parse_per_layer
    from edgeq.llm.onnx_lowbit_decoder import int4_plan
    from edgeq.targets import Precision

    overrides = parse_per_layer(default_per_layer(model) + list(options.per_layer), "--per-layer")
    name = f"edgeq.llm.{runtime}_lowbit_decoder"
    if runtime != "onnx" and importlib.util.find_spec(name) is not None and hasattr(importlib.import_module(name), "int4_plan"):
        import inspect

        planner = importlib.import_module(name).int4_plan
        extra = {"overrides": overrides} if overrides else {}
        if options.keep_float:
            if "keep_float" not in inspect.signature(planner).parameters:
                raise UsageError(f"--keep-float: the {runtime} decoder's plan does not take it yet")
            extra["keep_float"] = tuple(options.keep_float)
        return planner(model, calibration, group_size=options.group_size, algorithm=options.algo or "rtn", **extra)
    return int4_plan(model, calibration, group_size=options.group_size, algorithm=options.algo or "rtn",
                     keep_float=tuple(options.keep_float), precision=Precision(precision), target=runtime, overrides=overrides)


def default_per_layer(model) -> list[str]:
    """The LM head and the input embedding table at int8 per channel/row unless --per-layer says otherwise (a later
    entry wins): the head decides every token, and 4 bits there cost most of a small model's agreement
    (SmolLM2-135M ONNX, linears on their source grid: teacher-forced top-1 0.796 with a 4-bit head and table,
    0.969 with int8 ones; 160 MB against 116 MB, fp32 539 MB)."""
    from edgeq.llm.outlier_split import planned_layer

    names = {id(module): name for name, module in model.named_modules()}
    entries = []
    for get in ("get_output_embeddings", "get_input_embeddings"):
        module = planned_layer(getattr(model, get)()) if hasattr(model, get) else None
        if module is not None and id(module) in names:
            entries.append(f"{names[id(module)]}=int8")
    return entries


DEVICE_PROMPTS = 4  # prompts in generation.json: the device's greedy loop reruns these (edgeq/device/generate.py)


def write_bundle(bundle, artifact, source, options, runtime, precision, plan, notes, report, violations, seconds,
                 kv=None, prompts=()) -> None:
    """manifest.json, report.json, report.md, tokenizer/ and generation.json (the first DEVICE_PROMPTS of `prompts`
    with both greedy continuations from `report`, for `edgeq-device`); the manifest records the sha256 of the
    artifact and of generation.json, so the device refuses either once changed."""
    from edgeq.device.generate import GENERATION_FILE, record_text
    from edgeq.hashing import sha256_path
    from edgeq.llm.report import manifest, markdown

    if source.tokenizer is not None:
        try:
            source.tokenizer.save_pretrained(str(bundle / "tokenizer"))  # the bundle decodes its own golden tokens
        except (OSError, ValueError, TypeError) as exc:
            notes = [*notes, f"tokenizer not saved: {exc}"]
    full = report.to_dict()
    for entry in full["prompts"]:
        entry["reference_text"] = _decode(source.tokenizer, entry["reference_tokens"])
        entry["candidate_text"] = _decode(source.tokenizer, entry["candidate_tokens"])
    record = _generation_record(artifact, source, options, runtime, list(prompts)[:DEVICE_PROMPTS], full["prompts"],
                                kv is not None)
    (bundle / GENERATION_FILE).write_text(record_text(record))
    data = manifest(artifact, source, options, runtime, precision, plan, notes, report, violations, seconds, kv=kv)
    data["artifact"]["sha256"] = sha256_path(artifact)
    data["generation"] = {"file": GENERATION_FILE, "sha256": sha256_path(bundle / GENERATION_FILE),
                          "prompts": len(record["prompts"]), "run": "python -m edgeq.device BUNDLE (numpy + the runtime)"}
    (bundle / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    (bundle / "report.json").write_text(json.dumps(full, indent=2) + "\n")
    (bundle / "report.md").write_text(markdown(data, full))


def _generation_record(artifact, source, options, runtime, prompts, validated, int8_cache: bool) -> dict:
    """generation.json: `prompts` (token ids) with the continuations the validation decoded for them (`validated`:
    report.json's prompts, the same order), and what a device needs to drive the artifact."""
    from edgeq.device.generate import generation_record, io_record
    from edgeq.llm.onnx_decoder import cache_shape
    from edgeq.llm.tflite_decoder import prefill_length

    layers, kv_heads, head_dim = cache_shape(source.model.config)
    io = io_record(runtime, layers, kv_heads, head_dim, options.max_context, cache_dtype="int8" if int8_cache else "float32",
                   prefill_length=prefill_length(options.max_context) if runtime == "tflite" else None)
    entries = []
    for ids, done in zip(prompts, validated):
        entry = {"ids": [int(t) for t in ids], "steps": done["steps"], "artifact_tokens": done["candidate_tokens"],
                 "fp32_tokens": done["reference_tokens"]}
        if source.tokenizer is not None:
            entry.update(text=source.tokenizer.decode(entry["ids"]), artifact_text=done["candidate_text"],
                         fp32_text=done["reference_text"])
        entries.append(entry)
    generation = getattr(source.model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    eos = eos if eos is not None else getattr(source.model.config, "eos_token_id", None)
    threads = 1 if runtime == "onnx" else None  # as open_runner ran it here: ORT on one thread, LiteRT its default
    return generation_record(runtime, Path(artifact).name, options.max_context, GREEDY_STEPS, eos, io, threads, entries)


def _decode(tokenizer, tokens) -> str | None:
    if tokenizer is None or tokens is None:
        return None
    return tokenizer.decode(tokens, skip_special_tokens=True)


__all__ = ["Options", "run", "check_options", "parse_budget", "EdgeqError"]
