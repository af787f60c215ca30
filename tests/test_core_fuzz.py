"""Property-based fuzzing of every document the pack parses: typed schedule patterns, schedule,
forecaster, router and EOC prior documents (JSON text and safetensors bytes). Whatever the input,
the parser returns a value or raises the pack's own error type with a message; never another
exception, and never slowly (hypothesis' deadline bounds each input, generously: a shared CI
machine must not make it flaky, while an expansion blow-up would take seconds to minutes)."""
import datetime
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procache_core.eoc import EOCError, Prior
from procache_core.forecast import ForecastError
from procache_core.forecast import from_json as forecaster_from_json
from procache_core.router import Router
from procache_core.schedule import Schedule, ScheduleError, parse_pattern

FUZZ = settings(max_examples=150, deadline=datetime.timedelta(seconds=5),
                suppress_health_check=[HealthCheck.too_slow])

# Raw JSON fragments that broke parsers before: numbers past Python's 4300-digit conversion limit,
# overflowing floats, NaN, wrong types, deep nesting.
ADVERSARIAL = ["9" * 5000, "-" + "1" * 4400, "1e999", "-1e999", "NaN", "Infinity", '"abc"', '"x"', "[]", "{}",
               "null", "true", "0", "-1", "2.5", "1e308", "-1e308", "[" * 3000 + "]" * 3000, '"' + "A" * 2000 + '"']


def _plain_json():
    leaves = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
              | st.text(max_size=20))
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                               max_size=4),
                        max_leaves=12)


def fragments():
    """JSON text of one value: ordinary JSON, or one of the adversarial fragments."""
    return st.one_of(_plain_json().map(json.dumps), st.sampled_from(ADVERSARIAL))


def documents(fields: dict[str, list[str]]):
    """A JSON object's text: each known field absent, valid (one of its good fragments) or fuzzed,
    plus a few unknown fields."""
    def field(name, good):
        return st.one_of(st.none(), st.sampled_from(good), fragments()).map(lambda v: None if v is None else (name, v))
    parts = st.tuples(*(field(name, good) for name, good in fields.items()),
                      st.lists(st.tuples(st.text(max_size=6), fragments()), max_size=2))

    def render(values):
        *known, extra = values
        items = [kv for kv in known if kv is not None] + extra
        return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in items) + "}"
    return parts.map(render)


def _refused_cleanly(call, error):
    try:
        return call()
    except error as e:
        assert str(e), "an error without a message"
        return None


# ---- typed patterns ------------------------------------------------------------------------------
def _pattern_texts():
    digits = st.text(alphabet="0123", min_size=0, max_size=12).map(lambda d: ",".join(d))
    counts = st.one_of(st.integers(0, 20_000).map(str), st.text(alphabet="0123456789", min_size=1, max_size=60))
    group = st.tuples(digits, st.sampled_from(["x", "*", " x ", "X"]), counts).map(lambda g: f"[{g[0]}]{g[1]}{g[2]}")
    piece = st.one_of(group, digits, st.text(max_size=8))
    return st.one_of(st.lists(piece, max_size=30).map(" + ".join), st.text(max_size=200))


@FUZZ
@given(_pattern_texts())
def test_typed_patterns_parse_or_are_refused(text):
    schedule = _refused_cleanly(lambda: parse_pattern(text), ScheduleError)
    if schedule is not None:
        assert 1 <= schedule.steps <= 10_000 and set(schedule.pattern) <= set("012")


SCHEDULE_FIELDS = {"format": ['"procache.schedule"'], "version": ["1"], "pattern": ["[1, 0, 2]", "[1]"],
                   "steps": ["3"], "name": ['"n"'], "family": ['"any"'], "sampler": ['""'], "provenance": ['""'],
                   "notes": ['["a"]'], "units": ['["11", "01", "10"]']}


@FUZZ
@given(documents(SCHEDULE_FIELDS))
def test_schedule_documents_parse_or_are_refused(text):
    _refused_cleanly(lambda: Schedule.from_json(text), ScheduleError)
    _refused_cleanly(lambda: parse_pattern(text), ScheduleError)       # the typed-pattern widget takes JSON too


# ---- forecasters ---------------------------------------------------------------------------------
FORECASTER_FIELDS = {"format": ['"procache.forecaster"'], "version": ["1"], "kind": ['"fitted"', '"taylor"', '"none"'],
                     "order": ["1", "2"], "history": ["2", "3"], "grouping": ['"role"', '"role+depth"'],
                     "fallback_order": ["0", "1"], "metadata": ["{}"],
                     "coefficients": ['{"1": {"attn": [0.5, 0.5]}}', '{"2": {"mlp": [1e308, -1e308]}}']}


@FUZZ
@given(documents(FORECASTER_FIELDS))
def test_forecaster_text_parses_or_is_refused(text):
    forecaster = _refused_cleanly(lambda: forecaster_from_json(text), ForecastError)
    table = getattr(forecaster, "table", {})
    assert all(abs(c) <= 1e4 for groups in table.values() for coeffs in groups.values() for c in coeffs)


