"""LoRA over a quantized base (edgeq/recover/lora.py): merged equals unmerged in float, training lowers the loss
with the adapters, and the merged model is re-quantized on the plan's grid (module == plan's dequantized values)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from edgeq.calibration.lowbit_fallback import dequantized
from edgeq.compress.apply import user_fqn
from edgeq.compress.spec import RecoverSpec
from edgeq.recover.lora import Adapters, lora
from tests.recover.models import outputs, relative_error, rtn_plan, samples, simulated, teacher


def test_merged_adapters_compute_what_the_unmerged_ones_do():
    model, data = teacher(), samples(8)
    layers = {name: child for name, child in model.named_modules() if isinstance(child, torch.nn.Linear)}
    adapters = Adapters(layers, rank=3, seed=1)
    with torch.no_grad():
        for b in adapters.b.values():
            b.normal_(std=0.1)  # B = 0 at the start would make both sides trivially equal
    plain = outputs(model, data)
    adapters.attach()
    unmerged = outputs(model, data)
    adapters.merge()
    merged = outputs(model, data)
    assert (unmerged - plain).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert not adapters._handles


def test_lora_without_a_plan_merges_exactly_and_brings_the_student_closer():
    from tests.recover.models import noised

    reference, calibration, held_out = teacher(), samples(32), samples(16, seed=5)
    student = noised(reference, amount=0.2)
    kept = copy.deepcopy(student)
    module, plan, result = lora(student, reference, None, RecoverSpec(steps=40, lr=3e-3, batch_size=8, lora_rank=4),
                                calibration, ["x"], ["output"])
    assert plan is None and "merged exactly" in result.notes[1]
    assert relative_error(module, reference, held_out) < relative_error(student, reference, held_out)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), kept.state_dict().values()))


def test_lora_over_a_4bit_base_is_requantized_on_the_plan_grid():
    reference, calibration = teacher(), samples(16)
    plan = rtn_plan(reference, bits=4, group_size=16)
    module, new_plan, result = lora(reference, reference, plan, RecoverSpec(steps=20, lr=3e-3, batch_size=8, lora_rank=4),
                                    calibration, ["x"], ["output"])
    note = result.notes[0]
    before, after = (float(x) for x in note.split("loss (adapters unmerged) ")[1].split(" -> "))
    assert after < before
    for fqn, entry in new_plan.layers.items():
        if entry.weight is None:
            continue
        old = plan.layers[fqn]
        assert np.array_equal(entry.weight.scale, old.weight.scale) and np.array_equal(entry.weight.zero_point, old.weight.zero_point)
        assert entry.weight_codes.min() >= entry.weight.dtype.qmin and entry.weight_codes.max() <= entry.weight.dtype.qmax
        assert result.layers[fqn]["rank"] == 4
    for name, child in module.named_modules():
        entry = new_plan.layers.get(user_fqn(name))
        if entry is not None and entry.weight_codes is not None:
            assert torch.equal(child.weight.detach(), dequantized(entry, child.weight.shape))
    assert "re-quantized on the plan's grid" in result.notes[1]
    assert relative_error(simulated(module, new_plan), reference, calibration) <= relative_error(simulated(reference, plan), reference, calibration) * 1.05
