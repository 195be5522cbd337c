"""Per-layer schemes: `per_layer` in edgeq.toml and `--per-layer PATTERN=VALUE` on the command line.

    [defaults.per_layer]                      # or [models.per_layer] after a [[models]] entry
    "*" = "int4"                              # general patterns first ...
    "*.intermediate.dense" = "int3:g32"
    "embeddings.*" = "int8"
    "classifier" = "float"                    # ... exceptions after: the last matching entry wins

PATTERN: a layer's torch FQN, a glob (`*`, `?`, `[...]`; `*` also crosses dots), or `re:REGEX` matched in
full (as --keep-float). VALUE:
    float                the layer stays float
    int8                 8-bit weights per output channel (what every runtime's int8 kernels take)
    int4, int3, int2     low-bit weights, with options after ':': g32 / g64 / g128 ... (input channels per
                         scale), channel (one scale per output channel), rtn / gptq (the algorithm);
                         e.g. int4:g128, int3:channel:rtn. `-weight` may follow (int4-weight).
    lut2 ... lut8        k-means palettes; gN: one table per N output channels (lut4:g16)
Options not given are the model's scheme's (-p, --group-size, --algo); activations (float or dynamic) are
the model's scheme's for every layer. --keep-float wins over every entry.

Everything here is torch-free: values are checked when the project file or the command line is read;
patterns are checked against the model's layers when the plan is made (edgeq/targets/layer_schemes.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import re
from dataclasses import dataclass

from edgeq.errors import UsageError

AFFINE_BITS = (2, 3, 4, 8)
PALETTE_BITS = (2, 3, 4, 6, 8)  # constexpr_lut_to_dense's index widths edgeq plans (as the lut*-weight schemes)
ALGORITHMS = ("rtn", "gptq", "awq", "awq+gptq")  # edgeq.scheme.Algorithm, k-means aside (lutN entries)
EXPECTED = (
    "float, int8, int4, int3, int2 (options after ':' - gN for N input channels per scale, channel, rtn, gptq; "
    "e.g. int4:g128) or lut2/3/4/6/8 (lut4:g16)"
)
_GLOB = re.compile(r"[*?\[]")


def pattern_matches(pattern: str, fqn: str) -> bool:
    """Whether `pattern` names the layer `fqn`: an exact FQN, a glob (`*` also crosses dots) or `re:REGEX` in
    full (raises re.error for a malformed REGEX). Shared with --lowrank-layers (edgeq/compress/lowrank.py)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], fqn) is not None
    if _GLOB.search(pattern):
        return fnmatch.fnmatchcase(fqn, pattern)
    return fqn == pattern


@dataclass(frozen=True)
class LayerOverride:
    """One entry: which layers (`pattern`), what they get (`value` as typed, parsed into the fields below),
    and where it was written (`origin`: the file key or option, for messages and the plan's reasons)."""

    pattern: str
    value: str
    origin: str
    kind: str  # "float", "int" (affine) or "lut" (palette)
    bits: int | None = None
    group_size: int | None = None  # None: per output channel (only read when group_given)
    group_given: bool = False
    algorithm: str | None = None  # None: the model's scheme's

    def matches(self, fqn: str) -> bool:
        return pattern_matches(self.pattern, fqn)

    def describe(self) -> str:
        """How the plan's reasons name this entry, e.g. "per_layer 'classifier' = 'float' (edgeq.toml: defaults.per_layer)"."""
        return f"{self.pattern!r} = {self.value!r} ({self.origin})"

    def scheme(self, base):
        """The edgeq.scheme.Scheme this entry gives a layer, the model's scheme `base` filling what it leaves
        open; None for float. A layer's Scheme is the same type as the model's."""
        from edgeq.scheme import DEFAULT_ALGORITHM, Algorithm, Scheme

        if self.kind == "float":
            return None
        if self.kind == "lut":
            group = self.group_size if self.group_given else (base.group_size if base.palette else None)
            return Scheme(self.bits, group, True, Algorithm.KMEANS, base.activations, palette=True)
        if self.bits == 8:  # round to nearest per channel: int8's error is already far below the low-bit layers'
            return Scheme(8, None, True, Algorithm.RTN, base.activations)
        algorithm = Algorithm(self.algorithm) if self.algorithm else (DEFAULT_ALGORITHM if base.palette else base.algorithm)
        group = self.group_size if self.group_given else base.group_size
        return dataclasses.replace(base, bits=self.bits, group_size=group, algorithm=algorithm, palette=False)


