"""Knowledge distillation: fine-tune a compressed (pruned, factorized, noised) student to match its FP32 teacher.

Needs only unlabeled inputs: the calibration samples, run through both models; the teacher's outputs are the
targets (losses.py picks KL at a temperature for logits, cosine + relative MSE for embeddings, relative MSE for
hidden states). Labels, when given (one class index per calibration sample), add cross-entropy on the logits.
`spec.feature_weight` > 0 adds the relative MSE of intermediate outputs both models share with equal shapes
(a transformer's layer outputs). Every float parameter of the student is trained (AdamW, no weight decay); the
loop, its determinism and its checkpoints are train.py's.
"""

from __future__ import annotations

import copy

from edgeq.compress.stage import StageResult


def distill(student, teacher, spec, calibration: list[dict], input_names: list[str], output_names: list[str],
            labels=None, *, seed: int = 0, checkpoint_every: int | None = None, on_step=None,
            output_kinds: dict[str, str] | None = None) -> StageResult:
    """A distilled copy of `student` (eval mode, on the CPU); neither model is changed.

    `spec`: a RecoverSpec (steps, lr, batch_size, temperature, feature_weight, device, checkpoint_dir, resume,
    text). `calibration`: samples, input name -> array with a leading batch axis. `labels`: None, or one integer
    class per sample. `checkpoint_every`: steps between checkpoints in spec.checkpoint_dir (default 50; the last
    step is always saved). `on_step(step, loss)` after every step. `output_kinds`: output name -> "logits" |
    "embedding" | "hidden", where the guess from names and shapes (losses.output_kind) would be wrong."""
    from edgeq.recover.train import check_device, loss_note, run_training, zero_masks

    device = check_device(spec.device)
    trained = copy.deepcopy(student).to(device)
    reference = teacher if device == "cpu" else copy.deepcopy(teacher).to(device)  # the caller's teacher stays put
    params = {name: p for name, p in trained.named_parameters() if p.is_floating_point()}
    before = {name: p.detach().clone() for name, p in params.items()}
    for parameter in params.values():
        parameter.requires_grad_(True)
    masks = zero_masks(params)
    log = run_training(trained, reference, params, spec, calibration, input_names, output_names, labels=labels,
                       stage="distill", seed=seed, checkpoint_every=checkpoint_every, on_step=on_step,
                       output_kinds=output_kinds, masks=masks)
    trained = trained.cpu().eval()
    result = StageResult(trained, "recover", getattr(spec, "text", "") or "distill", seconds=log.seconds)
    result.layers = weight_changes(trained, before)
    result.notes.append(loss_note("distill", log, spec, len(calibration)))
    if masks:
        result.notes.append(f"distill: {len(masks)} weights holding zeros keep them (sparsity is not undone)")
    if labels is not None:
        result.notes.append(f"distill: cross-entropy on {len(labels)} labels added to the logits' KL")
    return result


def weight_changes(module, before: dict) -> dict[str, dict]:
    """Per layer (user FQN) holding a trained `weight`: its relative L2 change, ||W' - W|| / ||W||."""
    from edgeq.compress.apply import user_fqn

    layers = {}
    for name, parameter in module.named_parameters():
        if not name.endswith(".weight") or name not in before:
            continue
        old = before[name].to(parameter.device)
        change = float((parameter.detach() - old).norm() / old.norm().clamp_min(1e-12))
        layers[user_fqn(name.removesuffix(".weight"))] = {"weight_change": round(change, 6)}
    return layers
