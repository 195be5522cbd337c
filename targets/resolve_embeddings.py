"""Embedding tables in low-bit plans: blockwise 4-bit codes along the embedding dim where the target's gather
kernels hold them, else int8 per row, else float with the reason in the plan.

Why it matters: an encoder's word-embedding table is often most of its weights (all-MiniLM-L6-v2: 30522 x 384,
over half), so a low-bit artifact whose table stays float is ~0.6x FP32, not ~0.15x.

The form (calibration/lowbit/to_plan.py's, as for linear layers): a table [V rows, D] is a weight [N, K] with N = V
vocabulary entries and K = D, quantized per group of `group_size` contiguous columns of a row: codes [V, D],
scales [V, D / group] (PerGroup(axis=1)). A gather then reads whole rows with their own scales, so every runtime
dequantizes only the rows it gathers (ONNX GatherBlockQuantized, TFLite EMBEDDING_LOOKUP's blockwise path, Core ML
gather over constexpr_blockwise_shift_scale).

How the codes are decided: round to nearest with MSE-searched clipping (calibration/lowbit/rtn.py) on the target's
grid (its group sizes, symmetry and low-bit scale precision). GPTQ and AWQ do not apply: a lookup multiplies
nothing, so there is no Hessian to spread the rounding error over and no input channel to rescale.

Why 4 bits in int3 and int2 schemes too: the runtimes' gather kernels hold 4-bit codes (TFLite's blockwise
EMBEDDING_LOOKUP is INT4 only; Core ML has no int3/int2 data; ONNX Runtime's GatherBlockQuantized has no 3-bit
type), so 3-bit codes would be stored in 4 bits anyway: the same size for more error. Only ONNX Runtime packs
2-bit gathers, and a lookup's error goes unattenuated into every token of every input.

Small tables (under 1% of the model's weights: positions, token types) take int8 per row: 4 bits would save little
there, and their rows are added to every token (SMALL_TABLE_SHARE, measured). Not 4-bit either: palette schemes (lut*-weight, made for the Neural Engine, which does not take per-block scales) and
per-channel schemes (a row's single block must be a power of two >= 16 columns for GatherBlockQuantized) give
int8 per row (the form 8-bit schemes use), as does a target without 4-bit weights or group sizes; a table whose
dim is not a multiple of the group stays float, as a linear layer would.
"""

from __future__ import annotations

from torch import nn

from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.to_plan import code_dtype
from edgeq.plan import LayerPlan, OpKind, QDtype, QuantPlan
from edgeq.scheme import Scheme
from edgeq.targets.profile import Granularity, TargetProfile
from edgeq.targets.resolve import matches

EMBEDDING_BITS = 4  # see the module docstring: what every runtime's gather kernel holds
# A table holding less than this share of the model's weights takes int8 per row. Such tables (positions, token
# types) save little at 4 bits, and their rows are added to every token: measured on all-MiniLM-L6-v2 (64 STS-B
# dev sentences, everything else float), 4-bit tables cost 0.0013 cosine for token types (2 rows, 0.003% of the
# weights), 0.0004 for positions (512 rows, 0.9%) and 0.0012 for the words (30522 rows, 52%); int8 per row 0.00001.
SMALL_TABLE_SHARE = 0.01


def embedding_grid(profile: TargetProfile, scheme: Scheme) -> Grid | str:
    """The 4-bit blockwise grid embedding tables take under `scheme` on `profile`, or why they take none."""
    caps = profile.quantization
    dtype = code_dtype(EMBEDDING_BITS, scheme.symmetric).value
    if scheme.palette:
        return "palette schemes target the Neural Engine, which takes no per-block scales"
    if scheme.group_size is None:
        return "per-channel scheme: 4-bit tables go per group along D (ONNX Runtime's gather takes no 4-bit block of one row)"
    if dtype not in caps.weight_dtypes:
        return f"target {profile.id} holds no {dtype} weights"
    if Granularity.PER_GROUP not in caps.weight_granularity or scheme.group_size not in caps.group_sizes:
        return f"target {profile.id} runs no blocks of {scheme.group_size}"
    return Grid(EMBEDDING_BITS, scheme.group_size, scheme.symmetric, caps.lowbit_scale_dtype or caps.scale_dtype)


