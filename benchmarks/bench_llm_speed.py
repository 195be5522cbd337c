"""Speed and memory of text-generation decoders (issue 14): prefill and decode tokens/s, peak RSS at the maximum
context and artifact size, for edgeq's artifacts next to each runtime's own tool (benchmarks/bench_llm_peers.py).

Run:  .venv/bin/python benchmarks/bench_llm_speed.py --artifacts "edgeq onnx fp32=DIR" "edgeq onnx int4=DIR" \
          "ort-genai onnx fp32=DIR" "edgeq tflite fp32=FILE" "litert-torch tflite int4=FILE" "edgeq coreml int4=PKG" ...
      [--context 256] [--rounds 5] [--prompt 128] [--decode 32] [--peers build/bench_llm_peers] [--onnx-loop edgeq]

LABEL is "TOOL RUNTIME PRECISION"; rows are compared with the same TOOL RUNTIME's fp32 row. PATH: an ONNX folder
with genai_config.json (edgeq bundle or ORT GenAI model builder output), a .tflite file (edgeq's prefill/decode
signatures, or litert-torch export_hf's prefill_T/decode), or a .mlpackage (size only: on Linux Core ML runs in
edgeq's MIL reference executor, whose numpy speed says nothing about a device). --peers DIR adds the peer
artifacts bench_llm_peers.py wrote there, and its reasons for the ones it could not build.

How it measures. Every artifact runs in its own worker process (this file with --worker), one thread: ONNX through
onnxruntime-genai's own generate loop (append_tokens, generate_next_token; max_length = the context) for edgeq's
bundles and the builder's alike, TFLite through LiteRT's signature runners. The parent drives the workers round by
round, interleaved (the order reversed every other round), so load from other work lands on all artifacts alike;
round 0 warms up. A round: reset, prefill a PROMPT-token prompt (timed to its first-token logits), DECODE decode
steps (timed), reset, prefill a (context - 1)-token prompt (timed) and one decode step, which fills the cache to
the maximum context. Medians over rounds. Memory, per worker: RSS after imports, peak RSS after loading, and the
process's peak RSS after the rounds (the cache full at the maximum context): ru_maxrss, edgeq/device/memory.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MASKED = np.float32(-1e30)  # an additive mask's hidden position (as validate/runners/tflite_decoder.py)
TOKENS0 = 100  # prompts are token ids 100, 101, ...: speed does not depend on the text


# ---------------------------------------------------------------- engines (run inside a worker process)

class GenaiEngine:
    """onnxruntime-genai's generate loop on an ONNX folder (genai_config.json), one intra-op thread."""

    def __init__(self, folder: Path, context: int):
        import onnxruntime_genai as og

        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": 1, "inter_op_num_threads": 1}}}}))
        self.og, self.model = og, og.Model(config)
        self.params = og.GeneratorParams(self.model)
        self.params.set_search_options(max_length=context, do_sample=False, top_k=1)

    def reset(self) -> None:
        self.generator = self.og.Generator(self.model, self.params)

    def prefill(self, ids: np.ndarray) -> None:
        self.prompt = ids.size
        self.generator.append_tokens(ids.astype(np.int32))  # runs the prompt
        self.generator.generate_next_token()  # picks the first token from the prompt's logits (no model run)

    def decode(self) -> None:
        if not self.generator.is_done():  # at max_length the loop stops (the max-context prompt's last step)
            self.generator.generate_next_token()  # runs the last token, picks the next

    def generated(self, count: int) -> list[int]:
        return [int(t) for t in self.generator.get_sequence(0)[self.prompt:self.prompt + count]]


class StepEngine:
    """edgeq's StepRunners (numpy carries the cache): edgeq's .tflite decoders, and with --onnx-loop edgeq its .onnx."""

    def __init__(self, runner):
        self.runner = runner

    def reset(self) -> None:
        self.runner.reset()

    def prefill(self, ids: np.ndarray) -> None:
        self.tokens = [int(self.runner.prefill(ids)[-1].argmax())]

    def decode(self) -> None:
        self.tokens.append(int(self.runner.decode(self.tokens[-1]).argmax()))

    def generated(self, count: int) -> list[int]:
        return self.tokens[:count]