def parse_value(value: str, where: str) -> dict:
    """The fields a VALUE sets, or a UsageError naming `where` and what would work."""
    text = value.strip().lower()
    head, *options = text.split(":")
    head = head.removesuffix("-weight")
    wrong = f"{where}: {value!r} is not a layer scheme; expected {EXPECTED}"
    if head == "float":
        if options:
            raise UsageError(f"{where}: 'float' takes no options ({value!r})")
        return {"kind": "float"}
    match = re.fullmatch(r"(int|lut)(\d+)", head)
    if not match:
        hint = "; activations follow the model's scheme (-p int4-dynamic), a layer sets its weights" if "dynamic" in head else ""
        raise UsageError(wrong + hint)
    kind, bits = match.group(1), int(match.group(2))
    if bits not in (AFFINE_BITS if kind == "int" else PALETTE_BITS):
        raise UsageError(wrong)
    fields = {"kind": kind, "bits": bits}
    for option in options:
        if re.fullmatch(r"g\d+", option) and int(option[1:]) > 0:
            fields |= {"group_size": int(option[1:]), "group_given": True}
        elif option == "channel" and kind == "int":
            fields |= {"group_size": None, "group_given": True}
        elif option in ALGORITHMS and kind == "int":
            fields["algorithm"] = option
        else:
            raise UsageError(f"{where}: option {option!r} in {value!r}: expected gN (e.g. g32), channel, rtn, gptq, awq or awq+gptq")
    if kind == "int" and bits == 8 and (fields.get("group_size") or fields.get("algorithm", "rtn") != "rtn"):
        raise UsageError(f"{where}: {value!r}: int8 layers are per output channel, rounded to nearest (the int8 kernels of every runtime here); write 'int8'")
    return fields


def parse_per_layer(value, origin: str) -> tuple[LayerOverride, ...]:
    """The entries of `per_layer` in file order: a table {PATTERN: VALUE} (edgeq.toml) or a list of
    "PATTERN=VALUE" strings (--per-layer). `origin` names the key or option in messages."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)):
        pairs = []
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise UsageError(f"{origin}: {item!r}: expected PATTERN=VALUE, e.g. 'classifier=float' or '*.intermediate.dense=int3'")
            pattern, _, scheme = item.rpartition("=")  # a regex may hold '=', a value never does
            pairs.append((pattern, scheme))
    else:
        raise UsageError(f"{origin}: expected a table of layer patterns, e.g. {{ \"classifier\" = \"float\" }}; found {type(value).__name__}")
    entries = []
    for pattern, scheme in pairs:
        if not isinstance(pattern, str) or not pattern.strip():
            raise UsageError(f"{origin}: an empty layer pattern; give an FQN, a glob such as 'encoder.*.attention.*' or 're:REGEX'")
        if not isinstance(scheme, str):
            raise UsageError(f"{origin} {pattern!r}: {scheme!r} is not a layer scheme; expected {EXPECTED}")
        pattern = pattern.strip()
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise UsageError(f"{origin} {pattern!r}: not a valid regular expression: {exc}") from exc
        entries.append(LayerOverride(pattern, scheme.strip(), origin, **parse_value(scheme, f"{origin} {pattern!r}")))
    return tuple(entries)


def decide(overrides: tuple[LayerOverride, ...], fqn: str) -> LayerOverride | None:
    """The entry that decides layer `fqn`: the last one matching it."""
    for entry in reversed(overrides):
        if entry.matches(fqn):
            return entry
    return None


def check_patterns(overrides: tuple[LayerOverride, ...], fqns: list[str]) -> None:
    """Every pattern names at least one of the model's quantizable layers `fqns`, or a UsageError says which
    does not and what the layers are called."""
    for entry in overrides:
        if any(entry.matches(fqn) for fqn in fqns):
            continue
        close = difflib.get_close_matches(entry.pattern.removeprefix("re:"), fqns, n=5, cutoff=0.5) or fqns[:5]
        raise UsageError(
            f"{entry.origin} {entry.pattern!r}: names none of the model's quantizable layers; they are e.g. "
            f"{', '.join(close)} (patterns: an FQN, a glob such as '*.attention.*', or 're:REGEX')"
        )
