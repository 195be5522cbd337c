"""Generation metrics between two decoders (issue 14), numpy only so device bundles can run them.

Both decoders are StepRunners (edgeq/llm/steps.py): a reference (FP32 PyTorch, or any runner taken as
truth) and a candidate (an exported decoder in its runtime). Three views, each answering a different
question about a compressed decoder:

- teacher-forced: every sequence prefilled whole into both; the candidate's top-1 next token against the
  reference's at every position (token_agreement), and the perplexity of each on the sequence's own next
  tokens (ppl_delta = candidate - reference). Errors cannot compound here: each position sees true tokens.
- greedy: the reference decodes `steps` tokens greedily from each prompt; the candidate is fed the same
  tokens, so its logits are compared step by step along one path (drift: cosine, max abs per step) and the
  first step whose top-1 differs is where its own greedy decode would leave the reference's (the two decodes
  are identical up to there). This is where compounding shows: drift grows with the step.
- continuation: optionally the candidate's own greedy tokens, for the side-by-side in reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(axis=-1) / np.maximum(den, 1e-30)


@dataclass
class TeacherForced:
    """Next-token figures over `tokens` predicted positions (a sequence of n tokens predicts n - 1)."""

    tokens: int
    token_agreement: float      # fraction of positions where both runners' top-1 is the same token
    ppl_reference: float
    ppl_candidate: float
    ppl_delta: float            # candidate - reference (positive: the candidate is less sure of the text)
    logit_cosine_min: float     # worst position's cosine between the two logit rows
    logit_cosine_mean: float


@dataclass
class GreedyPrompt:
    """One prompt's greedy decode: `matched` of `steps` tokens equal before the first divergence."""

    prompt_tokens: int
    steps: int
    matched: int                       # == steps when the candidate never leaves the reference's path
    reference_tokens: list[int]
    step_cosine: list[float]           # per decode step, along the reference's path
    step_max_abs: list[float]
    candidate_tokens: list[int] | None = None   # the candidate's own greedy decode (continuations=True)


@dataclass
class Greedy:
    prompts: list[GreedyPrompt] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        """Matched tokens over all decoded tokens: 1.0 when every prompt's decode is identical."""
        total = sum(p.steps for p in self.prompts)
        return sum(p.matched for p in self.prompts) / total if total else 1.0

    @property
    def full_matches(self) -> int:
        return sum(p.matched == p.steps for p in self.prompts)

    def drift_by_step(self) -> list[dict]:
        """Mean and worst cosine, worst max abs, at each decode step over the prompts (compounding)."""
        steps = max((p.steps for p in self.prompts), default=0)
        rows = []
        for s in range(steps):
            cos = [p.step_cosine[s] for p in self.prompts if s < len(p.step_cosine)]
            mx = [p.step_max_abs[s] for p in self.prompts if s < len(p.step_max_abs)]
            rows.append({"step": s, "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)),
                         "max_abs": float(np.max(mx))})
        return rows

    def summary(self) -> dict:
        cos = [c for p in self.prompts for c in p.step_cosine]
        return {"prompts": len(self.prompts), "greedy_agreement": self.agreement,
                "full_matches": self.full_matches,
                "tokens_to_divergence": [p.matched for p in self.prompts],
                "step_cosine_min": float(min(cos)) if cos else 1.0,
                "step_max_abs": float(max((m for p in self.prompts for m in p.step_max_abs), default=0.0))}


def teacher_forced(reference, candidate, sequences) -> TeacherForced:
    """Prefill each sequence (int64 [n], n >= 2, n <= both max_context) into both runners and compare."""
    agree = 0
    total = 0
    nll_ref = 0.0
    nll_cand = 0.0
    cosines = []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        if seq.size < 2:
            continue
        ref = _prefill(reference, seq)[:-1]
        cand = _prefill(candidate, seq)[:-1]
        targets = seq[1:]
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        total += targets.size
        rows = np.arange(targets.size)
        nll_ref -= float(_log_softmax(ref)[rows, targets].sum())
        nll_cand -= float(_log_softmax(cand)[rows, targets].sum())
        cosines.append(_cosine(ref, cand))
    if not total:
        raise ValueError("teacher_forced needs at least one sequence of two or more tokens")
    ppl_ref = float(np.exp(nll_ref / total))
    ppl_cand = float(np.exp(nll_cand / total))
    cos = np.concatenate(cosines)
    return TeacherForced(total, agree / total, ppl_ref, ppl_cand, ppl_cand - ppl_ref,
                         float(cos.min()), float(cos.mean()))