class LiteRTLMEngine:
    """A .tflite from litert-torch's export_hf (LiteRT-LM's layout): "prefill_T" (no logits) and "decode", an additive
    `mask` [1, 1, T, S] and the cache as inputs and outputs (edgeq's layout, less the prefill logits). As LiteRT-LM
    runs it: all prompt tokens but the last through prefill in chunks of T (the last chunk padded: its extra rows
    are overwritten by later steps), the last one through decode, whose logits give the first token."""

    def __init__(self, path: Path, context: int):
        from edgeq.validate.runners.litert import load_interpreter_class

        interpreter_class, _ = load_interpreter_class()
        self.interpreter = interpreter_class(model_path=str(path), num_threads=1)
        signatures = self.interpreter.get_signature_list()
        prefills = [name for name in signatures if name.startswith("prefill")]
        if "decode" not in signatures or len(prefills) != 1:
            raise SystemExit(f"{path}: signatures {sorted(signatures)}; expected one prefill_T and decode")
        from edgeq.validate.runners.tflite_kv_carry import open_carry

        self._prefill, self._decode = prefills[0], "decode"
        details = self.interpreter.get_signature_runner("decode").get_input_details()
        self.cache_names = sorted(n for n in details if n.startswith("kv_cache_"))
        self.length = int(self.interpreter.get_signature_runner(self._prefill).get_input_details()["tokens"]["shape"][1])
        extra = sorted(set(details) - set(self.cache_names) - {"tokens", "input_pos", "mask"})
        if extra:
            raise SystemExit(f"{path}: decode takes {extra} besides tokens, input_pos, mask and the cache")
        self.context = context
        # The cache kept in the interpreter's tensors, as edgeq's own runner does: the same per-token cost on both sides.
        self._carry = open_carry(self.interpreter, [self._prefill, self._decode], self.cache_names)

    def reset(self) -> None:
        self.position = 0
        self._carry.reset()

    def _run(self, signature: str, ids: np.ndarray, length: int) -> dict:
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :ids.size] = ids
        positions = np.arange(self.position, self.position + length, dtype=np.int32)
        visible = np.minimum(positions, self.position + ids.size - 1)  # as edgeq's runner: padded rows see no further
        mask = np.where(np.arange(self.context)[None, :] <= visible[:, None], np.float32(0), MASKED)
        feeds = {"tokens": tokens, "input_pos": positions, "mask": mask[None, None].astype(np.float32)}
        fetch = ("logits",) if signature == self._decode else ()
        result = self._carry.run(signature, feeds, self.position, length, fetch)
        self.position += ids.size
        return result

    def prefill(self, ids: np.ndarray) -> None:
        start = 0
        while ids.size - 1 - start > 0:
            count = min(self.length, ids.size - 1 - start)
            self._run(self._prefill, ids[start:start + count], self.length)
            start += count
        self.tokens = [int(np.asarray(self._run(self._decode, ids[-1:], 1)["logits"]).reshape(-1).argmax())]

    def decode(self) -> None:
        logits = self._run(self._decode, np.array([self.tokens[-1]]), 1)["logits"]
        self.tokens.append(int(np.asarray(logits).reshape(-1).argmax()))

    def generated(self, count: int) -> list[int]:
        return self.tokens[:count]


def open_engine(path: Path, context: int, onnx_loop: str):
    if path.is_dir() and (path / "genai_config.json").exists():
        if onnx_loop == "edgeq":
            from edgeq.llm.onnx_decoder import open_runner

            return StepEngine(open_runner(path / "model.onnx", context, threads=1))
        return GenaiEngine(path, context)
    if path.suffix == ".tflite":
        from edgeq.validate.runners.litert import load_interpreter_class

        probe = load_interpreter_class()[0](model_path=str(path), num_threads=1)
        if {"prefill", "decode"} <= set(probe.get_signature_list()):  # edgeq's layout
            from edgeq.llm.tflite_decoder import open_runner

            del probe
            return StepEngine(open_runner(path, context, threads=1))
        del probe
        return LiteRTLMEngine(path, context)
    raise SystemExit(f"{path}: not an ONNX folder with genai_config.json nor a .tflite")


