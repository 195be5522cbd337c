"""The `edgeq` command. Heavy toolchains load inside the commands that need them, so --help is instant."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgeq.errors import EdgeqError, UsageError
from edgeq.quantize import ALGORITHM_NAMES, DEVICE_NAMES


def _fail(error: EdgeqError) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code)


def _split_list(values: tuple[str, ...]) -> list[str]:
    """`-t onnx -t tflite` and `-t onnx,tflite` mean the same."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeq")
def main() -> None:
    """Convert PyTorch models to ONNX Runtime, TFLite and Core ML artifacts, each validated against FP32
    PyTorch in its real runtime.

    Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad model or data, 4 conversion failed or refused,
    5 validation could not run, 6 over budget (the bundle is kept as <precision>.rejected).
    """


@main.command()
@click.argument("source", required=False)
@click.option("-t", "--target", "targets", multiple=True, help="onnx, tflite, coreml, all, or a profile .toml (repeatable or comma-separated).")
@click.option("-p", "--precision", "precisions", multiple=True, help="fp32, fp16, int8-weight, int8-dynamic, w8a8, w8a16, int4-weight, int3-weight, int2-weight, int4-dynamic (repeatable or comma-separated; default: the target's default).")
@click.option("--input", "inputs", multiple=True, metavar="NAME:SHAPE[:DTYPE]", help="Declare an input, e.g. pixels:1x3x224x224:float32; batch=1x... marks a dynamic axis.")
@click.option("--task", help="For Hugging Face folders: feature-extraction, sentence-embedding, text-classification, image-classification; text-generation (a CausalLM folder or a .gguf file: the decoder with its KV cache, validated token by token).")
@click.option("--factory", metavar="MODULE:CALLABLE", help="Builds the model a state dict (.pt/.safetensors) belongs to.")
@click.option("--trust-pickle", is_flag=True, help="Allow loading that can run code from the source: pickled models and weights, pickles inside .pt2, Hugging Face auto_map code in the folder (never downloaded).")
@click.option("--data", type=click.Path(path_type=Path), help="Validation data: .npz/.npy, a folder of .npz, .npy, images or .wav files, .txt/.csv/.tsv text for text models, or module:function (or file.py:function) returning samples.")
@click.option("--text-column", help="Column (index or header name) of a .csv/.tsv holding the text.")
@click.option("--preprocess", metavar="KEY=VALUE,...", help="Image preprocessing, e.g. 'resize=256,crop=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw' (keys: resize crop mean std scale layout channels interpolation; default: fit the input's H, W, scale 1/255).")
@click.option("--sample-rate", type=click.IntRange(1), metavar="HZ", help="Sample rate every .wav file must have (edgeq does not resample).")
@click.option("--samples", type=click.IntRange(1), default=32, show_default=True, help="Validation samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sample selection and synthetic inputs.")
@click.option("--budget", help="Drift budget held by every output, e.g. 'cosine>=0.999,sqnr_db>=30', or 'none' (default: the target's).")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("build/edge"), show_default=True, help="Bundles go to OUT/<model>/<target>/<precision>/.")
@click.option("--name", help="Model name used for the bundle folder (default: from the source).")
@click.option("--keep-float", "keep_float", multiple=True, metavar="FQN|re:REGEX", help="Keep these layers float in quantized schemes (repeatable), e.g. 're:.*classifier.*'.")
@click.option("--calibration-samples", type=click.IntRange(0), default=32, show_default=True, help="Calibration samples for quantized schemes, drawn besides --samples and disjoint from them.")
@click.option("--observer", type=click.Choice(["minmax", "percentile", "mse", "entropy"]), default="mse", show_default=True, help="How static activation ranges are chosen from the calibration samples.")
@click.option("--smoothquant", metavar="ALPHA|off", help="SmoothQuant strength for linear layers with quantized activations (default: the scheme's, 0.7 for int8-dynamic and w8a8).")
@click.option("--auto-fallback", is_flag=True, help="Sweep layer sensitivity and keep the most harmful layers at higher precision until the budget holds.")
@click.option("--fallback-max", type=click.FloatRange(0, 1), default=0.1, show_default=True, help="At most this fraction of quantized layers is relaxed by --auto-fallback.")
@click.option("--algo", type=click.Choice(list(ALGORITHM_NAMES)), help="Low-bit schemes: how codes are chosen (default gptq: Hessian-aware rounding on the calibration samples; rtn: round to nearest with MSE clipping; awq: activation-aware input scales folded into the previous LayerNorm or linear where exact, then AWQ's clip search; awq+gptq: those scales, then GPTQ).")
@click.option("--group-size", metavar="N|channel", help="Low-bit schemes: input channels sharing one scale (32, 64, 128; default 32), or 'channel' for one scale per output channel.")
@click.option("--device", type=click.Choice(list(DEVICE_NAMES)), help="Low-bit schemes: where calibration runs (default cpu; cuda: a GPU, the same plan in meaning).")
@click.option("--per-layer", "per_layer", multiple=True, metavar="PATTERN=SCHEME", help="A layer's own scheme in low-bit plans (repeatable; the last match wins): PATTERN is an FQN, a glob or re:REGEX; SCHEME float, int8, int4/int3/int2[:gN|:channel][:rtn|:gptq] or lutN, e.g. 'classifier=float', '*.intermediate.dense=int3:g32'.")
@click.option("--prune", metavar="SPEC", help="Prune before converting, once for every target: structured:RATIO[:l1|l2|activation|taylor][:global] removes that share of channels/filters (the graph shrinks: smaller and faster on every runtime), heads:RATIO attention heads (Hugging Face encoders), unstructured:RATIO[:global][:sparsegpt] zeros weights, N:M[:sparsegpt] (e.g. 2:4) keeps N of every M; zeros are smaller only where stored sparse (Core ML).")
@click.option("--prune-layers", "prune_layers", multiple=True, metavar="PATTERN=RATIO", help="A layer's own --prune ratio (repeatable; the last match wins): PATTERN an FQN, glob or re:REGEX, RATIO in [0, 1), 0 leaves it whole; e.g. 'features.0=0.25', 're:classifier\\..*=0'. A dependency group takes the smallest ratio its layers are given; heads: per attention module; N:M takes only 0; with :global the named layers are pinned and the rest ranked.")
@click.option("--lowrank", metavar="SPEC", help="Factorize linear and 1x1 conv layers by SVD into two smaller ones: energy:0.95 (keep 95% of the squared singular values), rank:0.5 (half the full rank) or params:0.5 (half the layer's parameters); add :activation for activation-aware SVD on the calibration samples.")
@click.option("--lowrank-layers", "lowrank_layers", multiple=True, metavar="PATTERN", help="Layers --lowrank factorizes (repeatable): FQN, glob or re:REGEX (default: every linear and 1x1 conv where it saves parameters).")
@click.option("--recover", metavar="SPEC", help="Recover accuracy after compression on the calibration samples, the original FP32 model as teacher: distill once after --prune/--lowrank, e.g. distill:steps=300,lr=5e-5 (keys: steps lr batch_size temperature feature_weight device checkpoint_dir resume); qat[:...] quantization-aware training per quantized precision on its plan's grid; lora:rank=8[,...] adapters over the quantized base, merged before export.")
@click.option("--layers", is_flag=True, help="Also localize drift per layer (ONNX and TFLite): each layer's output in the runtime against FP32 PyTorch, worst offenders first.")
@click.option("-c", "--config", type=click.Path(path_type=Path), help="edgeq.toml: convert every model x target it declares. Options given beside it override the file for every model.")
@click.option("-v", "--verbose", is_flag=True, help="Also show the toolchains' own log lines and warnings.")
@click.option("--max-context", type=click.IntRange(2), help="--task text-generation: the decoder's KV cache length in tokens (default 256).")
@click.option("--kv-cache", "kv_cache", type=click.Choice(["float", "int8"]), help="--task text-generation: the KV cache's dtype (default float); int8: per-channel scales from the calibration text, onnx only, its own drift reported apart from the weights'.")
@click.option("--source-grid", type=click.Choice(["keep", "requantize"]), help="--task text-generation at 4 bits: keep the 4-bit codes a source already holds (a GGUF Q4_1 linear: exact, the default) or quantize its float weights again.")
@click.option("--outlier-channels", type=int, metavar="N", help="--task text-generation -t tflite at 4 bits: input channels per linear computed in float beside LiteRT's int8-row kernel, the largest on the calibration text, and the few linears whose int8 rows still cost most kept float whole (default 16; 0: neither).")
@click.pass_context
def convert(ctx, source, config, verbose, max_context, source_grid, outlier_channels, **options):
    """Convert SOURCE and validate every artifact in its runtime.

    SOURCE is package.module:callable, a TorchScript file, a torch.export .pt2 program, a Hugging Face
    model folder (with --task), or a state dict (.pt/.safetensors) with --factory.
    """
    if options.get("task") != "text-generation" and options.pop("kv_cache") is not None:
        _fail(UsageError("--kv-cache belongs to --task text-generation"))
    if options.get("task") == "text-generation" or max_context is not None or source_grid is not None or outlier_channels is not None:
        options["source_grid"], options["outlier_channels"] = source_grid, outlier_channels
        sys.exit(_convert_decoder(source, config, verbose, max_context, options))  # edgeq/llm/pipeline.py
    try:
        # Every option and the project file are checked here, before torch or a model loads.
        from edgeq.project import command_line_job, load_project

        if config:
            if source:
                raise UsageError("give either SOURCE or --config, not both")
            jobs = load_project(config, _job_values(ctx, options, only_given=True))
        else:
            if not source:
                raise UsageError("missing SOURCE (or --config edgeq.toml); see edgeq convert --help")
            jobs = [command_line_job({"source": source, **_job_values(ctx, options, only_given=False)})]
    except EdgeqError as error:
        _fail(error)
    from edgeq.interrupt import interrupt_guard
    from edgeq.noise import toolchain_output

    with interrupt_guard(), toolchain_output(verbose):  # Ctrl-C: exit 130, one line, nothing published
        code = _run_jobs(jobs)
    sys.exit(code)