def greedy(reference, candidate, prompts, steps: int, *, continuations: bool = False) -> Greedy:
    """Greedy-decode `steps` tokens from each prompt with the reference; drive the candidate along them.

    A prompt plus its steps must fit both runners' max_context: steps are cut to what fits.
    """
    result = Greedy()
    for prompt in prompts:
        prompt = np.asarray(prompt, dtype=np.int64)
        room = min(reference.max_context, candidate.max_context) - prompt.size
        n = max(0, min(steps, room))
        ref_logits, ref_tokens = _greedy_path(reference, prompt, n)
        cand_logits = _forced_path(candidate, prompt, ref_tokens)
        top = cand_logits.argmax(-1)
        mismatch = np.nonzero(top != np.asarray(ref_tokens))[0]
        matched = int(mismatch[0]) if mismatch.size else n
        entry = GreedyPrompt(prompt.size, n, matched, [int(t) for t in ref_tokens],
                             [float(c) for c in _cosine(ref_logits, cand_logits)] if n else [],
                             [float(m) for m in np.abs(ref_logits - cand_logits).max(-1)] if n else [])
        if continuations:
            entry.candidate_tokens = (entry.reference_tokens if matched == n
                                      else [int(t) for t in _greedy_path(candidate, prompt, n)[1]])
        result.prompts.append(entry)
    return result


def _prefill(runner, ids: np.ndarray) -> np.ndarray:
    runner.reset()
    return np.asarray(runner.prefill(ids), dtype=np.float32)


def _greedy_path(runner, prompt: np.ndarray, n: int) -> tuple[np.ndarray, list[int]]:
    """(logits [n, vocab] that chose each token, the n tokens) of a greedy decode after `prompt`."""
    logits = _prefill(runner, prompt)[-1]
    rows, tokens = [], []
    for i in range(n):
        rows.append(logits)
        tokens.append(int(logits.argmax()))
        if i + 1 < n:
            logits = np.asarray(runner.decode(tokens[-1]), dtype=np.float32)
    return (np.stack(rows) if rows else np.zeros((0, 0), np.float32)), tokens


def _forced_path(runner, prompt: np.ndarray, tokens: list[int]) -> np.ndarray:
    """The logits [len(tokens), vocab] the runner gives at each step when fed `tokens` after `prompt`."""
    logits = _prefill(runner, prompt)[-1]
    rows = []
    for i, token in enumerate(tokens):
        rows.append(logits)
        if i + 1 < len(tokens):
            logits = np.asarray(runner.decode(token), dtype=np.float32)
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


@dataclass
class GenerationReport:
    """Both views for one candidate, as the manifest and report record them."""

    reference: str
    candidate: str
    teacher_forced: TeacherForced
    greedy: Greedy

    def metrics(self) -> dict[str, float]:
        """The flat figures budgets are held against (token_agreement, ppl_delta, greedy_agreement, ...)."""
        tf = self.teacher_forced
        g = self.greedy.summary()
        return {"token_agreement": tf.token_agreement, "ppl_reference": tf.ppl_reference,
                "ppl_candidate": tf.ppl_candidate, "ppl_delta": tf.ppl_delta,
                "logit_cosine_min": tf.logit_cosine_min, "greedy_agreement": g["greedy_agreement"],
                "step_cosine_min": g["step_cosine_min"]}

    def to_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "metrics": self.metrics(),
                "teacher_forced": asdict(self.teacher_forced), "greedy": self.greedy.summary(),
                "drift_by_step": self.greedy.drift_by_step(),
                "prompts": [asdict(p) for p in self.greedy.prompts]}


def compare(reference, candidate, sequences, prompts, steps: int, *, continuations: bool = True) -> GenerationReport:
    """Teacher-forced figures over `sequences` and greedy figures over `prompts` (`steps` tokens each)."""
    return GenerationReport(reference.name, candidate.name, teacher_forced(reference, candidate, sequences),
                            greedy(reference, candidate, prompts, steps, continuations=continuations))
