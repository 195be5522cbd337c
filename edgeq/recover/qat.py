"""Quantization-aware training on the plan's grid: distillation with every quantized layer fake-quantized exactly
as the plan will lower it, then new codes and scales written back into a copy of the plan.

What trains: each quantized layer's latent weight and its scales (fake_quant.py: straight-through rounding, LSQ
scales initialized from the plan, in log space, at SCALE_LR_MULTIPLIER x the learning rate), and every other float
parameter (biases, norms, float layers). What stays the plan's: dtype, granularity, symmetry, zero points, static
activation scales (fixed at their calibrated values, simulated straight-through during training, as are dynamic
activation ranges, the full-integer plans' tensor points, SmoothQuant factors and bias corrections). k-means
palette layers are not trained: they hold the palette's values, frozen, while the rest adapts around them.

After training, per layer: scale = exp(log scale) rounded up to the precision the plan's scales are held in (the
target's: float16 scales stay float16-exact), codes = the plan's rounding of the latent weight on that scale, and
the module's weight = the plan's dequantized codes (divided by the SmoothQuant factor where there is one). So the
returned module, the PyTorch simulation (edgeq.compress.apply.apply_plan) and the artifact's weight parity all see
the same numbers. Sparsity is kept: weights that were exactly zero stay zero.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from edgeq.compress.stage import StageResult

SCALE_LR_MULTIPLIER = 10.0  # log-scale steps of 10x lr: ~1e-3 relative per step at lr 1e-4


def qat(student, teacher, plan, spec, calibration: list[dict], input_names: list[str], output_names: list[str],
        labels=None, *, seed: int = 0, checkpoint_every: int | None = None, on_step=None,
        output_kinds: dict[str, str] | None = None, scale_dtype: str | None = None):
    """(module, plan, StageResult): `student` trained with fake quantization on `plan`'s grid (a QuantPlan whose
    layers are keyed by the student's user FQNs), the plan's copy with the trained codes and scales, and what was
    done per layer. Neither `student`, `teacher` nor `plan` is changed. `scale_dtype` ("float32", "float16",
    "bfloat16"): the precision new scales are rounded to; default: per layer, the narrowest one that holds all the
    plan's scales of that layer exactly. Other arguments as edgeq.recover.distill.distill."""
    from torch.nn.utils import parametrize

    from edgeq.recover.train import check_device, loss_note, run_training, zero_masks

    device = check_device(spec.device)
    trained = copy.deepcopy(student)
    simulation = QatSimulation(trained, plan)
    trained.to(device)
    reference = teacher if device == "cpu" else copy.deepcopy(teacher).to(device)
    params = {name: p for name, p in trained.named_parameters() if p.is_floating_point() and name not in simulation.frozen}
    for parameter in params.values():
        parameter.requires_grad_(True)
    multipliers = {name: SCALE_LR_MULTIPLIER for name in params if name.endswith(".log_scale")}
    masks = zero_masks(params)
    try:
        log = run_training(trained, reference, params, spec, calibration, input_names, output_names, labels=labels,
                           stage="qat", seed=seed, lr_multipliers=multipliers, checkpoint_every=checkpoint_every,
                           on_step=on_step, output_kinds=output_kinds, masks=masks)
    finally:
        simulation.remove_hooks()
    trained.cpu()
    new_plan = copy.deepcopy(plan)
    result = StageResult(None, "recover", getattr(spec, "text", "") or "qat", seconds=log.seconds)
    for fqn, (module, entry) in simulation.layers.items():
        quantizer = module.parametrizations.weight[0]
        latent = module.parametrizations.weight.original.detach().float().numpy()
        new_scale = _held_scale(quantizer.scale().detach().numpy(), entry.weight.scale, scale_dtype)
        quant = dataclasses.replace(entry.weight, scale=new_scale)
        codes = quant.quantize(latent)
        new_plan.layers[fqn] = dataclasses.replace(new_plan.layers[fqn], weight=quant, weight_codes=codes)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        real = quant.dequantize(codes)
        if entry.smooth is not None:
            real = real / entry.smooth.astype(np.float32)
        module.weight.data = _torch(real.reshape(module.weight.shape))
        result.layers[fqn] = {
            "codes_changed": round(float(np.mean(codes != entry.weight_codes)), 6),
            "scale_change": round(float(np.mean(np.abs(new_scale / entry.weight.scale - 1))), 6),
        }
    result.skipped = dict(simulation.skipped)
    result.module = trained.eval()
    result.notes.append(loss_note("qat", log, spec, len(calibration)))
    result.notes.append(
        f"qat: {len(simulation.layers)} quantized layers trained on the plan's grid (straight-through rounding, LSQ scales "
        f"from the plan); new codes and scales written back, zero points and dtypes kept; static activation scales stay "
        f"as calibrated{'; ' + str(len(masks)) + ' weights with zeros keep them' if masks else ''}"
    )
    new_plan.notes.append(f"weights retrained by QAT ({log.steps} steps of distillation on the plan's grid)")
    return result.module, new_plan, result