def _convert_decoder(source, config, verbose, max_context, options) -> int:
    """convert --task text-generation: a causal LM with its KV cache per runtime (edgeq/llm/pipeline.py)."""
    from edgeq.noise import toolchain_output

    try:
        if options.get("task") != "text-generation":
            given = next(name for name, value in (("max-context", max_context), ("source-grid", options.get("source_grid")),
                                                  ("outlier-channels", options.get("outlier_channels"))) if value is not None)
            raise UsageError(f"--{given} belongs to --task text-generation")
        if config or not source:
            raise UsageError("--task text-generation takes SOURCE (a CausalLM folder or a .gguf file), not --config")
        from edgeq.llm.pipeline import DEFAULT_MAX_CONTEXT, Options, run

        group = options.get("group_size") or "32"
        if not group.isdigit():
            raise UsageError(f"--group-size {group}: text-generation takes a group size (32, 64, 128)")
        job = Options(source, _split_list(options["targets"]), _split_list(options["precisions"]), options["out"],
                      max_context or DEFAULT_MAX_CONTEXT, options.get("data"), options.get("text_column"),
                      options["samples"], options["calibration_samples"], options.get("algo"), int(group),
                      options.get("budget"), options.get("name"), options["seed"], list(options.get("keep_float") or ()))
        job.source_grid = options.get("source_grid") or "keep"
        job.per_layer = list(options.get("per_layer") or ())
        job.kv_cache = options.get("kv_cache") or "float"
        job.outlier_channels = options.get("outlier_channels")
        with toolchain_output(verbose):
            return run(job, echo=lambda text: click.echo(f"  {text}", err=True))
    except EdgeqError as error:
        _fail(error)


