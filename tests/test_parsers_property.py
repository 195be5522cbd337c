"""Property tests for the parsers users type into: input specs, budgets, image preprocessing and project
files. Whatever the text, a parser returns a value or raises edgeq's own error (a message, an exit code):
never another exception, which the CLI would print as a traceback."""

from __future__ import annotations

import json
import math
import tomllib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeq.calibration.sources.images import parse_preprocess
from edgeq.errors import EdgeqError, UsageError
from edgeq.job_keys import KEYS
from edgeq.signature import DTYPES, parse_input_spec
from edgeq.validate.budget import METRICS, RANGES, BudgetSyntaxError, parse_budget

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
dims = st.one_of(
    st.integers(1, 4096).map(str),
    st.tuples(names, st.integers(1, 64)).map(lambda pair: f"{pair[0]}={pair[1]}"),
)


@FAST
@given(name=names, shape=st.lists(dims, min_size=1, max_size=5), dtype=st.sampled_from(DTYPES))
def test_input_spec_round_trips(name, shape, dtype):
    spec = parse_input_spec(f"{name}:{'x'.join(shape)}:{dtype}")
    assert spec.name == name and spec.dtype == dtype and len(spec.dims) == len(shape)
    assert parse_input_spec(str(spec)) == spec


@FAST
@given(st.text(max_size=40))
def test_input_spec_never_crashes(text):
    try:
        spec = parse_input_spec(text)
    except UsageError as exc:
        assert "--input" in str(exc)
    else:
        assert all(d.size >= 1 for d in spec.dims)


bounds = st.sampled_from(sorted(METRICS)).flatmap(
    lambda metric: st.floats(*[max(v, -1e6) if i == 0 else min(v, 1e6) for i, v in enumerate(RANGES[metric])],
                             allow_nan=False).map(lambda value, metric=metric: f"{metric}{METRICS[metric]}{value!r}")
)


@FAST
@given(st.lists(bounds, min_size=1, max_size=4))
def test_budget_round_trips_and_can_hold(terms):
    budget = parse_budget(",".join(terms))
    assert len(budget.bounds) == len(terms)
    for bound in budget.bounds:
        low, high = RANGES[bound.metric]
        assert low <= bound.limit <= high or math.isinf(bound.limit)
    assert parse_budget(str(budget)).bounds == budget.bounds


@FAST
@given(st.text(alphabet=st.sampled_from("cosinqrdb_maxlt15.0e-+<>=, "), max_size=30))
def test_budget_never_crashes(text):
    try:
        budget = parse_budget(text, require_terms=True)
    except BudgetSyntaxError:
        return
    for bound in budget.bounds:  # whatever parses can be met by some artifact
        low, high = RANGES[bound.metric]
        assert (bound.op == ">=" and bound.limit <= high) or (bound.op == "<=" and bound.limit >= low)


preprocess_values = st.one_of(
    st.integers(-5, 600).map(str), st.floats(-2, 300, allow_nan=False).map(repr), st.sampled_from(
        ["rgb", "bgr", "gray", "nchw", "nhwc", "bilinear", "nearest", "224x200", "0.5/0.4/0.3", "1/255", "", "x", "nan", "inf"]
    ),
)
preprocess_keys = st.sampled_from(
    ["resize", "crop", "mean", "std", "scale", "layout", "channels", "interpolation", "colour", ""]
)


@FAST
@given(st.lists(st.tuples(preprocess_keys, preprocess_values), max_size=5))
def test_preprocess_never_crashes(pairs):
    text = ",".join(f"{k}={v}" for k, v in pairs)
    try:
        parse_preprocess(text)
    except UsageError:
        pass


toml_values = st.recursive(
    st.one_of(
        st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=False, allow_infinity=True),
        st.text(max_size=12), st.sampled_from(["onnx", "fp32", "none", "cosine>=0.99", "edgeq.examples:tiny_mlp", "../x", "re:("]),
    ),
    lambda children: st.lists(children, max_size=3),
    max_leaves=5,
)


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if value == math.inf else "-inf" if value == -math.inf else repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML's (astral characters aside, which TOML refuses)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


@FAST
@given(st.dictionaries(st.sampled_from(sorted(KEYS) + ["colour"]), toml_values, max_size=4))
def test_project_file_never_crashes(tmp_path, entry):
    from edgeq.project import load_project

    entry.setdefault("source", "edgeq.examples:tiny_mlp")
    text = "[[models]]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in entry.items())
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # a value TOML itself cannot write
    project = tmp_path / "edgeq.toml"
    project.write_text(text, encoding="utf-8")
    try:
        jobs = load_project(project)
    except EdgeqError as exc:
        assert exc.exit_code in (2, 3) and str(exc)
    else:
        assert len(jobs) == 1 and jobs[0].samples >= 1