# ---- routers -------------------------------------------------------------------------------------
_LOGITS = '"' + __import__("base64").b64encode(torch.zeros(2, 4).numpy().tobytes()).decode() + '"'
ROUTER_FIELDS = {"format": ['"procache.router"'], "version": ["1"], "tau": ["0.1"], "shape": ["[2, 4]"],
                 "metadata": ['{"model": "x"}'], "logits_float32_base64": [_LOGITS]}


@FUZZ
@given(documents(ROUTER_FIELDS))
def test_router_text_parses_or_is_refused(text):
    router = _refused_cleanly(lambda: Router.from_text(text), ScheduleError)
    if router is not None:
        assert router.to_schedule().steps == router.steps


def _safetensors(metadata: dict[str, str], names: list[str]) -> bytes:
    from safetensors.torch import save
    return save({name: torch.ones(3) for name in names}, metadata=metadata)


def _metadata_values():
    return st.one_of(fragments(), st.text(max_size=30))


@FUZZ
@given(st.dictionaries(st.sampled_from(["format", "version", "tau", "model", "steps"]), _metadata_values(), max_size=5),
       st.booleans(), st.binary(max_size=64))
def test_router_files_parse_or_are_refused(metadata, well_formed, junk):
    metadata = {"format": "procache.router", "version": "1", "tau": "0.1", **metadata}
    data = _safetensors(metadata, ["logits"]) if well_formed else junk
    _refused_cleanly(lambda: Router.from_bytes(data), ScheduleError)


# ---- EOC priors ----------------------------------------------------------------------------------
TENSOR_NAMES = st.one_of(st.sampled_from(["mean|0|0|0|attn", "stats|0|1|0|attn|1", "mean|0|1|0|attn", "count|0|0|0|attn",
                                          "mean|x|0|0|attn", "mean|0|" + "9" * 50 + "|0|a", "mean|²|0|0|a", "mean"]),
                         st.text(max_size=20))


@FUZZ
@given(st.dictionaries(st.sampled_from(["format", "version", "pooling", "counts", "metadata"]), _metadata_values(),
                       max_size=5),
       st.lists(TENSOR_NAMES, min_size=1, max_size=3, unique=True), st.booleans(), st.binary(max_size=64))
def test_eoc_priors_parse_or_are_refused(metadata, names, well_formed, junk):
    metadata = {"format": "procache.eoc_prior", "version": "1", "pooling": "channel", **metadata}
    data = _safetensors(metadata, names) if well_formed else junk
    _refused_cleanly(lambda: Prior.from_bytes(data), EOCError)
    text = json.dumps({"format": "procache.eoc_prior", "version": 1,
                       "safetensors": __import__("base64").b64encode(data).decode()})
    _refused_cleanly(lambda: Prior.from_json(text), EOCError)


@FUZZ
@given(documents({"format": ['"procache.eoc_prior"'], "version": ["1"], "safetensors": ['""', '"AAAA"']}))
def test_eoc_prior_text_parses_or_is_refused(text):
    _refused_cleanly(lambda: Prior.from_json(text), EOCError)


@pytest.mark.parametrize("text, words", [
    ('{"format": "procache.forecaster", "version": 1, "kind": "fitted", "history": "abc", "coefficients": {}}',
     "field 'history' must be a whole number"),
    ('{"format": "procache.forecaster", "version": 1, "kind": "fitted", "history": 1e999, "coefficients": {}}',
     "field 'history' must be a whole number"),
    ('{"format": "procache.forecaster", "version": 1, "kind": "taylor", "order": "x"}', "field 'order'"),
    ('{"format": "procache.forecaster", "version": 1, "kind": "taylor", "order": ' + "9" * 5000 + "}",
     "not a forecaster"),
    ('{"format": "procache.forecaster", "version": 1, "kind": "fitted", "history": 2, '
     '"coefficients": {"3": {"attn": [1e308, -1e308]}}}', r"within \+-10000"),
], ids=["history abc", "history 1e999", "order x", "order of 5000 digits", "coefficients 1e308"])
def test_forecaster_errors_name_the_field_and_what_to_do(text, words):
    with pytest.raises(ForecastError, match=words):
        forecaster_from_json(text)


def test_router_and_schedule_errors_name_the_field_and_what_to_do():
    router = json.loads(Router.initial(2, 2).to_text())
    with pytest.raises(ScheduleError, match="'metadata' must be a JSON object.*HarmoniCa Router Trainer"):
        Router.from_text(json.dumps({**router, "metadata": ["a", "b"]}))
    with pytest.raises(ScheduleError, match="router text: not a router.*HarmoniCa Router Trainer"):
        Router.from_text(json.dumps(router)[:-1] + ', "x": ' + "9" * 5000 + "}")
    with pytest.raises(ScheduleError, match="schedule x: not a schedule"):
        Schedule.from_json('{"format": "procache.schedule", "version": ' + "1" * 4400 + "}", where="schedule x")