# convert's options that are job keys (edgeq.job_keys), and how a command-line value becomes a key's value.
_LIST_OPTIONS = {"targets", "precisions"}  # -t onnx -t tflite or -t onnx,tflite
_REPEATED_OPTIONS = {"inputs", "keep_float", "per_layer", "prune_layers", "lowrank_layers"}
_PATH_OPTIONS = {"data", "out"}


def _job_values(ctx: click.Context, options: dict, *, only_given: bool) -> dict:
    """convert's options as job values. With `only_given` (beside --config) just those typed on the command
    line, made absolute, since the project file's paths are relative to the file, not to here."""
    values = {}
    for key, value in options.items():
        given = ctx.get_parameter_source(key) == click.core.ParameterSource.COMMANDLINE
        if only_given and not given:
            continue
        if key in _LIST_OPTIONS:
            value = _split_list(value)
            if not value and not given:
                continue
        elif key in _REPEATED_OPTIONS:
            value = list(value)
            if not value and not given:
                continue
        elif key in _PATH_OPTIONS and value is not None:
            value = str(Path(value).absolute()) if only_given else str(value)
        if value is not None:
            values[key] = value
    return values


def _run_jobs(jobs) -> int:
    from edgeq.pipeline import exit_code, write_run_reports
    from edgeq.project import run_job
    from edgeq.report import print_outcomes

    outcomes = []
    try:
        for job in jobs:
            job_outcomes = run_job(job, on_step=lambda text: click.echo(f"  {text}", err=True))
            print_outcomes(job_outcomes)
            for path in write_run_reports(job_outcomes):
                click.echo(f"  report: {path}")
            outcomes.extend(job_outcomes)
    except EdgeqError as error:
        _fail(error)
    return exit_code(outcomes)


