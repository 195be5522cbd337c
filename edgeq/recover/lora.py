"""LoRA adapters over a frozen quantized base (QLoRA-style), trained by distillation, merged before export.

Each quantized linear layer of the plan (every nn.Linear when there is no plan) keeps its dequantized plan weight
W_q, frozen, and gains y += s * (x A^T) B^T with A [r, in], B [out, r], s = alpha / r (Hu et al. 2021, "LoRA", with
B = 0 at the start so training starts from the quantized model; Dettmers et al. 2023, "QLoRA", for the frozen
quantized base). Only A and B train; activations, bias corrections and tensor points are simulated as QAT does.

Merging: W = W_q + s * B A is a float weight, but an artifact holds codes. So the merged weight is quantized again
on the plan's grid: the plan's scales, zero points, dtype and granularity, new codes (palettes: each weight's
nearest entry of its table). The trade-off, and why QAT is the stronger recovery for low-bit weights: an adapter's
correction smaller than half a grid step rounds away, and a larger one moves whole steps, so the re-quantized model
keeps only part of what the float adapters learned (StageResult.layers gives, per layer, the share of codes the
merge changed). QLoRA itself serves the adapters unmerged beside the 4-bit base; edge runtimes need one weight.
Without a plan, the merge is exact (float). Weights that were exactly zero stay zero.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
from torch import nn

from edgeq.compress.stage import StageResult

ALPHA_PER_RANK = 1.0  # s = alpha / r with alpha = r: the adapter's scale does not change with the rank
# Below this share of codes moved by the merge, the re-quantized model is all but the base, and the notes say so.
# Measured: all-MiniLM-L6-v2 int4 g32 RTN, rank 8, 300 steps at lr 1e-4 (benchmarks/bench_recover.py --lora 8):
# the unmerged loss fell from 0.095 to 0.033, and the merge moved 0.00% of the codes.
KEPT_WARNING = 0.001


class Adapters(nn.Module):
    """LoRA factors for the named nn.Linear layers of a model, attached by forward hooks (the model's structure and
    FQNs stay as they are). `layers`: module name -> nn.Linear."""

    def __init__(self, layers: dict[str, nn.Linear], rank: int, seed: int = 0):
        super().__init__()
        self.rank, self.scaling = rank, ALPHA_PER_RANK
        self.layers = layers
        generator = torch.Generator().manual_seed(seed)
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        for name, linear in layers.items():
            key = _key(name)
            a = torch.empty(rank, linear.in_features)
            bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform(a=sqrt(5)), nn.Linear's (and PEFT's) init of A
            a.uniform_(-bound, bound, generator=generator)
            self.a[key] = nn.Parameter(a)
            self.b[key] = nn.Parameter(torch.zeros(linear.out_features, rank))
        self._handles = []

    def attach(self) -> Adapters:
        for name, linear in self.layers.items():
            self._handles.append(linear.register_forward_hook(self._adder(_key(name))))
        return self

    def _adder(self, key: str):
        def add(_linear, args, y):
            x = args[0]
            return y + (x @ self.a[key].t()) @ self.b[key].t() * self.scaling
        return add

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def delta(self, name: str) -> torch.Tensor:
        key = _key(name)
        return (self.b[key] @ self.a[key]).detach() * self.scaling

    def merge(self) -> None:
        """W += s B A into each layer, hooks removed: the model then computes what it computed with the hooks."""
        self.detach_hooks()
        with torch.no_grad():
            for name, linear in self.layers.items():
                linear.weight.add_(self.delta(name).to(linear.weight.dtype))


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


def lora(student, teacher, plan, spec, calibration: list[dict], input_names: list[str], output_names: list[str],
         labels=None, *, seed: int = 0, checkpoint_every: int | None = None, on_step=None,
         output_kinds: dict[str, str] | None = None):
    """(module, plan, StageResult): adapters of rank spec.lora_rank over `plan`'s frozen quantized base, trained to
    match `teacher`, merged and re-quantized on the plan's grid (see the module docstring). `plan` None: adapters
    over every float nn.Linear, merged exactly. Nothing given is changed. Other arguments as distill's."""
    from edgeq.compress.apply import user_fqn
    from edgeq.errors import UsageError
    from edgeq.recover.qat import QatSimulation
    from edgeq.recover.train import check_device, loss_note, run_training

    rank = int(spec.lora_rank)
    if rank < 1:
        raise UsageError("recover lora needs a rank of 1 or more, e.g. lora:rank=8")
    device = check_device(spec.device)
    trained = copy.deepcopy(student)
    for parameter in trained.parameters():
        parameter.requires_grad_(False)
    simulation = QatSimulation(trained, plan, train_weights=False) if plan is not None else None
    wanted = {fqn for fqn, entry in plan.layers.items() if entry.weight_codes is not None} if plan is not None else None
    layers = {name: child for name, child in trained.named_modules()
              if isinstance(child, nn.Linear) and (wanted is None or user_fqn(name) in wanted) and min(child.weight.shape) > rank}
    result = StageResult(None, "recover", getattr(spec, "text", "") or f"lora:rank={rank}")
    for name, child in trained.named_modules():
        fqn = user_fqn(name)
        if isinstance(child, nn.Linear) and name not in layers and (wanted is None or fqn in wanted):
            result.skipped[fqn] = f"rank {rank} is not below the layer's {min(child.weight.shape)} features: no adapter"
    if not layers:
        raise UsageError(f"recover lora:rank={rank}: no linear layer to put adapters on (quantized linear layers wider than the rank)")
    before = {name: child.weight.detach().clone() for name, child in layers.items()}  # the quantized base
    adapters = Adapters(layers, rank, seed).attach()
    trained.to(device)
    adapters.to(device)
    reference = teacher if device == "cpu" else copy.deepcopy(teacher).to(device)
    params = {f"lora.{name}": p for name, p in adapters.named_parameters()}
    try:
        log = run_training(trained, reference, params, spec, calibration, input_names, output_names, labels=labels,
                           stage="lora", seed=seed, checkpoint_every=checkpoint_every, on_step=on_step, output_kinds=output_kinds)
    finally:
        adapters.detach_hooks()
        if simulation is not None:
            simulation.remove_hooks()
    trained.cpu()
    adapters.cpu()
    result.seconds = log.seconds
    new_plan = copy.deepcopy(plan) if plan is not None else None
    masks = {name: base != 0 for name, base in before.items() if not bool((base != 0).all())}
    for name, linear in layers.items():
        fqn = user_fqn(name)
        merged = before[name] + adapters.delta(name) * masks.get(name, 1)
        if new_plan is None:
            linear.weight.data = merged.contiguous()
            result.layers[fqn] = {"rank": rank, "delta": round(float(adapters.delta(name).norm() / before[name].norm()), 6)}
            continue
        entry = plan.layers[fqn]
        merged_np = merged.numpy().astype(np.float32)
        domain = merged_np if entry.smooth is None else merged_np * entry.smooth.astype(np.float32)
        codes = requantize(entry, domain)
        new_entry = dataclasses.replace(entry, weight_codes=codes)
        new_plan.layers[fqn] = new_entry
        from edgeq.calibration.lowbit_fallback import dequantized

        real = dequantized(new_entry, linear.weight.shape)
        if entry.smooth is not None:
            real = real / torch.from_numpy(entry.smooth.astype(np.float32))
        linear.weight.data = real.contiguous()
        result.layers[fqn] = {"rank": rank, "codes_changed": round(float(np.mean(codes != entry.weight_codes)), 6)}
    result.module = trained.eval()
    result.notes.append(loss_note("lora", log, spec, len(calibration)).replace("distillation loss", "distillation loss (adapters unmerged)"))
    if new_plan is not None:
        changed = float(np.mean([layer["codes_changed"] for layer in result.layers.values()]))
        result.notes.append(
            f"lora: rank-{rank} adapters on {len(layers)} layers merged and re-quantized on the plan's grid (its scales and "
            f"zero points kept); {100 * changed:.2f}% of their codes changed; corrections under half a step round away"
        )
        if changed < KEPT_WARNING:
            result.notes.append(
                f"lora: the merge kept almost nothing of the adapters ({100 * changed:.2f}% of the codes moved): their "
                "corrections are smaller than half a grid step; use qat to recover low-bit weights"
            )
        new_plan.notes.append(f"weights: LoRA rank {rank} merged and re-quantized on the plan's grid ({log.steps} steps)")
    else:
        result.notes.append(f"lora: rank-{rank} adapters on {len(layers)} float layers, merged exactly")
    return result.module, new_plan, result


def requantize(entry, weight: np.ndarray) -> np.ndarray:
    """Codes of `weight` (the layer's quantized domain, its shape) on `entry`'s grid: the plan's affine rounding,
    or the nearest entry of each row's palette table."""
    if entry.palette is None:
        return entry.weight.quantize(weight.reshape(entry.weight_codes.shape))
    rows = entry.weight_codes.shape[0]
    tables = np.repeat(entry.palette, rows // entry.palette.shape[0], axis=0)  # [rows, entries]
    flat = weight.reshape(rows, -1)
    codes = np.abs(flat[:, :, None] - tables[:, None, :]).argmin(axis=2)
    return codes.astype(entry.weight_codes.dtype).reshape(entry.weight_codes.shape)
