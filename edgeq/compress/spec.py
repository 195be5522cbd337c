"""What the user asked of each compression stage: `--prune`, `--lowrank` (+ `--lowrank-layers`) and `--recover`,
the same spellings in edgeq.toml. Parsed torch-free, so a typo fails in milliseconds with exit 2.

    --prune structured:0.5            remove half of the channels/filters of each prunable layer (L2 norm)
    --prune structured:0.5:taylor     ... ranked by importance l1 | l2 | activation | taylor (:global: one ranking
                                      across the model instead of the same share of every group)
    --prune heads:0.33                remove a third of the attention heads (Hugging Face encoders)
    --prune unstructured:0.5          zero half of each layer's weights by magnitude (:global: one threshold
                                      for all layers; :sparsegpt: one-shot Hessian-based, on calibration data)
    --prune 2:4                       N:M semi-structured: keep 2 of every 4 weights along the input (:sparsegpt)
    --prune-layers PATTERN=RATIO      a layer's own ratio (repeatable; edgeq.toml: a [prune_layers] table): FQN, glob
                                      or re:REGEX = a ratio in [0, 1), 0 leaves it whole; the last matching entry wins
    --lowrank energy:0.95             SVD, keep the smallest rank retaining 95% of the squared singular values
    --lowrank rank:0.5                rank = half the full rank;  params:0.5: the two factors hold half the
                                      layer's parameters;  :activation: activation-aware (on calibration data)
    --lowrank-layers PATTERN          FQN, glob or re:REGEX (repeatable); default every linear / 1x1 conv where it saves
    --recover distill                 distill the FP32 model into the compressed one on the calibration samples
    --recover distill:steps=300,lr=5e-5   keys: steps lr batch_size temperature feature_weight device
                                      checkpoint_dir resume
    --recover qat                     quantization-aware training on each quantized plan's grid (qat:steps=300)
    --recover lora:rank=8             LoRA adapters over the frozen quantized base, merged before export

Every dataclass validates itself (`__post_init__`), so stages may also build one directly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from edgeq.errors import UsageError
from edgeq.layer_overrides import pattern_matches

PRUNE_KINDS = ("channels", "heads", "unstructured", "nm")
IMPORTANCES = ("l1", "l2", "activation", "taylor")
SCOPES = ("layer", "global")
PRUNE_METHODS = ("magnitude", "sparsegpt")
LOWRANK_MODES = ("energy", "rank", "params")
RECOVER_DEVICES = ("cpu", "cuda")

PRUNE_FORMS = "structured:0.5, structured:0.5:taylor[:global], heads:0.33, unstructured:0.5[:global][:sparsegpt], 2:4[:sparsegpt]"
LOWRANK_FORMS = "energy:0.95, rank:0.5, params:0.5, rank:0.5:activation"
RECOVER_FORMS = "distill, distill:steps=300,lr=5e-5, qat, qat:steps=300, lora:rank=8"


@dataclass(frozen=True)
class PruneSpec:
    kind: str  # channels | heads | unstructured | nm
    ratio: float  # share of channels / heads / weights removed, in (0, 1); for N:M, 1 - n/m
    n: int | None = None  # N:M: weights kept in each group of m
    m: int | None = None
    importance: str = "l2"  # how channels and heads are ranked: l1 | l2 | activation | taylor
    scope: str = "layer"  # unstructured: one threshold per layer, or one for the whole model (global)
    method: str = "magnitude"  # unstructured and N:M: magnitude, or SparseGPT's one-shot reconstruction
    text: str = ""  # as the user typed it, for the plan and the report
    # prune_layers: (pattern, ratio) in the order given, each pattern an FQN, glob or re:REGEX; the LAST entry
    # matching a layer sets its ratio (as per_layer: general patterns first, exceptions after); 0 leaves it whole
    layers: tuple[tuple[str, float], ...] = ()
    layers_origin: str = field(default="prune_layers", compare=False)  # the option or file key, for messages

    def __post_init__(self):
        _one_of("kind", self.kind, PRUNE_KINDS)
        _one_of("importance", self.importance, IMPORTANCES)
        _one_of("scope", self.scope, SCOPES)
        _one_of("method", self.method, PRUNE_METHODS)
        if self.kind == "nm":
            if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
                raise UsageError(f"N:M needs whole numbers 0 < N < M (N kept of every M), e.g. 2:4; got {self.n}:{self.m}")
        elif self.n is not None or self.m is not None:
            raise UsageError(f"n and m belong to N:M sparsity (kind 'nm'), not to kind {self.kind!r}")
        if not _fraction(self.ratio, open_high=True):
            raise UsageError(f"ratio must be in (0, 1), e.g. {_example(self.kind)}; got {self.ratio}")
        if self.method == "sparsegpt" and self.kind not in ("unstructured", "nm"):
            raise UsageError(f"sparsegpt prunes weights (unstructured or N:M), not {self.kind}; e.g. 2:4:sparsegpt")
        if self.scope == "global" and self.kind not in ("unstructured", "channels"):
            raise UsageError("one global ranking applies to unstructured or structured pruning, e.g. unstructured:0.5:global")
        if self.importance != "l2" and self.kind not in ("channels", "heads"):
            raise UsageError(f"importance ({self.importance}) ranks channels or heads (structured, heads), not {self.kind}")
        self._check_layers()

    def _check_layers(self) -> None:
        if not isinstance(self.layers, tuple):
            raise UsageError(f"layers must be a tuple of (pattern, ratio) pairs, got {type(self.layers).__name__}")
        for entry in self.layers:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise UsageError(f"{self.layers_origin}: {entry!r} is not a (pattern, ratio) pair")
            pattern, ratio = entry
            where = f"{self.layers_origin} {pattern!r}"
            try:
                check_layer_pattern(pattern)
            except UsageError as exc:
                raise UsageError(f"{self.layers_origin}: {exc}") from exc
            if not (_real(ratio) and 0 <= ratio < 1):
                raise UsageError(f"{where}: {ratio!r} is not a ratio; expected a number in [0, 1), the share this layer "
                                 "loses (0 leaves it whole), e.g. 0.25")
            if self.kind == "nm" and ratio != 0:
                raise UsageError(f"{where}: {ratio!r}: N:M sparsity is fixed by the spec ({self.n}:{self.m} removes "
                                 f"{self.ratio:g} of every layer); a layer can only be left dense (0)")

    def layer_ratio(self, *names: str) -> tuple[float, str | None]:
        return layer_ratio(self, *names)

    @property
    def structured(self) -> bool:
        """The graph shrinks (every runtime gains), as opposed to zeros in weights of unchanged shape."""
        return self.kind in ("channels", "heads")

    @property
    def needs_calibration(self) -> bool:
        return self.importance in ("activation", "taylor") or self.method == "sparsegpt"


def layer_ratio(spec, *names: str) -> tuple[float, str | None]:
    """(ratio, pattern) for a layer known by `names`, most specific first (a layer's FQN, then e.g. the modules
    holding it): the last prune_layers entry matching the first name any entry matches, or the spec's own
    ratio and None when no entry matches. `spec`: a PruneSpec, or anything with its fields (stages take both)."""
    for name in names:
        for pattern, ratio in reversed(getattr(spec, "layers", ())):
            if pattern_matches(pattern, name):
                return float(ratio), pattern
    return spec.ratio, None


@dataclass(frozen=True)
class LowRankSpec:
    mode: str  # energy | rank | params
    value: float  # energy: share of squared singular values kept (0, 1]; rank, params: a fraction in (0, 1)
    activation_aware: bool = False  # whiten by the layer's input covariance on calibration data (SVD-LLM / ASVD)
    layers: tuple[str, ...] = ()  # FQN / glob / re:REGEX; empty: every linear and 1x1 conv where it saves parameters
    text: str = ""

    def __post_init__(self):
        _one_of("mode", self.mode, LOWRANK_MODES)
        if not _fraction(self.value, open_high=self.mode != "energy"):
            interval = "(0, 1]" if self.mode == "energy" else "(0, 1)"
            raise UsageError(f"{self.mode} must be in {interval}, e.g. {'energy:0.95' if self.mode == 'energy' else self.mode + ':0.5'}; got {self.value}")
        if not isinstance(self.layers, tuple):
            raise UsageError(f"layers must be a tuple of patterns, got {type(self.layers).__name__}")
        for pattern in self.layers:
            check_layer_pattern(pattern)

    @property
    def needs_calibration(self) -> bool:
        return self.activation_aware


@dataclass(frozen=True)
class RecoverSpec:
    steps: int = 200  # optimizer steps (each one batch of calibration samples)
    lr: float = 1e-4
    batch_size: int = 8
    temperature: float = 2.0  # softening of teacher and student logits in the response loss
    feature_weight: float = 0.0  # weight of the intermediate-feature loss beside the response loss
    qat: bool = False  # fake quantization on each quantized plan's grid (per target and precision)
    lora_rank: int = 0  # > 0: LoRA adapters of this rank over the frozen quantized base
    device: str = "cpu"
    checkpoint_dir: str | None = None  # safetensors checkpoints here; with resume, continue from the last one
    resume: bool = False
    text: str = ""

    def __post_init__(self):
        _whole("steps", self.steps, 1)
        _whole("batch_size", self.batch_size, 1)
        _whole("lora_rank", self.lora_rank, 0)
        for name, value in (("lr", self.lr), ("temperature", self.temperature)):
            if not (_real(value) and value > 0):
                raise UsageError(f"{name} must be a number above 0, e.g. {name}={RecoverSpec.__dataclass_fields__[name].default}; got {value!r}")
        if not (_real(self.feature_weight) and self.feature_weight >= 0):
            raise UsageError(f"feature_weight must be a number, 0 or more, e.g. feature_weight=0.5; got {self.feature_weight!r}")
        _one_of("device", self.device, RECOVER_DEVICES)
        if self.qat and self.lora_rank:
            raise UsageError("qat and lora are separate recoveries; choose one, e.g. qat or lora:rank=8")
        if self.resume and not self.checkpoint_dir:
            raise UsageError("resume needs checkpoint_dir=FOLDER, where the interrupted run saved its checkpoints")

    @property
    def mode(self) -> str:
        """distill: once per run, before quantization; qat and lora: per quantized target and precision."""
        return "lora" if self.lora_rank else "qat" if self.qat else "distill"


@dataclass(frozen=True)
class CompressionSpecs:
    """What a job asks of compression: each stage's spec, None where not asked. Stages run in this order,
    once per run, before any artifact: prune -> lowrank -> recover (distill); qat and lora recover per
    quantized target and precision instead (edgeq/quantize.py)."""

    prune: PruneSpec | None = None
    lowrank: LowRankSpec | None = None
    recover: RecoverSpec | None = None

    @property
    def asked(self) -> bool:
        return any(spec is not None for spec in (self.prune, self.lowrank, self.recover))

    @property
    def distills(self) -> bool:
        return self.recover is not None and self.recover.mode == "distill"

    @property
    def needs_calibration(self) -> bool:
        """Calibration samples are drawn whenever any stage is asked: distillation, QAT, LoRA, SparseGPT,
        activation/Taylor importance and activation-aware SVD cannot run without them, and the others use them
        (structured pruning re-checks shapes on them)."""
        return self.asked

    def needing_data(self) -> list[str]:
        """The specs that cannot run at all without calibration samples, as the user typed them."""
        specs = [self.prune, self.lowrank]
        needing = [spec.text or type(spec).__name__ for spec in specs if spec is not None and spec.needs_calibration]
        return needing + ([self.recover.text or self.recover.mode] if self.recover is not None else [])


def parse_prune(text: str, label: str = "--prune") -> PruneSpec:
    """`structured:0.5[:IMPORTANCE]`, `heads:RATIO[:IMPORTANCE]`, `unstructured:RATIO[:global][:sparsegpt]`,
    `N:M[:sparsegpt]`."""
    where = f"{label} {text}"
    parts = [p.strip().lower() for p in str(text).strip().split(":")]
    if not parts[0]:
        raise UsageError(f"{label}: empty; expected one of {PRUNE_FORMS}")
    with _labelled(where, PRUNE_FORMS):
        if parts[0].isdigit():  # N:M
            if len(parts) < 2 or not parts[1].isdigit():
                raise UsageError("N:M needs two whole numbers, e.g. 2:4")
            n, m = int(parts[0]), int(parts[1])
            options = _options(parts[2:], {"sparsegpt": ("method", "sparsegpt"), "magnitude": ("method", "magnitude")})
            ratio = 1 - n / m if 0 < n < m else 0.0
            return PruneSpec("nm", ratio, n=n, m=m, text=text.strip(), **options)
        kind = {"structured": "channels", "channels": "channels", "filters": "channels", "heads": "heads",
                "unstructured": "unstructured"}.get(parts[0])
        if kind is None:
            raise UsageError(f"unknown kind {parts[0]!r}; expected structured, heads, unstructured or N:M (2:4)")
        if len(parts) < 2:
            raise UsageError(f"give the share to remove, e.g. {_example(kind)}")
        ratio = _number(parts[1], "ratio", _example(kind))
        if kind == "unstructured":
            choices = {"global": ("scope", "global"), "layer": ("scope", "layer"),
                       "sparsegpt": ("method", "sparsegpt"), "magnitude": ("method", "magnitude")}
        else:
            choices = {name: ("importance", name) for name in IMPORTANCES}
            if kind == "channels":  # one ranking across the model instead of the same share of every group
                choices |= {"global": ("scope", "global"), "layer": ("scope", "layer")}
        return PruneSpec(kind, ratio, text=text.strip(), **_options(parts[2:], choices))


def parse_prune_layers(value, label: str = "--prune-layers") -> tuple[tuple[str, float], ...]:
    """prune_layers as (pattern, ratio) pairs in the order given: a table {PATTERN: RATIO} (edgeq.toml) or a
    list of "PATTERN=RATIO" strings (--prune-layers). Ratios are checked by PruneSpec (with_layers)."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)):
        pairs = []
        for item in value:
            pattern, sep, ratio = str(item).rpartition("=")  # a regex may hold '=', a ratio never does
            if not sep or not pattern.strip():
                raise UsageError(f"{label}: {item!r}: expected PATTERN=RATIO, e.g. 'features.0=0.25' or 're:classifier\\..*=0'")
            try:
                pairs.append((pattern, float(ratio)))
            except ValueError:
                raise UsageError(f"{label} {pattern.strip()!r}: {ratio.strip()!r} is not a number; expected a ratio in [0, 1), e.g. 0.25") from None
    else:
        raise UsageError(f"{label}: expected a table of layer patterns and ratios, e.g. {{ \"features.0\" = 0.25 }}; found {type(value).__name__}")
    entries = []
    for pattern, ratio in pairs:
        if not isinstance(pattern, str) or not pattern.strip():
            raise UsageError(f"{label}: an empty layer pattern; give an FQN, a glob such as '*.attention' or 're:REGEX'")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise UsageError(f"{label} {pattern!r}: {ratio!r} is not a ratio; expected a number in [0, 1), e.g. 0.25")
        entries.append((pattern.strip(), ratio))
    return tuple(entries)