@main.command()
@click.option("-c", "--config", type=click.Path(path_type=Path), required=True, help="sweep.toml: [sweep] targets and schemes, [[models]], optional [defaults] and [recipes.NAME] (edgeq.toml job keys).")
@click.option("--address", metavar="ADDR", help="Run on an existing Ray cluster (e.g. ray://head:10001, or head:6379 from a node of it); default: a local Ray instance.")
@click.option("--workers", type=click.IntRange(1), help="Tasks at once on the local Ray instance (its CPUs; default: this machine's CPUs).")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="The sweep's folder (default: [sweep] out, else build/sweep beside sweep.toml): OUT/<model>/<recipe>/<target>/<scheme>/ per task, sweep.json/.md/.html.")
@click.option("--no-ray", is_flag=True, help="Run the tasks one by one in this process, even with Ray installed.")
@click.option("--retries", type=click.IntRange(0), default=1, show_default=True, help="Times Ray reruns a task whose worker died.")
@click.option("--force", is_flag=True, help="Run every task, also those whose bundle exists with the same inputs.")
@click.option("-v", "--verbose", is_flag=True, help="Also show the toolchains' own log lines and warnings.")
def sweep(config, address, workers, out, no_ray, retries, force, verbose):
    """Run models x targets x schemes x recipes as independent tasks, on Ray when installed.

    Each task converts one model for one target, scheme and recipe into its own bundle folder. A rerun skips
    tasks whose bundle exists with the same inputs (content-addressed). Results: one table, sweep.json,
    sweep.md and sweep.html in OUT. Without Ray (pip install 'edgeq[ray]') or with --no-ray the same tasks run
    one by one.
    """
    import os

    from edgeq.interrupt import interrupt_guard

    try:
        from edgeq.sweep import SweepOptions, load_sweep, run_sweep

        if workers is not None and address is not None:
            raise UsageError("--workers sizes the local Ray instance; with --address the cluster's resources decide: drop one")
        loaded = load_sweep(config, out)
        options = SweepOptions(address=address, workers=workers or os.cpu_count() or 1, use_ray=not no_ray,
                               retries=retries, force=force, verbose=verbose)
        with interrupt_guard():
            result = run_sweep(loaded, options, echo=lambda text: click.echo(text, err=True))
    except EdgeqError as error:
        _fail(error)
    for path in result.reports:
        click.echo(f"  report: {path}")
    sys.exit(result.exit_code)


