"""Schedule search without ComfyUI: constraints, determinism, pre-ranking, generic patterns."""
import pytest
import torch

from procache_core import SchedulePolicy, Schedule, ScheduleError, StepKind
from procache_core.profiling import FeatureProfile, step_weights
from procache_core.reference.dit import DiT, DiTConfig
from procache_core.reference.sampling import sample
from procache_core.schedule import full_step_segments, pattern_from_segments
from procache_core.search import (SearchConstraints, count_partitions, draw_candidates, even_pattern,
                                  admits, generic_pattern, output_error, search)

STEPS = 16
LABELS = torch.tensor([1, 7])


def _segments_ok(pattern, c: SearchConstraints):
    lengths = [n for n, _ in full_step_segments(pattern)]
    return (len(pattern) == c.steps and pattern[0] == 1 and len(lengths) == c.full_steps
            and all(c.min_interval + 1 <= n <= c.max_interval + 1 for n in lengths)
            and lengths == sorted(lengths, reverse=True))


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny matrices: more threads only contend on a shared machine
    torch.manual_seed(0)
    m = DiT(DiTConfig(depth=4, hidden=64, heads=2))
    m.reset_parameters(zero_gates=False)
    yield m.eval()
    torch.set_num_threads(threads)


class Recording(torch.nn.Module):
    """The model, recording its output at every step into a profile (one call per step)."""

    def __init__(self, model, profile):
        super().__init__()
        self.model, self.profile, self.cfg, self.step = model, profile, model.cfg, 0

    def forward(self, *args):
        out = self.model(*args)
        self.profile.record(self.step, out)
        self.step += 1
        return out


def _full_and_profile(model, seeds, window):
    profile = FeatureProfile(STEPS, window)
    outs = []
    for seed in seeds:
        profile.begin_run()
        outs.append(sample(Recording(model, profile), LABELS, STEPS, 1.5, seed))
    return torch.cat(outs), profile


def _runner(model, seeds):
    def run(pattern):
        policy = SchedulePolicy(Schedule(kinds=tuple(pattern)))
        return torch.cat([sample(model, LABELS, STEPS, 1.5, s, policy=policy) for s in seeds])
    return run


def test_drawn_candidates_respect_constraints_and_seed():
    c = SearchConstraints(50, 17, 0, 5)
    a = draw_candidates(c, 40, seed=3)
    assert a == draw_candidates(c, 40, seed=3)
    assert a != draw_candidates(c, 40, seed=4)
    assert len({tuple(p) for p in a}) == len(a) == 40
    assert all(_segments_ok(p, c) for p in a)
    assert _segments_ok(even_pattern(c), c)
    assert even_pattern(c) == [1, 0, 0] * 16 + [1, 0]            # FORA-3 at 50 steps
    # the method's DiT bounds leave only 9 patterns at 17 of 50: asking for more lists them all
    narrow = SearchConstraints(50, 17, 1, 3)
    every = draw_candidates(narrow, 100, seed=0)
    assert len(every) == count_partitions(narrow) == 9
    assert all(_segments_ok(p, narrow) for p in every) and len({tuple(p) for p in every}) == 9


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=20, full_steps=3, min_interval=1, max_interval=4), ["3 full steps", "at most 4", "15 of steps=20"]),
    (dict(steps=20, full_steps=12, min_interval=1, max_interval=4), ["12 full steps", "at least 1", "24 steps", "steps=20"]),
    (dict(steps=20, full_steps=5, min_interval=3, max_interval=2), ["min_interval=3", "max_interval=2"]),
    (dict(steps=20, full_steps=0), ["between 1 and steps=20", "got 0"]),
])
def test_bad_constraints_name_the_conflicting_values(kwargs, words):
    with pytest.raises(ScheduleError) as e:
        SearchConstraints(**kwargs)
    for word in words:
        assert word in str(e.value)


def test_bad_target_speedup_names_speedup_and_budget():
    with pytest.raises(ScheduleError, match=r"target speedup 8x at 20 steps means 2 full steps.*at most 4"):
        SearchConstraints.for_speedup(20, 8.0, 1, 4)
    with pytest.raises(ScheduleError, match="at least 1.0, got 0.5"):
        SearchConstraints.for_speedup(20, 0.5)