def with_layers(spec: PruneSpec, value, label: str = "--prune-layers") -> PruneSpec:
    """`spec` with prune_layers `value` (a table or PATTERN=RATIO strings), checked; messages name `label`."""
    return dataclasses.replace(spec, layers=parse_prune_layers(value, label), layers_origin=label)


def parse_lowrank(text: str, layers=(), label: str = "--lowrank", layers_label: str = "--lowrank-layers") -> LowRankSpec:
    """`energy:0.95`, `rank:0.5`, `params:0.5`, each optionally `:activation`; `layers` from --lowrank-layers."""
    where = f"{label} {text}"
    parts = [p.strip().lower() for p in str(text).strip().split(":")]
    with _labelled(where, LOWRANK_FORMS):
        if parts[0] not in LOWRANK_MODES:
            raise UsageError(f"unknown mode {parts[0]!r}; expected energy, rank or params")
        if len(parts) < 2:
            raise UsageError(f"give a value, e.g. {'energy:0.95' if parts[0] == 'energy' else parts[0] + ':0.5'}")
        value = _number(parts[1], parts[0], "energy:0.95" if parts[0] == "energy" else f"{parts[0]}:0.5")
        options = _options(parts[2:], {"activation": ("activation_aware", True)})
        spec = LowRankSpec(parts[0], value, text=text.strip(), **options)
    with _labelled(layers_label, "a layer FQN, a glob (*.fc1) or re:REGEX"):
        return LowRankSpec(spec.mode, spec.value, spec.activation_aware, tuple(layers), spec.text)