@main.command()
@click.argument("source")
@click.option("-t", "--target", "targets", multiple=True, required=True, help="onnx, tflite, coreml, a profile id or .toml (repeatable or comma-separated).")
@click.option("--budget", required=True, help="Drift every candidate is held to, in simulation and in the runtime, e.g. 'cosine>=0.99'.")
@click.option("--objective", default="size", show_default=True, help="size: the smallest artifact holding the budget; latency: the fastest (timed in the runtime here, interleaved; where it cannot run here, e.g. Core ML off macOS, estimated by the profile's cost model); balanced: the least size x latency.")
@click.option("-p", "--precision", help="The low-bit scheme the per-layer plan lives in (default per target: int4-weight, else int4-dynamic, else lut4-weight; latency/balanced prefer int4-dynamic).")
@click.option("--choices", multiple=True, metavar="VALUE,...", help="Per-layer values to choose between (per_layer syntax; default int4:g128,int4:g64,int4:g32,int8,float; palettes: lut4,lut6,int8,float). Each target keeps those it holds.")
@click.option("--uniform", multiple=True, metavar="SCHEME,...|auto|none", help="Uniform schemes converted beside the tuned plan, e.g. int8-dynamic,int4-weight:g32 (default auto: the 8-bit weight schemes the target lists and the plan's scheme at group 32 and 128).")
@click.option("--max-candidates", type=click.IntRange(1), default=4, show_default=True, help="Tuned plans converted and validated per target, at most (the runtime may disagree with the simulation).")
@click.option("--keep-candidates", is_flag=True, help="Keep every candidate's bundle under OUT/<model>/tune-candidates/.")
@click.option("--input", "inputs", multiple=True, metavar="NAME:SHAPE[:DTYPE]", help="Declare an input, as in convert.")
@click.option("--task", help="For Hugging Face folders, as in convert.")
@click.option("--factory", metavar="MODULE:CALLABLE", help="Builds the model a state dict belongs to.")
@click.option("--trust-pickle", is_flag=True, help="As in convert.")
@click.option("--data", type=click.Path(path_type=Path), help="Calibration and validation data, as in convert.")
@click.option("--text-column", help="Column of a .csv/.tsv holding the text.")
@click.option("--preprocess", metavar="KEY=VALUE,...", help="Image preprocessing, as in convert.")
@click.option("--sample-rate", type=click.IntRange(1), metavar="HZ", help="Sample rate of .wav data.")
@click.option("--samples", type=click.IntRange(1), default=32, show_default=True, help="Validation samples (every candidate is validated on them).")
@click.option("--calibration-samples", type=click.IntRange(0), default=32, show_default=True, help="Calibration samples: codes fitted on three quarters, each layer's drift measured on the rest (at most 16).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sample selection and synthetic inputs.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("build/edge"), show_default=True, help="The chosen bundles go to OUT/<model>/<target>/<precision>/; tune.json/.md/.html and tuned.toml to OUT/<model>/.")
@click.option("--name", help="Model name used for the bundle folder (default: from the source).")
@click.option("--keep-float", "keep_float", multiple=True, metavar="FQN|re:REGEX", help="Layers every candidate keeps float.")
@click.option("--algo", type=click.Choice(list(ALGORITHM_NAMES)), help="Low-bit codes: gptq (default), rtn, awq, awq+gptq.")
@click.option("--group-size", metavar="N|channel", help="Group size of choices written without one (int4) and of the plan's scheme (default 32).")
@click.option("--device", type=click.Choice(list(DEVICE_NAMES)), help="Where low-bit calibration runs (default cpu).")
@click.option("-v", "--verbose", is_flag=True, help="Also show the toolchains' own log lines and warnings.")
@click.pass_context
def tune(ctx, source, budget, objective, precision, choices, uniform, max_candidates, keep_candidates, verbose, **options):
    """Search per target the smallest (or fastest) artifact that holds --budget, layer by layer.

    Measures each layer's drift alone at each choice on held-out calibration samples, promotes the most
    sensitive layers per byte until the budget holds in simulation, then converts and validates that plan in
    the runtime (promoting more if the runtime disagrees), beside the uniform schemes. The chosen point is
    bundled like any convert; OUT/<model>/tuned.toml reproduces it (edgeq convert -c tuned.toml), and
    tune.md/tune.html show the front, the candidates and each layer's choice. Exit 6 when no candidate
    holds the budget.
    """
    try:
        from edgeq.project import command_line_job
        from edgeq.tune.options import TuneOptions, check_budget_for_tuning, parse_choices, parse_objective, parse_uniform

        tune_options = TuneOptions(
            budget=check_budget_for_tuning(budget), objective=parse_objective(objective), precision=_tune_precision(precision),
            choices=parse_choices(_split_list(choices)), uniform=parse_uniform(_split_list(uniform)),
            max_candidates=max_candidates, keep_candidates=keep_candidates,
        )
        values = {"source": source, "budget": budget, **_job_values(ctx, options, only_given=False)}
        job = command_line_job(values)
    except EdgeqError as error:
        _fail(error)
    from edgeq.interrupt import interrupt_guard
    from edgeq.noise import toolchain_output
    from edgeq.tune.command import run_tune

    with interrupt_guard(), toolchain_output(verbose):
        try:
            code = run_tune(job, tune_options, values, click.echo, lambda text: click.echo(f"  {text}", err=True))
        except EdgeqError as error:
            _fail(error)
    sys.exit(code)


def _tune_precision(text: str | None) -> str | None:
    from edgeq.scheme import LOW_BIT

    if text is None:
        return None
    names = [p.value for p in LOW_BIT]
    if text not in names:
        raise UsageError(f"--precision {text!r}: tune plans per layer inside a low-bit scheme: {', '.join(names)}")
    return text


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--budget", help="Hold this budget instead of the one recorded in the manifest.")
@click.option("--layers", is_flag=True, help="Also localize drift per layer (ONNX, TFLite): needs torch and the model the bundle was converted from; adds `layers` to the bundle's report.json.")
@click.option("--model", "model_source", metavar="SOURCE", help="With --layers: the model (default: the source recorded in the manifest).")
@click.option("--factory", metavar="MODULE:CALLABLE", help="With --layers and a state dict: builds the model.")
@click.option("--trust-pickle", is_flag=True, help="With --layers: allow unpickling a whole-model .pt file.")
@click.option("-v", "--verbose", is_flag=True, help="Also show the toolchains' own log lines and warnings.")
def validate(bundle, budget, layers, model_source, factory, trust_pickle, verbose):
    """Re-run a bundle's artifact on its golden inputs and compare with its FP32 outputs.

    Needs only numpy and the artifact's runtime; refuses an artifact whose checksum does not match.
    With --layers, also compares every layer's output in the runtime with FP32 PyTorch, worst first.
    """
    from edgeq.noise import toolchain_output
    from edgeq.report import print_bundle_check
    from edgeq.validate.bundle_check import check_bundle

    try:
        if budget is not None:
            from edgeq.preflight import check_budget

            budget = check_budget(budget, "--budget")
        from edgeq.interrupt import interrupt_guard

        with interrupt_guard(unchanged=str(bundle)), toolchain_output(verbose):
            result = check_bundle(bundle, budget)
            print_bundle_check(result)
            if layers:
                _validate_layers(Path(bundle), result.manifest, model_source, factory=factory, trust_pickle=trust_pickle)
    except EdgeqError as error:
        _fail(error)
    sys.exit(result.exit_code)


def _validate_layers(bundle: Path, manifest: dict, source: str | None, **load_options) -> None:
    import json

    from edgeq.layers import localize_bundle
    from edgeq.report import print_layers
    from edgeq.bundle import write_atomic

    stages = [s for s in (manifest.get("compression") or {}).get("stages") or [] if isinstance(s, dict) and "parameters" in s]
    if stages:  # the source is the model before pruning / low-rank / distillation: its layers are not the artifact's
        specs = ", ".join(f"{s.get('stage')} {s.get('spec')}" for s in stages)
        raise UsageError(
            f"--layers: {bundle} was converted from a compressed model ({specs}), which edgeq does not keep; "
            "per-layer drift needs it: run edgeq convert again with --layers"
        )
    layer_report = localize_bundle(bundle, manifest, source, **load_options)
    print_layers(layer_report, str(bundle), storage=manifest.get("artifact", {}).get("storage"))
    report_path = bundle / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    write_atomic(report_path, json.dumps({**report, "layers": layer_report.to_json()}, indent=2) + "\n")
    click.echo(f"  per-layer drift added to {report_path}")


@main.command("bundle")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="The lab archive to write, e.g. lab.zip.")
@click.option("--allow-rejected", is_flag=True, help="Also pack bundles kept as <precision>.rejected (over budget or failed).")
def pack_bundles(bundles, out, allow_rejected):
    """Pack bundle folders into one archive for a device lab.

    Each bundle must match its manifest's checksums. The archive holds each artifact, manifest, golden
    inputs/outputs and plan files, and an index with every file's sha256. It is written atomically. On
    the device: python -m edgeq.device lab.zip --junit result.xml --json result.json
    """
    from edgeq.device.archive import pack
    from edgeq.preflight import check_output_file

    from edgeq.interrupt import interrupt_guard

    try:
        check_output_file(out, "--out", "lab.zip")
        with interrupt_guard(unchanged=str(out)):
            index = pack(list(bundles), out, allow_rejected=allow_rejected)
    except EdgeqError as error:
        _fail(error)
    for entry in index["bundles"]:
        click.echo(f"  {entry['name']}: {entry['runtime']}, {len(entry['files'])} files, verdict {entry['verdict']}")
    click.echo(f"wrote {out} ({len(index['bundles'])} bundle(s))")