def worker(path: Path, context: int, prompt: int, decode: int, onnx_loop: str) -> None:
    """Serve rounds on stdin/stdout (one JSON line each) for the parent; see the module docstring."""
    from edgeq.device.memory import MemoryWatch, peak_rss_bytes

    reply = lambda data: (sys.stdout.write(json.dumps(data) + "\n"), sys.stdout.flush())  # noqa: E731
    if path.suffix == ".tflite":  # the runtime's own import, before the RSS baseline
        import ai_edge_litert.interpreter  # noqa: F401
    else:
        import onnxruntime  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    with MemoryWatch() as watch:
        engine = open_engine(path, context, onnx_loop)
    reply({"rss_imports": watch.use.rss_before_bytes, "peak_loaded": peak_rss_bytes()})
    short = np.arange(TOKENS0, TOKENS0 + prompt, dtype=np.int64)
    full = np.arange(TOKENS0, TOKENS0 + context - 1, dtype=np.int64)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        engine.reset()
        start = time.perf_counter()
        engine.prefill(short)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode):
            engine.decode()
        decode_s = time.perf_counter() - start
        tokens = engine.generated(decode)  # the greedy continuation's first `decode` tokens
        engine.reset()
        start = time.perf_counter()
        engine.prefill(full)
        full_s = time.perf_counter() - start
        engine.decode()  # the cache now holds `context` positions
        reply({"prefill_s": prefill_s, "decode_s": decode_s, "full_s": full_s, "peak": peak_rss_bytes(),
               "tokens": tokens})


# ---------------------------------------------------------------- the parent

