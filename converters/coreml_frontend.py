"""Corrections to coremltools' torch op converters where they compute something else than the torch op.

Found by validating artifacts against PyTorch (measured with coremltools 9.0):
- `aten.elu(x, alpha, scale, input_scale)`: the converter reads `alpha` only. F.selu reaches Core ML as elu
  with scale 1.0507 under the default decomposition table (a model with any op the frontend lacks), and the
  artifact came out at 26 dB against PyTorch instead of 150. The correction computes
  scale * (max(x, 0) + alpha * (exp(min(x, 0) * input_scale) - 1)), torch's definition, and keeps MIL's `elu`
  where scale and input_scale are 1.

Registered once per process (coremltools' registry is global), before every Core ML conversion.
"""

from __future__ import annotations

_registered = False


def _value(bound, default: float) -> float:
    """A converter input's constant value: a MIL Var's .val, or the literal an exported program passes."""
    value = getattr(bound, "val", bound)
    return default if value is None else float(value)


def register_corrections() -> None:
    global _registered
    if _registered:
        return
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    @register_torch_op(override=True)
    def elu(context, node):  # the registry keys on this function's name
        inputs = _get_inputs(context, node, min_expected=1)
        x = inputs[0]
        alpha, scale, input_scale = (_value(inputs[i], 1.0) if len(inputs) > i else 1.0 for i in (1, 2, 3))
        if input_scale == 1.0:
            out = mb.elu(x=x, alpha=alpha, name=node.name if scale == 1.0 else node.name + "_unscaled")
        else:
            negative = mb.mul(x=mb.minimum(x=x, y=0.0), y=input_scale)
            negative = mb.mul(x=mb.sub(x=mb.exp(x=negative), y=1.0), y=alpha)
            out = mb.add(x=mb.relu(x=x), y=negative, name=node.name if scale == 1.0 else node.name + "_unscaled")
        if scale != 1.0:
            out = mb.mul(x=out, y=scale, name=node.name)
        context.add(out)

    _registered = True