@main.group(invoke_without_command=True)
@click.pass_context
def targets(ctx):
    """List the target profiles (`edgeq targets show ID` prints one)."""
    if ctx.invoked_subcommand:
        return
    from edgeq.targets import list_profiles

    for profile in list_profiles():
        precisions = ", ".join(p.value for p in profile.precisions)
        click.echo(f"{profile.id:<10} {profile.runtime.value:<7} [{precisions}] default {profile.default_precision.value}  {profile.hardware}")


@targets.command("show")
@click.argument("target_id")
def show_target(target_id):
    """Print one target profile (its TOML, with the reasons beside each value)."""
    from edgeq.targets import load_profile

    try:
        profile = load_profile(target_id)
    except EdgeqError as error:
        _fail(error)
    click.echo(profile.path.read_text())


@main.command("report")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--html", "html_out", type=click.Path(path_type=Path), help="Write the HTML page here.")
@click.option("--markdown", "markdown_out", type=click.Path(path_type=Path), help="Write the Markdown summary here.")
def report(paths, html_out, markdown_out):
    """Render report.html and report.md from existing bundles.

    Each PATH is a bundle folder, a report.json, or a folder holding bundles (OUT/<model>/, OUT/). Without
    --html or --markdown both go into the first PATH (its folder, for a file).
    """
    from edgeq.bundle import write_atomic
    from edgeq.report_html import load_reports, render_html
    from edgeq.report_markdown import render_markdown

    if html_out is None and markdown_out is None:
        folder = paths[0] if paths[0].is_dir() else paths[0].parent
        html_out, markdown_out = folder / "report.html", folder / "report.md"
    try:
        from edgeq.preflight import check_output_file

        for path, flag in ((html_out, "--html"), (markdown_out, "--markdown")):
            if path is not None:
                check_output_file(path, flag, f"report{path.suffix or '.html'}")
        reports = load_reports(paths, relative_to=(html_out or markdown_out).parent)
    except EdgeqError as error:
        _fail(error)
    from edgeq.interrupt import interrupt_guard

    with interrupt_guard(unchanged=" and ".join(str(p) for p in (html_out, markdown_out) if p is not None)):
        for path, render in ((html_out, render_html), (markdown_out, render_markdown)):
            if path is not None:
                click.echo(f"wrote {write_atomic(path, render(reports))}")


if __name__ == "__main__":
    main()