@pytest.mark.parametrize("steps", [20, 25, 28, 30, 50])
@pytest.mark.parametrize("speedup", [1.5, 2.0, 2.5, 3.0])
def test_generic_patterns_follow_the_rule(steps, speedup):
    pattern = generic_pattern(steps, speedup)
    lengths = [n for n, _ in full_step_segments(pattern)]
    assert len(pattern) == steps and pattern[0] == 1
    assert len(lengths) == round(steps / speedup)
    assert lengths == sorted(lengths, reverse=True)
    assert lengths[0] > lengths[-1] or len(set(lengths)) == 1


@pytest.mark.parametrize("steps", [20, 28, 50])
@pytest.mark.parametrize("full", [3, 4, 8, 10])
def test_admits_agrees_with_the_drawn_patterns(steps, full):
    c = SearchConstraints(steps, full, 0, 2 * -(-steps // full))
    for pattern in draw_candidates(c, 20, seed=3):
        assert admits(c, pattern)
    assert admits(c, even_pattern(c))
    generic = generic_pattern(steps, steps / full)
    assert admits(c, generic)
    lengths = [n for n, _ in full_step_segments(generic)]
    assert not admits(c, pattern_from_segments(sorted(lengths)))      # intervals growing
    extra = list(generic)
    extra[extra.index(0)] = 1
    assert not admits(c, extra)                                        # one full step too many
    assert not admits(c, [0] + generic[1:])                            # no full first step


def test_search_skips_a_generic_pattern_the_constraints_exclude():
    c = SearchConstraints(20, 3, 5, 7)         # the generic pattern at 20/3 has intervals 8, 6, 3
    generic = generic_pattern(20, 20 / 3)
    assert not admits(c, generic)
    result = search(c, lambda pattern: [torch.tensor([float(sum(pattern))])], [torch.tensor([3.0])], count=2, seed=0)
    assert result.generic is None and all(x.origin != "generic" for x in result.candidates)


def test_search_is_deterministic_keeps_the_best_and_injects(model):
    seeds = [0, 1]
    reference, profile = _full_and_profile(model, seeds, window=4)
    c = SearchConstraints(STEPS, 5, 0, 5)
    seen = []
    result = search(c, _runner(model, seeds), reference, count=3, seed=11, selective=True,
                    progress=lambda done, total, cand: seen.append((done, total)))
    again = search(c, _runner(model, seeds), reference, count=3, seed=11, selective=True)
    assert [x.pattern for x in result.candidates] == [x.pattern for x in again.candidates]
    assert [x.error for x in result.candidates] == [x.error for x in again.candidates]
    assert result.final.pattern == again.final.pattern
    assert seen == [(i, 6) for i in range(1, 7)]        # 3 drawn + uniform + generic + injected winner
    assert [x.origin for x in result.candidates] == ["drawn"] * 3 + ["uniform", "generic"]
    assert result.uniform is not None and result.uniform.pattern == tuple(even_pattern(c))
    assert result.generic is not None and result.generic.pattern == tuple(generic_pattern(STEPS, STEPS / 5))
    assert result.best.error == min(x.error for x in result.candidates)
    assert all(_segments_ok(list(x.pattern), c) for x in result.candidates)
    assert 2 in result.final.pattern and result.final.origin == "winner+selective"
    # the measured error is what running the winner gives
    assert result.best.error == pytest.approx(output_error(_runner(model, seeds)(list(result.best.pattern)), reference))
    assert output_error(reference, reference) == 0.0


def test_cancel_from_progress_stops_the_search(model):
    seeds = [0]
    reference, _ = _full_and_profile(model, seeds, window=4)

    class Cancelled(Exception):
        pass

    def stop(done, total, cand):
        if done == 2:
            raise Cancelled

    ran = []
    run = _runner(model, seeds)
    with pytest.raises(Cancelled):
        search(SearchConstraints(STEPS, 5, 1, 3), lambda p: ran.append(p) or run(p), reference, count=4, progress=stop)
    assert len(ran) == 2


def test_prerank_keeps_good_candidates(model):
    """Rank the whole space from one profiling run; the pre-ranked top 4 hold a candidate in the
    best quarter of the truth, and prediction and measured error agree in order (Spearman)."""
    seeds = [0]
    c = SearchConstraints(STEPS, 5, 0, 5)
    reference, profile = _full_and_profile(model, seeds, window=c.max_interval + 1)
    assert profile.ready and profile.runs == 1
    run = _runner(model, seeds)
    every = draw_candidates(c, 1000, seed=0)
    assert len(every) == count_partitions(c)
    truth = {tuple(p): output_error(run(p), reference) for p in every}
    ranked = [p for _, p in profile.rank(every)]
    best_quarter = sorted(truth.values())[max(0, len(truth) // 4 - 1)]
    assert min(truth[p] for p in ranked[:4]) <= best_quarter
    order_truth = {p: i for i, p in enumerate(sorted(truth, key=truth.get))}
    order_pred = {p: i for i, p in enumerate(ranked)}
    n = len(truth)
    rho = 1 - 6 * sum((order_truth[p] - order_pred[p]) ** 2 for p in truth) / (n * (n * n - 1))
    assert rho > 0.5, rho
    # a search with the pool runs only `count` drawn candidates, the pool's best by prediction
    result = search(c, run, reference, count=3, seed=0, profile=profile, pool=len(every), compare_uniform=False)
    assert len(result.candidates) == 3 and len(result.pool) == len(every)
    assert [x.pattern for x in result.candidates] == [tuple(p) for p in ranked[:3]]


def test_step_weights_fall_to_zero_at_the_end():
    w = step_weights([14.6, 7.0, 3.0, 1.0, 0.3, 0.0])
    assert w[-1] == 0.0 and all(0 < x < 1 for x in w[:-1])
    assert w[0] == pytest.approx(7.0 / 14.6)


def test_bundled_generic_schedules_are_the_rule_and_say_so():
    import glob
    import os
    import re
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schedules")
    found = {}
    for path in glob.glob(os.path.join(folder, "generic-*.json")):
        steps, speedup = re.match(r"generic-(\d+)-([\d.]+)x\.json", os.path.basename(path)).groups()
        with open(path, encoding="utf-8") as f:
            schedule = Schedule.from_json(f.read())
        assert list(schedule.kinds) == generic_pattern(int(steps), float(speedup))
        assert schedule.provenance.startswith("generic:") and "not searched" in schedule.provenance
        assert abs(schedule.theoretical_speedup() / float(speedup) - 1) < 0.1
        found[(int(steps), float(speedup))] = schedule
    assert set(found) == {(t, s) for t in (20, 25, 28, 30, 50) for s in (1.5, 2.0, 2.5, 3.0)}


def test_bundled_fast_schedules_load_and_keep_their_speedup():
    import glob
    import os
    import re
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schedules")
    found = set()
    for path in glob.glob(os.path.join(folder, "procache-fast-*.json")):
        steps, speedup = map(int, re.match(r"procache-fast-(\d+)-(\d)x\.json", os.path.basename(path)).groups())
        with open(path, encoding="utf-8") as f:
            schedule = Schedule.from_json(f.read(), where=path)
        assert schedule.steps == steps and schedule.name == os.path.basename(path)[:-5]
        assert set(schedule.kinds) == {StepKind.FULL, StepKind.REUSE}
        # the frontier's budget for this speedup, so a fast schedule and fewer steps cost the same
        assert schedule.count(StepKind.FULL) == round(steps / speedup)
        # whole steps: 20 steps at 6x is 3 full steps, 6.67x
        assert abs(schedule.theoretical_speedup() / speedup - 1) < 0.12
        assert "Taylor 1" in schedule.provenance and "held-out" in schedule.provenance
        assert schedule.provenance.startswith(("searched on the trained reference DiT", "generic pattern"))
        found.add((steps, speedup))
    assert found == {(t, s) for t in (20, 28, 30, 50) for s in (5, 6)}
