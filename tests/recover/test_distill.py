"""Distillation (edgeq/recover/distill.py) and the shared loop (train.py): the student gets closer to the teacher,
sparsity survives, labels are used, checkpoints are safetensors + JSON only and a resumed run equals an
uninterrupted one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgeq.compress.spec import RecoverSpec
from edgeq.errors import UsageError
from edgeq.recover.distill import distill
from edgeq.recover.losses import output_kind
from tests.recover.models import noised, relative_error, samples, teacher

FAST = dict(steps=40, lr=3e-3, batch_size=8)


def _same_state(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_distillation_brings_a_noised_student_closer_to_the_teacher():
    reference, calibration, held_out = teacher(), samples(32), samples(16, seed=5)
    student = noised(reference)
    kept_student, kept_teacher = copy.deepcopy(student), copy.deepcopy(reference)
    result = distill(student, reference, RecoverSpec(**FAST, feature_weight=0.5, text="distill"), calibration, ["x"], ["output"])
    before, after = relative_error(student, reference, held_out), relative_error(result.module, reference, held_out)
    assert after < 0.6 * before, (before, after)
    assert _same_state(student, kept_student) and _same_state(reference, kept_teacher)  # inputs untouched
    assert not result.module.training and result.stage == "recover" and result.spec == "distill"
    (note,) = result.notes
    assert "losses output: logits" in note and "feature loss on 3 intermediate outputs" in note, note
    assert set(result.layers) >= {"embed", "blocks.0.0", "head"} and result.layers["head"]["weight_change"] > 0


def test_pruned_weights_stay_zero_and_labels_add_cross_entropy():
    reference, calibration = teacher(), samples(16)
    student = copy.deepcopy(reference)
    with torch.no_grad():  # magnitude-prune half of one layer
        weight = student.inner.blocks[0][0].weight
        weight[weight.abs() < weight.abs().median()] = 0
    zeros = student.inner.blocks[0][0].weight == 0
    labels = np.arange(16) % 6
    result = distill(student, reference, RecoverSpec(steps=10, lr=3e-3, batch_size=8), calibration, ["x"], ["output"], labels=labels)
    assert bool((result.module.inner.blocks[0][0].weight[zeros] == 0).all())
    assert any("cross-entropy on 16 labels" in n for n in result.notes)
    assert any("1 weights holding zeros keep them" in n for n in result.notes)


def test_a_resumed_run_equals_an_uninterrupted_one_and_writes_no_pickles(tmp_path):
    reference, calibration = teacher(), samples(12)
    student = noised(reference)
    spec = dict(steps=9, lr=3e-3, batch_size=4, checkpoint_dir=str(tmp_path / "ckpt"))
    whole = distill(student, reference, RecoverSpec(steps=9, lr=3e-3, batch_size=4), calibration, ["x"], ["output"])

    def interrupt(step, _loss):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(student, reference, RecoverSpec(**spec), calibration, ["x"], ["output"], checkpoint_every=3, on_step=interrupt)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["checkpoint.json", "optimizer-0000006.safetensors", "state-0000006.safetensors"], files
    resumed = distill(student, reference, RecoverSpec(**spec, resume=True), calibration, ["x"], ["output"], checkpoint_every=3)
    assert _same_state(resumed.module, whole.module)
    assert "resumed at step 6" in resumed.notes[0] and resumed.notes[0].split("loss")[-1] == whole.notes[0].split("loss")[-1]
    for path in (tmp_path / "ckpt").iterdir():  # safetensors and JSON only: no pickle protocol header anywhere
        assert path.suffix in (".json", ".safetensors") and path.read_bytes()[:1] != b"\x80", path


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    reference, calibration = teacher(), samples(8)
    folder = str(tmp_path / "ckpt")
    distill(reference, reference, RecoverSpec(steps=2, lr=1e-3, batch_size=4, checkpoint_dir=folder), calibration, ["x"], ["output"])
    with pytest.raises(UsageError, match="the checkpoint there is of another run .*steps 2"):
        distill(reference, reference, RecoverSpec(steps=3, lr=1e-3, batch_size=4, checkpoint_dir=folder, resume=True),
                calibration, ["x"], ["output"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda is not refused here")
def test_cuda_without_a_gpu_is_refused_clearly():
    with pytest.raises(UsageError, match="recover device cuda: torch .* sees no CUDA device.*use device=cpu"):
        distill(teacher(), teacher(), RecoverSpec(steps=1, device="cuda"), samples(2), ["x"], ["output"])


def test_output_kinds_follow_names_then_shapes():
    logits, unit = torch.randn(4, 10), torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert output_kind("logits", torch.randn(4, 3, 7)) == "logits"
    assert output_kind("output", logits) == "logits"
    assert output_kind("output", unit) == "embedding"
    assert output_kind("sentence_embedding", logits) == "embedding"
    assert output_kind("last_hidden_state", torch.randn(2, 5, 8)) == "hidden"
    assert output_kind("output_0", torch.randn(2, 5, 8)) == "hidden"