def plan_embeddings(
    module: nn.Module, plan: QuantPlan, profile: TargetProfile, scheme: Scheme, layers: list,
    keep_float: list[str] = (), skip: set[str] | frozenset = frozenset(), small_tables_int8: bool = True,
) -> None:
    """Quantize the executed nn.Embedding layers among `layers` ((FQN, module) pairs) into `plan`, in place, and
    note what each table became. Tables kept float by --keep-float, or listed in `skip` (decided elsewhere, e.g.
    by a per-layer override), are left as the plan has them. `small_tables_int8` False: small tables take 4 bits
    too (a per-layer entry that asks for them explicitly)."""
    tables = [(fqn, layer) for fqn, layer in layers
              if isinstance(layer, nn.Embedding) and not matches(fqn, list(keep_float)) and fqn not in skip]
    if not tables:
        return
    caps = profile.quantization
    if "embedding" not in caps.ops:
        for fqn, layer in tables:
            plan.layers[fqn] = LayerPlan(fqn, OpKind.EMBEDDING, reason=f"target {profile.id} does not quantize embedding layers")
        return
    grid = embedding_grid(profile, scheme)
    int8 = "int8" in caps.weight_dtypes and Granularity.PER_CHANNEL in caps.weight_granularity
    total = sum(p.numel() for p in module.parameters())
    outcomes: dict[str, list[str]] = {}
    for fqn, layer in tables:
        rows, dim = layer.weight.shape
        if small_tables_int8 and int8 and isinstance(grid, Grid) and layer.weight.numel() < SMALL_TABLE_SHARE * total:
            plan.layers[fqn] = int8_table(fqn, layer, caps.scale_dtype)
            outcomes.setdefault(f"int8 per row (under {SMALL_TABLE_SHARE:.0%} of the model's weights: 4 bits would "
                                "save little, and its rows reach every token)", []).append(fqn)
        elif isinstance(grid, Grid) and dim % grid.group_size:
            reason = f"{dim} embedding columns are not a multiple of the group size {grid.group_size}"
            plan.layers[fqn] = LayerPlan(fqn, OpKind.EMBEDDING, reason=reason)
            outcomes.setdefault(f"float ({reason})", []).append(fqn)
        elif isinstance(grid, Grid):
            plan.layers[fqn] = blockwise_table(fqn, layer, grid)
            outcomes.setdefault(f"{grid.bits}-bit per group of {grid.group_size} along the embedding dim "
                                f"({grid.scale_dtype} scales)", []).append(fqn)
        elif int8:
            plan.layers[fqn] = int8_table(fqn, layer, caps.scale_dtype)
            outcomes.setdefault(f"int8 per row ({grid})", []).append(fqn)
        else:
            reason = f"{grid}, and no int8 per-channel weights"
            plan.layers[fqn] = LayerPlan(fqn, OpKind.EMBEDDING, reason=reason)
            outcomes.setdefault(f"float ({reason})", []).append(fqn)
    how = ("; 4-bit codes by round-to-nearest with MSE clipping (a lookup has no Hessian: GPTQ does not apply)"
           if isinstance(grid, Grid) else "")
    plan.notes.append("embedding tables: " + "; ".join(f"{', '.join(fqns)}: {form}" for form, fqns in outcomes.items()) + how)


def blockwise_table(fqn: str, embedding: nn.Embedding, grid: Grid) -> LayerPlan:
    """A table's plan entry on `grid`: codes [V, D], scales [V, D / group] (rows are the vocabulary)."""
    from edgeq.calibration.lowbit.rtn import rtn
    from edgeq.calibration.lowbit.to_plan import layer_plan

    return layer_plan(fqn, OpKind.EMBEDDING, rtn(embedding.weight.detach(), grid, "mse"))


def int8_table(fqn: str, embedding: nn.Embedding, scale_dtype: str) -> LayerPlan:
    """int8 per row, symmetric: what 8-bit schemes plan for tables (TFLite's EMBEDDING_LOOKUP needs zero point 0)."""
    from edgeq.calibration.weights import quantize_weight_per_channel

    quant, codes = quantize_weight_per_channel(embedding.weight, QDtype.INT8, axis=0, scale_dtype=scale_dtype)
    return LayerPlan(fqn, OpKind.EMBEDDING, quant, codes)