_RECOVER_KEYS = {  # key -> (field, parse)
    "steps": ("steps", int), "lr": ("lr", float), "batch_size": ("batch_size", int), "batch": ("batch_size", int),
    "temperature": ("temperature", float), "feature_weight": ("feature_weight", float), "device": ("device", str),
    "checkpoint_dir": ("checkpoint_dir", str), "resume": ("resume", "bool"), "rank": ("lora_rank", int),
}


def parse_recover(text: str, label: str = "--recover") -> RecoverSpec:
    """`distill`, `qat` or `lora:rank=R`, each optionally `:key=value,key=value` (steps, lr, batch_size,
    temperature, feature_weight, device, checkpoint_dir, resume)."""
    where = f"{label} {text}"
    head, _, rest = str(text).strip().partition(":")
    mode = head.strip().lower()
    with _labelled(where, RECOVER_FORMS):
        if mode not in ("distill", "qat", "lora"):
            raise UsageError(f"unknown recovery {head.strip()!r}; expected distill, qat or lora")
        values: dict = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in _RECOVER_KEYS or (key == "rank" and mode != "lora"):
                known = ", ".join(k for k in _RECOVER_KEYS if k != "batch" and (k != "rank" or mode == "lora"))
                raise UsageError(f"{item!r}: expected key=value with key one of {known}")
            name, parse = _RECOVER_KEYS[key]
            values[name] = _recover_value(key, raw.strip(), parse)
        if mode == "lora" and not values.get("lora_rank"):
            raise UsageError("lora needs a rank, e.g. lora:rank=8")
        return RecoverSpec(qat=mode == "qat", text=str(text).strip(), **values)


