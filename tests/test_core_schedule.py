import json

import pytest

from procache_core.schedule import (Schedule, ScheduleError, StepKind, full_step_segments, inject_selective,
                                    parse_pattern, uniform)
from procache_core.search import SearchConstraints, count_partitions, draw_candidates

DIT_17 = "[1,0,2,0]x6 + [1,0,2]x4 + [1,0]x7"


def test_paper_dit_pattern_counts():
    s = parse_pattern(DIT_17)
    assert s.steps == 50
    assert (s.count(StepKind.FULL), s.count(StepKind.SELECTIVE), s.count(StepKind.REUSE)) == (17, 10, 23)
    assert s.theoretical_speedup() == pytest.approx(50 / 17)


@pytest.mark.parametrize("text", ["1,0,0,1", "1001", "[1,0]x2", " 1 0 0 1 ", "[1,0,0]x1 + [1]x1"])
def test_pattern_spellings(text):
    assert parse_pattern(text).pattern in ("1001", "1010")


@pytest.mark.parametrize("text, words", [
    ("", "empty"), ("1,0,x", "'x'"), ("0,1,1", "step 0 must be full"), ("1,3", "'3'"),
])
def test_bad_patterns_say_what_is_wrong(text, words):
    with pytest.raises(ScheduleError, match=words):
        parse_pattern(text)


def test_json_round_trip_and_versioning():
    s = Schedule(kinds=tuple(inject_selective([1, 0, 0, 0, 1, 0])), name="x", family="flux", sampler="euler",
                 provenance="test", units=((True, True),) * 6)
    back = Schedule.from_json(s.to_json())
    assert back == s
    doc = json.loads(s.to_json())
    doc["version"] = 99
    with pytest.raises(ScheduleError, match="version 99"):
        Schedule.from_dict(doc)
    doc["version"] = 1
    doc["steps"] = 7
    with pytest.raises(ScheduleError, match="steps"):
        Schedule.from_dict(doc)
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.from_json("{nope")
    with pytest.raises(ScheduleError, match="format"):
        Schedule.from_json('{"pattern": [1]}')


def test_a_searched_granularity_travels_through_json_resampling_and_windowing():
    from procache_core.schedule import MODEL_LEVEL
    from procache_core.search import prefer_model_level
    plain = parse_pattern("1001001001")
    assert "granularity" not in plain.to_dict()          # files without it read and write as before
    chosen = Schedule(kinds=plain.kinds, name="searched", granularity=MODEL_LEVEL)
    again = Schedule.from_json(chosen.to_json())
    assert again == chosen and again.granularity == MODEL_LEVEL
    assert chosen.resampled(20).granularity == MODEL_LEVEL
    assert chosen.windowed(0.1, 0.9, True).granularity == MODEL_LEVEL
    doc = {**plain.to_dict(), "granularity": "spans"}
    with pytest.raises(ScheduleError, match="granularity"):
        Schedule.from_dict(doc)
    # model level must be clearly closer: a tie or a small gain keeps branch level
    assert prefer_model_level(1.0, 0.5) and prefer_model_level(1.0, 0.8)
    assert not prefer_model_level(1.0, 0.81) and not prefer_model_level(1.0, 1.0)
    assert not prefer_model_level(1.0, float("nan"))


def test_injection_rule_matches_the_method():
    assert inject_selective([1, 0]) == [1, 0]
    assert inject_selective([1, 0, 0]) == [1, 0, 2]
    assert inject_selective([1, 0, 0, 0]) == [1, 0, 2, 0]
    assert inject_selective([1, 0, 0, 0, 0, 0, 1, 0, 0]) == [1, 0, 2, 0, 2, 0, 1, 0, 2]


def _intervals(kinds):
    return [length - 1 for length, _ in full_step_segments(kinds)]