def artifact_size(path: Path) -> int:
    if path.is_dir():
        if (path / "genai_config.json").exists():  # the graph and its external data, not the tokenizer
            return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx"))
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def measure(artifacts: dict[str, Path], args) -> dict[str, dict]:
    """Start a worker per timed artifact, run the interleaved rounds, return per label the medians and memory."""
    workers = {}
    for label, path in artifacts.items():
        command = [sys.executable, __file__, "--worker", str(path), "--context", str(args.context), "--prompt",
                   str(args.prompt), "--decode", str(args.decode), "--onnx-loop", args.onnx_loop]
        workers[label] = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                          stderr=subprocess.DEVNULL, cwd=ROOT)
    results = {}
    for label, proc in workers.items():  # they load at once (not timed); each reports its RSS when loaded
        line = proc.stdout.readline()
        if not line:
            results[label] = {"error": f"worker exited with {proc.wait()} (run it alone with --worker to see why)"}
            continue
        results[label] = {**json.loads(line), "rounds": []}
    labels = [label for label in workers if "error" not in results[label]]
    for r in range(args.rounds + 1):  # round 0 warms up
        for label in labels if r % 2 else labels[::-1]:
            proc = workers[label]
            if "error" in results[label]:
                continue
            proc.stdin.write("round\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:  # the worker died mid-run (e.g. out of memory): its row says so, the others go on
                results[label] = {"error": f"worker exited with {proc.wait()} in round {r}"}
            elif r:
                results[label]["rounds"].append(json.loads(line))
    for label, proc in workers.items():
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait()
        rounds = results[label].get("rounds") if "error" not in results[label] else None
        if rounds:
            median = lambda key: statistics.median(d[key] for d in rounds)  # noqa: E731
            results[label]["tokens"] = rounds[0]["tokens"]
            results[label].update(prefill_tps=args.prompt / median("prefill_s"), decode_tps=args.decode / median("decode_s"),
                                  full_tps=(args.context - 1) / median("full_s"), peak_full=max(d["peak"] for d in rounds))
    return results


def base_label(label: str, labels) -> str | None:
    group = label.rsplit(" ", 1)[0]
    for other in labels:
        if other.rsplit(" ", 1) == [group, "fp32"]:
            return other
    return None


def leading_agreement(tokens: list[int], reference: list[int]) -> int:
    count = 0
    while count < min(len(tokens), len(reference)) and tokens[count] == reference[count]:
        count += 1
    return count


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.platform()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", nargs="*", default=[], metavar="LABEL=PATH")
    parser.add_argument("--peers", type=Path, help="add the artifacts bench_llm_peers.py wrote in this folder")
    parser.add_argument("--context", type=int, default=256, help="the artifacts' max context")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens of the short prefill")
    parser.add_argument("--decode", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--onnx-loop", choices=("genai", "edgeq"), default="genai",
                        help="ONNX bundles through onnxruntime-genai's loop, or edgeq's numpy runner (edgeq bundles only)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.context, args.prompt, args.decode, args.onnx_loop)
    artifacts, reasons = {}, {}
    for item in args.artifacts:
        label, _, path = item.partition("=")
        if not path or len(label.split()) < 3:
            raise SystemExit(f"--artifacts {item!r}: expected 'TOOL RUNTIME PRECISION=PATH'")
        artifacts[label.strip()] = Path(path)
    if args.peers:
        manifest = json.loads((args.peers / "peers.json").read_text())
        artifacts.update({label: Path(path) for label, path in manifest["artifacts"].items()})
        reasons.update(manifest["not_built"])
    missing = [f"{label}={path}" for label, path in artifacts.items() if not path.exists()]
    if missing:
        raise SystemExit("no such artifact: " + ", ".join(missing))
    timed = {label: path for label, path in artifacts.items() if path.suffix != ".mlpackage"}
    load_start = os.getloadavg()
    start = time.time()
    results = measure(timed, args)
    load_end = os.getloadavg()
    print(f"\nSmolLM2-135M-Instruct decoders, max context {args.context}, one thread, {args.rounds} interleaved rounds "
          f"(medians; ONNX through {'onnxruntime-genai' if args.onnx_loop == 'genai' else 'edgeq'}'s loop)")
    print(f"prefill: a {args.prompt}-token prompt and a {args.context - 1}-token one, to the first token's logits; "
          f"decode: {args.decode} steps after the {args.prompt}-token prompt; peak RSS: the worker process after filling "
          f"the cache to {args.context} positions (RSS after imports and after loading beside it)")
    reference = next((label for label in results if label.endswith(" fp32") and "tokens" in results[label]), None)
    print(f"greedy: how many of the {args.decode} greedy tokens after the prompt equal {reference or 'an fp32 row'}'s "
          f"before the first difference (a check that each loop drives its artifact right)")
    header = (f"{'artifact':<28} {'size MB':>8} {f'prefill{args.prompt}':>10} {f'prefill{args.context - 1}':>10} "
              f"{'decode':>8} {'x fp32':>7} {'RSS imp.':>8} {'RSS load':>8} {f'peak@{args.context}':>8} {'greedy':>6}")
    print(header + "\n" + " " * 38 + "tok/s      tok/s    tok/s" + " " * 10 + "MB       MB       MB")
    for label, path in artifacts.items():
        size = artifact_size(path) / 1e6
        if path.suffix == ".mlpackage":
            print(f"{label:<28} {size:8.1f}  not timed: Core ML runs on Linux only in edgeq's MIL reference executor (numpy)")
            continue
        r = results[label]
        if "error" in r:
            print(f"{label:<28} {size:8.1f}  {r['error']}")
            continue
        base = base_label(label, results)
        ratio = f"{r['decode_tps'] / results[base]['decode_tps']:6.2f}x" if base and "decode_tps" in results[base] else "      -"
        print(f"{label:<28} {size:8.1f} {r['prefill_tps']:10.1f} {r['full_tps']:10.1f} {r['decode_tps']:8.1f} {ratio} "
              f"{r['rss_imports'] / 1e6:8.0f} {r['peak_loaded'] / 1e6:8.0f} {r['peak_full'] / 1e6:8.0f} "
              f"{leading_agreement(r['tokens'], results[reference]['tokens']) if reference else '-':>6}")
    for label, reason in reasons.items():
        print(f"{label:<28} not built: {reason}")
    print(f"\nmachine: {machine()}; load average (1, 5, 15 min) at start {', '.join(f'{v:.2f}' for v in load_start)}, "
          f"at end {', '.join(f'{v:.2f}' for v in load_end)}; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