def check_layer_pattern(pattern: str) -> None:
    """An FQN, a glob or `re:REGEX` (as --keep-float and --per-layer take them)."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise UsageError(f"{pattern!r} is not a layer pattern; give an FQN, a glob (*.fc1) or re:REGEX")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise UsageError(f"{pattern!r}: not a valid regular expression: {exc}") from exc


class _labelled:
    """Prefix a UsageError raised inside with where the value came from, and what would work."""

    def __init__(self, where: str, forms: str):
        self.where, self.forms = where, forms

    def __enter__(self):
        return self

    def __exit__(self, kind, error, _traceback):
        if isinstance(error, UsageError) and not str(error).startswith(self.where):
            hint = "" if "e.g." in str(error) else f" (forms: {self.forms})"
            raise UsageError(f"{self.where}: {error}{hint}") from error
        return False


def _options(parts: list[str], choices: dict[str, tuple[str, object]]) -> dict:
    values: dict = {}
    for part in parts:
        if part not in choices:
            raise UsageError(f"unknown option {part!r}; expected {' or '.join(choices)}")
        name, value = choices[part]
        if name in values and values[name] != value:
            raise UsageError(f"options {part!r} and {values[name]!r} contradict each other; give one")
        values[name] = value
    return values


def _number(text: str, name: str, example: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{name} {text!r} is not a number, e.g. {example}") from None
    return value


def _recover_value(key: str, raw: str, parse):
    if parse == "bool":
        if raw.lower() in ("true", "yes", "1", ""):
            return True
        if raw.lower() in ("false", "no", "0"):
            return False
        raise UsageError(f"{key}={raw}: expected true or false")
    if parse is str:
        if not raw:
            raise UsageError(f"{key}= needs a value")
        return raw.lower() if key == "device" else raw
    try:
        return parse(raw)
    except ValueError:
        kind = "a whole number" if parse is int else "a number"
        raise UsageError(f"{key}={raw}: expected {kind}, e.g. {key}={'300' if parse is int else '5e-5'}") from None


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fraction(value, *, open_high: bool) -> bool:
    return _real(value) and 0 < value and (value < 1 if open_high else value <= 1)


def _whole(name: str, value, low: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise UsageError(f"{name} must be a whole number, {low} or more; got {value!r}")


def _one_of(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{name} {value!r} is not one of {', '.join(allowed)}")


def _example(kind: str) -> str:
    return {"channels": "structured:0.5", "heads": "heads:0.33", "unstructured": "unstructured:0.5"}.get(kind, "2:4")


__all__ = ["CompressionSpecs", "LowRankSpec", "PruneSpec", "RecoverSpec", "check_layer_pattern", "parse_lowrank", "layer_ratio", "parse_prune", "parse_prune_layers",
           "parse_recover", "with_layers"]
