"""The training loop every recovery stage shares (distill, qat, lora): AdamW on the given parameters, the student
matching the frozen FP32 teacher (losses.py) on batches of the calibration samples, checkpointed and resumable.

Determinism: everything a step does follows from the step number and the seed. Batch t is drawn from epoch
t // batches_per_epoch's permutation (numpy's generator seeded with [seed, epoch]); the learning rate is a function
of t (linear warm-up over the first 5% of the steps, then cosine decay to 0); the student runs in eval mode (no
dropout, BatchNorm statistics frozen: a few hundred steps on a small calibration set would otherwise re-estimate
them from tiny batches). So a run resumed from the checkpoint of step k continues exactly as the uninterrupted run
would have, bit for bit on the same machine and thread count.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.recover.losses import FeatureTaps, feature_loss, feature_points, output_kind, response_loss

PROGRESS_ENV = "EDGEQ_PROGRESS"
MAX_GRAD_NORM = 1.0  # clipping: one bad batch of a tiny calibration set must not throw the student off
EVAL_BATCHES = 8  # the loss reported before and after is the mean over epoch 0's first batches
DEFAULT_CHECKPOINT_EVERY = 50


@dataclass
class TrainingLog:
    """What a run did: the loss on the fixed evaluation batches before and after, the loss per logged step."""

    steps: int
    start_step: int  # > 0 when resumed from a checkpoint
    loss_before: float
    loss_after: float
    kinds: dict[str, str]  # output name -> loss kind
    features: int  # how many intermediate outputs the feature loss compared (0: none)
    history: list = field(default_factory=list)
    seconds: float = 0.0


def zero_masks(params: dict) -> dict:
    """name -> (p != 0) for the weights holding exact zeros (pruned or sparse: they must stay zero)."""
    masks = {}
    for name, parameter in params.items():
        if parameter.dim() >= 2 and (name.endswith(".weight") or name.endswith(".original")):
            mask = parameter.detach() != 0
            if not bool(mask.all()):
                masks[name] = mask
    return masks


def check_device(device: str) -> str:
    """`device` if torch can train there; a UsageError (exit 2) saying what would work otherwise."""
    import torch

    from edgeq.errors import UsageError

    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise UsageError(f"recover device {device!r}: expected cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"recover device {device}: torch {torch.__version__} sees no CUDA device here (torch.cuda.is_available() is "
            "False: no GPU, or no driver for it); use device=cpu (the default)"
        )
    return device


def progress_wanted() -> bool:
    """A progress bar on stderr when it is a terminal, or when EDGEQ_PROGRESS=1 asks for one anyway."""
    flag = os.environ.get(PROGRESS_ENV, "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    return sys.stderr.isatty()


class Batches:
    """Batches of calibration samples, concatenated along axis 0; only samples whose inputs have equal shapes and
    dtypes share a batch (a text set padded to one length makes full batches; mixed image sizes make several)."""

    def __init__(self, calibration: list[dict], input_names: list[str], batch_size: int, seed: int, labels=None):
        self.calibration, self.input_names, self.seed = calibration, input_names, seed
        self.batch_size = max(1, int(batch_size))
        self.labels = None if labels is None else np.asarray(labels)
        groups: dict[tuple, list[int]] = {}
        for index, sample in enumerate(calibration):
            key = tuple((name, np.asarray(sample[name]).shape, np.asarray(sample[name]).dtype.str) for name in input_names)
            groups.setdefault(key, []).append(index)
        self.groups = list(groups.values())
        self.per_epoch = sum(math.ceil(len(g) / self.batch_size) for g in self.groups)

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for group in self.groups:
            order = [group[i] for i in rng.permutation(len(group))]
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def at(self, step: int) -> list[int]:
        return self.epoch(step // self.per_epoch)[step % self.per_epoch]

    def tensors(self, indices: list[int], device) -> tuple[list, object]:
        """(input tensors in input_names order, label tensor or None) of the samples `indices`."""
        import torch

        inputs = [torch.from_numpy(np.ascontiguousarray(np.concatenate([np.asarray(self.calibration[i][name]) for i in indices])))
                  .to(device) for name in self.input_names]
        labels = None if self.labels is None else torch.from_numpy(self.labels[indices].astype(np.int64)).to(device)
        return inputs, labels


def _outputs(module, inputs) -> list:
    from edgeq.load.wrap import flatten_outputs

    return [tensor for _, tensor in flatten_outputs(module(*inputs))]


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def run_training(
    student, teacher, params: dict, spec, calibration: list[dict], input_names: list[str], output_names: list[str],
    *, labels=None, stage: str, seed: int = 0, lr_multipliers: dict[str, float] | None = None,
    checkpoint_every: int | None = None, on_step: Callable[[int, float], None] | None = None,
    output_kinds: dict[str, str] | None = None, masks: dict | None = None,
) -> TrainingLog:
    """Train `params` (name -> nn.Parameter, all reachable from `student`'s forward) so `student` matches `teacher`.

    Both models are already on the training device; `student` is trained in place. `lr_multipliers` scales the
    learning rate of the named parameters (QAT's scales). `on_step(step, loss)` runs after each step and its
    checkpoint (a KeyboardInterrupt raised there leaves a resumable folder)."""
    import torch

    from edgeq.errors import UsageError
    from edgeq.recover.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from edgeq.threads import limited_threads

    if not calibration:
        raise UsageError(f"recover ({stage}): no calibration samples to distill on; give --calibration-samples > 0")
    if labels is not None and len(labels) != len(calibration):
        raise UsageError(f"recover ({stage}): {len(labels)} labels for {len(calibration)} calibration samples")
    started = time.perf_counter()
    device = next((p.device for p in params.values()), torch.device("cpu"))
    batches = Batches(calibration, input_names, spec.batch_size, seed, labels)
    steps = int(spec.steps)
    multipliers = lr_multipliers or {}
    groups: dict[float, list] = {}
    for name, parameter in params.items():
        groups.setdefault(multipliers.get(name, 1.0), []).append(parameter)
    # no weight decay: the target is the teacher's function, and decay would pull weights (and QAT scales) to zero
    optimizer = torch.optim.AdamW(
        [{"params": ps, "lr": spec.lr * m, "base_lr": spec.lr * m} for m, ps in groups.items()], lr=spec.lr, weight_decay=0.0
    )
    identity = {"stage": stage, "spec": getattr(spec, "text", ""), "steps": steps, "seed": seed, "lr": spec.lr,
                "batch_size": batches.batch_size, "samples": len(calibration),
                "params": {name: list(p.shape) for name, p in params.items()}}
    folder = Path(spec.checkpoint_dir) if spec.checkpoint_dir else None
    every = checkpoint_every or DEFAULT_CHECKPOINT_EVERY
    student.eval()
    teacher.eval()
    with limited_threads():
        first, _ = batches.tensors(batches.epoch(0)[0], device)
        with torch.no_grad():
            teacher_first = _outputs(teacher, first)
        kinds = {name: (output_kinds or {}).get(name) or output_kind(name, value) for name, value in zip(output_names, teacher_first)}
        mask_at = input_names.index("attention_mask") if "attention_mask" in input_names else None
        points = feature_points(student, teacher) if spec.feature_weight > 0 else []
        student_taps, teacher_taps = FeatureTaps(student, points), FeatureTaps(teacher, points)

        def loss_of(indices: list[int]) -> tuple[torch.Tensor, int]:
            inputs, label_tensor = batches.tensors(indices, device)
            with torch.no_grad():
                target = _outputs(teacher, inputs)
            got = _outputs(student, inputs)
            mask = inputs[mask_at] if mask_at is not None else None
            total = sum(response_loss(kinds[name], s, t, spec.temperature, mask, label_tensor if kinds[name] == "logits" else None)
                        for name, s, t in zip(output_names, got, target))
            compared = 0
            if points:
                features, compared = feature_loss(student_taps.values, teacher_taps.values, mask)
                if features is not None:
                    total = total + spec.feature_weight * features
            return total, compared

        def evaluate() -> tuple[float, int]:
            with torch.no_grad():
                values = [loss_of(indices) for indices in batches.epoch(0)[:EVAL_BATCHES]]
            return float(np.mean([loss.item() for loss, _ in values])), values[0][1]

        bar = None
        try:
            start, history = 0, []
            loss_before = None
            saved = load_checkpoint(folder) if folder is not None and spec.resume else None
            if saved is not None:
                _check_identity(folder, saved.identity, identity)
                with torch.no_grad():
                    for name, parameter in params.items():
                        parameter.copy_(saved.state[name].to(parameter.device))
                optimizer.load_state_dict(saved.optimizer)
                torch.set_rng_state(saved.rng)
                start, history = saved.step, list(saved.history)
                loss_before = history[0][1] if history and history[0][0] == -1 else None
            if loss_before is None:
                loss_before = evaluate()[0]
                history = [(-1, loss_before)] + history
            bar = _progress(steps, start, stage)
            for step in range(start, steps):
                factor = _lr_factor(step, steps)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                optimizer.zero_grad(set_to_none=True)
                loss, _ = loss_of(batches.at(step))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_GRAD_NORM)
                optimizer.step()
                if masks:
                    with torch.no_grad():
                        for name, mask in masks.items():
                            params[name].mul_(mask)
                value = float(loss.item())
                history.append((step, value))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4g}")
                done = step + 1
                if folder is not None and (done % every == 0 or done == steps):
                    state = {name: p.detach() for name, p in params.items()}
                    save_checkpoint(folder, Checkpoint(done, identity, state, optimizer.state_dict(), torch.get_rng_state(), history))
                if on_step is not None:
                    on_step(done, value)
            loss_after, compared = evaluate()
        finally:
            if bar is not None:
                bar.close()
            student_taps.remove()
            teacher_taps.remove()
    return TrainingLog(steps, start, loss_before, loss_after, kinds, compared, history, time.perf_counter() - started)


def _check_identity(folder: Path, saved: dict, wanted: dict) -> None:
    from edgeq.errors import UsageError

    for key in wanted:
        if saved.get(key) != wanted[key]:
            shown = "the trained parameters" if key == "params" else f"{key} {saved.get(key)!r} (this run: {wanted[key]!r})"
            raise UsageError(f"{folder}: the checkpoint there is of another run ({shown} differ); "
                             "use another checkpoint folder, or resume with the same spec, seed and samples")


def _progress(steps: int, start: int, stage: str):
    if not progress_wanted():
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm comes with transformers and huggingface_hub; without it, no bar
        return None
    return tqdm(total=steps, initial=start, desc=f"recover {stage}", unit="step", file=sys.stderr, dynamic_ncols=True)


def loss_note(stage: str, log: TrainingLog, spec, samples: int) -> str:
    kinds = ", ".join(f"{name}: {kind}" for name, kind in log.kinds.items())
    resumed = f", resumed at step {log.start_step}" if log.start_step else ""
    features = f", feature loss on {log.features} intermediate outputs (weight {spec.feature_weight})" if log.features else ""
    return (f"{stage}: {log.steps} steps of AdamW (lr {spec.lr:g}, batch {spec.batch_size}, T {spec.temperature:g}) on "
            f"{samples} calibration samples{resumed}; losses {kinds}{features}; distillation loss "
            f"{log.loss_before:.4g} -> {log.loss_after:.4g}")