@pytest.mark.parametrize("steps", [20, 25, 28, 30, 37, 100])
def test_resampling_keeps_share_and_order(steps):
    s = parse_pattern(DIT_17)
    r = s.resampled(steps)
    assert r.steps == steps and r.kinds[0] == StepKind.FULL
    assert r.count(StepKind.FULL) == round(17 * steps / 50)
    gaps = _intervals([1 if k == StepKind.FULL else 0 for k in r.kinds])
    assert gaps == sorted(gaps, reverse=True), "reuse intervals must never grow"
    assert StepKind.SELECTIVE in r.kinds
    assert "resampled from 50" in r.notes[-1]


def test_window_and_last_step():
    s = uniform(10, 5)
    w = s.windowed(0.2, 0.8, force_last_full=True)
    assert w.pattern == "1100010011"
    with pytest.raises(ScheduleError):
        s.windowed(0.8, 0.2, False)


def test_candidates_satisfy_constraints_and_are_seeded():
    c = SearchConstraints(steps=50, full_steps=11, min_interval=2, max_interval=5)
    first = draw_candidates(c, count=5, seed=3)
    assert first == draw_candidates(c, count=5, seed=3)
    assert len(first) == 5 and len({tuple(p) for p in first}) == 5
    for p in first:
        assert len(p) == 50 and p[0] == 1 and sum(p) == 11
        gaps = _intervals(p)
        assert all(2 <= g <= 5 for g in gaps)
        assert gaps == sorted(gaps, reverse=True)


def test_candidate_count_is_capped_by_what_exists():
    c = SearchConstraints(steps=10, full_steps=4, min_interval=1, max_interval=2)
    assert count_partitions(c) == 1          # only segment lengths 3,3,2,2 fit
    assert len(draw_candidates(c, count=10, seed=0)) == 1


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=50, full_steps=5, min_interval=1, max_interval=4), "max_interval"),
    (dict(steps=20, full_steps=12, min_interval=1, max_interval=4), "min_interval"),
    (dict(steps=20, full_steps=0), "budget"),
])
def test_impossible_constraints_name_the_values(kwargs, words):
    with pytest.raises(ScheduleError, match=words):
        SearchConstraints(**kwargs)


def _peak_bytes_while(call) -> int:
    import tracemalloc
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _refused(text):
    with pytest.raises(ScheduleError) as refused:
        parse_pattern(text)
    return str(refused.value)


def test_a_pattern_is_sized_by_arithmetic_before_anything_is_repeated():
    # a million steps from 300 characters: refused while holding about as much as the text itself,
    # not the million-step expansion (a repeated text would hold megabytes)
    text = " + ".join(["[1,0,0,0,0,0,0,0,0,0]x9999"] * 10)
    peak = _peak_bytes_while(lambda: _refused(text))
    assert peak < 200_000
    assert "makes 999900 steps" in _refused(text) and "at most 10000" in _refused(text)


def test_the_largest_typed_pattern_is_refused_with_little_memory():
    # just under the length limit, 7,000 groups asking for 140 million steps
    text = "+".join(["[1,0]x9999"] * 7000)
    assert len(text) < 80_000
    assert _peak_bytes_while(lambda: _refused(text)) < 5_000_000
    assert "makes 139986000 steps" in _refused(text)
    assert "too long (100000 characters" in _refused("1" * 100_000)


@pytest.mark.parametrize("text, words", [
    ("[1,0]x" + "9" * 5000, "repeat count of 5000 digits is too large"),
    ("[1,0]x10001", "repeat count 10001 is too large"),
    ("[1,0]x00005000 + [1]x5000", "makes 15000 steps"),
    ("[]x9999 + 1", None),
])
def test_repeat_counts_are_bounded_without_converting_huge_numbers(text, words):
    if words is None:
        assert parse_pattern(text).pattern == "1"
    else:
        assert words in _refused(text)


def test_a_json_pattern_over_the_step_limit_is_refused_before_conversion():
    doc = json.dumps({"format": "procache.schedule", "version": 1, "pattern": [1] * 20_000})
    assert "20000 steps" in _refused(doc)