class QatSimulation:
    """Puts `plan` on `module` (in place) as trainable fake quantization: parametrized weights for the quantized
    layers, hooks for activations, bias corrections and tensor points, palette layers frozen at their values.
    `layers`: plan FQN -> (module, LayerPlan) of the parametrized layers; `frozen`: parameter names not trained.
    `train_weights` False (LoRA's frozen base): every quantized layer holds its dequantized plan values, frozen."""

    def __init__(self, module, plan, train_weights: bool = True):
        import torch
        from torch.nn.utils import parametrize

        from edgeq.calibration.lowbit_fallback import dequantized
        from edgeq.compress.apply import user_fqn
        from edgeq.recover.fake_quant import WeightFakeQuant, latent_init

        self.layers: dict = {}
        self.skipped: dict[str, str] = {}
        self.frozen: set[str] = set()
        self._handles = []
        by_fqn = {user_fqn(name): (name, child) for name, child in module.named_modules()}
        missing = sorted(set(plan.layers) - set(by_fqn))
        if missing:
            from edgeq.errors import ConversionError

            raise ConversionError(f"qat: the plan names layers the model does not have: {', '.join(missing[:5])}")
        for fqn, entry in plan.layers.items():
            name, child = by_fqn[fqn]
            if entry.palette is not None or (not train_weights and entry.weight_codes is not None):
                real = dequantized(entry, child.weight.shape)
                if entry.smooth is not None:
                    real = real / _torch(entry.smooth)
                with torch.no_grad():
                    child.weight.copy_(real)
                self.frozen.add(f"{name}.weight")
                if train_weights:
                    self.skipped[fqn] = "k-means palette: its entries are not learned by QAT; the layer holds them, frozen"
            elif entry.weight is not None and entry.weight_codes is not None:
                weight = child.weight.detach().cpu().numpy().astype(np.float32)
                domain = weight if entry.smooth is None else weight * entry.smooth.astype(np.float32)
                latent = latent_init(entry.weight, entry.weight_codes, domain.reshape(entry.weight_codes.shape))
                with torch.no_grad():
                    child.weight.data = _torch(latent.reshape(child.weight.shape))
                parametrize.register_parametrization(child, "weight", WeightFakeQuant(entry.weight, entry.smooth))
                self.layers[fqn] = (child, entry)
            self._hook_activations(child, entry)
        self._hook_tensor_points(module, plan, by_fqn)

    def _hook_activations(self, child, entry) -> None:
        import torch

        from edgeq.recover.fake_quant import DynamicFakeQuant, StaticFakeQuant

        smooth = None if entry.smooth is None else _torch(entry.smooth.astype(np.float32))
        quant_in = StaticFakeQuant(entry.activation) if entry.activation is not None else (
            DynamicFakeQuant(entry.dynamic_activation) if entry.dynamic_activation is not None else None)
        if quant_in is not None:
            def before(_module, args):  # the artifact quantizes x / smooth; the parametrized weight is divided by smooth
                x = args[0]
                x = quant_in(x) if smooth is None else quant_in(x / smooth.to(x.device)) * smooth.to(x.device)
                return (x, *args[1:])
            self._handles.append(child.register_forward_pre_hook(before))
        correction = None if entry.bias_correction is None else _torch(entry.bias_correction.astype(np.float32))
        quant_out = StaticFakeQuant(entry.output) if entry.output is not None else None
        if correction is not None or quant_out is not None:
            def after(module, _args, y):
                if correction is not None:
                    channel_axis = 1 if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)) else -1
                    shape = [1] * y.dim()
                    shape[channel_axis] = -1
                    y = y + correction.to(y.device).reshape(shape)
                return quant_out(y) if quant_out is not None else y
            self._handles.append(child.register_forward_hook(after))

    def _hook_tensor_points(self, module, plan, by_fqn) -> None:
        from edgeq.plan import INPUT_PREFIX
        from edgeq.recover.fake_quant import StaticFakeQuant

        for key, quant in plan.tensors.items():
            if key.startswith(INPUT_PREFIX):
                continue
            fake = StaticFakeQuant(quant)
            self._handles.append(by_fqn[key][1].register_forward_hook(lambda _m, _a, y, fake=fake: fake(y)))
        inputs = {key.removeprefix(INPUT_PREFIX): StaticFakeQuant(q) for key, q in plan.tensors.items() if key.startswith(INPUT_PREFIX)}
        if inputs:
            order = list(plan.inputs)

            def quantize_inputs(_module, args):
                return tuple(inputs[n](a) if n in inputs and a.is_floating_point() else a for n, a in zip(order, args))
            self._handles.append(module.register_forward_pre_hook(quantize_inputs))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _held_scale(learned: np.ndarray, planned: np.ndarray, scale_dtype: str | None) -> np.ndarray:
    """`learned` scales rounded up to the precision the plan's scales are held in (or `scale_dtype`)."""
    import torch

    from edgeq.calibration.lowbit.grid import Grid

    dtype = scale_dtype or _narrowest_exact(planned)
    held = Grid(8, scale_dtype=dtype).representable(torch.from_numpy(np.asarray(learned, dtype=np.float32)))
    return held.numpy().astype(np.float32).reshape(planned.shape)


def _narrowest_exact(scales: np.ndarray) -> str:
    import torch

    values = torch.from_numpy(np.asarray(scales, dtype=np.float32))
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        if torch.equal(values.to(dtype).float(), values):
            return name
    return "float32"


def _torch(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
