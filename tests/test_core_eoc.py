"""EOC: prior extraction (running means, channel pooling, gap statistics), judgment, correction of
reused branch outputs in the engine, and the prior's file formats."""
import json

import pytest
import torch

from procache_core import Schedule, SchedulePolicy, parse_pattern, uniform
from procache_core.eoc import (Correction, CorrectionState, EOCError, Prior, PriorRecorder, judge_by_trial, pooled)
from procache_core.reference.dit import DiT, DiTConfig
from procache_core.reference.sampling import sample

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
UNIT = (0, "mlp")


def _model():
    torch.manual_seed(0)
    model = DiT(DiTConfig(image_size=8, depth=3, hidden=32, heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)      # wake the zero-initialised gates
    return model.eval()




@pytest.fixture(scope="module")
def model():
    return _model()


def _all_full(steps=STEPS):
    return SchedulePolicy(Schedule(kinds=(1,) * steps))


def _extract(model, labels, seed, pooling="channel", kinds=None, steps=STEPS):
    recorder = PriorRecorder(pooling, kinds=kinds)
    sample(model, labels, steps, 2.0, seed, policy=_all_full(steps), recorder=recorder)
    return recorder.prior({"seed": seed})


# ---- the running mean --------------------------------------------------------------------------
def test_running_mean_equals_the_direct_mean_over_uneven_batches_and_streams():
    gen = torch.Generator().manual_seed(0)
    token = PriorRecorder("token", max_gap=1)
    channel = PriorRecorder("channel", max_gap=1)
    values = {0: [], 1: []}
    for batch in (1, 3, 2):                     # three runs, uneven batches of cond + uncond
        for step in range(2):
            cond, uncond = torch.randn(batch, 5, 4, generator=gen), torch.randn(batch, 5, 4, generator=gen) + 3
            values[step].append((cond, uncond))
            for rec in (token, channel):
                rec.observe(("c-%d" % batch, "u-%d" % batch), UNIT, "mlp", step, torch.cat([cond, uncond]))
    for step in range(2):
        conds = torch.cat([c for c, _ in values[step]])
        unconds = torch.cat([u for _, u in values[step]])
        torch.testing.assert_close(token.means[(0, step, UNIT)], conds.mean(0))
        torch.testing.assert_close(token.means[(1, step, UNIT)], unconds.mean(0))
        torch.testing.assert_close(channel.means[(0, step, UNIT)], conds.mean((0, 1)))
        assert channel.means[(1, step, UNIT)].shape == (4,)
        assert token.counts[(0, step, UNIT)] == 6
    # Gap statistics: mean square of each sample's step-to-step change, and of its token mean.
    diffs = torch.cat([b - a for (a, _), (b, _) in zip(values[0], values[1])])
    n, full, pool = token.stats[(0, 1, UNIT, 1)]
    assert n == 6
    assert full == pytest.approx(float(diffs.square().mean((1, 2)).sum()), rel=1e-5)
    assert channel.stats[(0, 1, UNIT, 1)][2] == pytest.approx(float(diffs.mean(1).square().mean(1).sum()), rel=1e-5)


def test_channel_pooling_keeps_one_vector_per_step_and_unit(model):
    labels = torch.tensor([1, 4])
    token = _extract(model, labels, 0, "token")
    channel = _extract(model, labels, 0, "channel")
    tokens = model.cfg.tokens
    assert token.means[(0, 3, UNIT)].shape == (tokens, 32)
    assert channel.means[(0, 3, UNIT)].shape == (32,)
    torch.testing.assert_close(channel.means[(1, 3, UNIT)], token.means[(1, 3, UNIT)].mean(0), rtol=1e-5, atol=1e-6)
    assert token.nbytes == tokens * channel.nbytes
    assert (token.steps, token.streams, token.samples) == (STEPS, 2, 2)
    assert len({u for _, _, u in channel.means}) == 6      # 3 blocks x (attn, mlp)


# ---- correction in the engine ------------------------------------------------------------------
def test_correction_off_is_bit_identical_to_plain_reuse(model):
    labels = torch.tensor([2, 5])
    prior = _extract(model, torch.tensor([0, 3, 8]), 11)
    policy = SchedulePolicy(parse_pattern("10101100"))
    plain = sample(model, labels, STEPS, 2.0, 4, policy=policy)
    for correction in (Correction(prior, gamma=0.0), Correction(prior, 0.5, threshold=1e9),
                       Correction(prior, 0.5, steps=[])):
        out, run = sample(model, labels, STEPS, 2.0, 4, policy=policy, eoc=correction, return_run=True)
        assert torch.equal(out, plain)
        assert run.eoc.corrected == {}
    # An all-full schedule never reuses, so the correction never applies.
    full = sample(model, labels, STEPS, 2.0, 4)
    assert torch.equal(sample(model, labels, STEPS, 2.0, 4, policy=_all_full(), eoc=Correction(prior, 1.0)), full)


def test_correction_changes_reuse_steps_only_and_scales_with_gamma():
    prior = Prior("token", {(0, 0, UNIT): torch.zeros(3, 2), (0, 2, UNIT): torch.ones(3, 2)})
    cached = torch.full((2, 3, 2), 5.0)
    for gamma in (0.25, 0.5, 1.0):
        state = CorrectionState(Correction(prior, gamma, min_gain=None))
        state.filled(("cond",), UNIT, 0)
        out = state.correct(("cond",), UNIT, 2, cached)
        torch.testing.assert_close(out, cached + gamma)               # gamma * (P[2] - P[0])
        assert state.correct(("cond",), UNIT, 1, cached) is cached     # no prior at step 1: untouched
        assert state.corrected == {2: 1}


def test_a_prior_of_the_very_same_sample_makes_each_reuse_exact(model):
    # method.md 7.5 (7): prior from the same noise and label (one sample), gamma 1: reuse = recompute.
    labels = torch.tensor([6])
    prior = _extract(model, labels, 9, "token", steps=STEPS)
    full = sample(model, labels, STEPS, 2.0, 9)
    policy = SchedulePolicy(uniform(STEPS, 2))
    plain = sample(model, labels, STEPS, 2.0, 9, policy=policy)
    exact = sample(model, labels, STEPS, 2.0, 9, policy=policy, eoc=Correction(prior, 1.0, min_gain=None))
    assert (plain - full).abs().max() > 0.01
    assert (exact - full).abs().max() < 1e-3 * (plain - full).abs().max()      # float rounding only


def test_a_many_seed_prior_lowers_the_reuse_error_on_new_seeds(model):
    policy = SchedulePolicy(uniform(STEPS, 2))
    prior = _extract(model, torch.arange(16) % 10, 100, "token")
    labels = torch.arange(6) % 10
    full = sample(model, labels, STEPS, 2.0, 7)
    plain = (sample(model, labels, STEPS, 2.0, 7, policy=policy) - full).square().mean()
    corrected = (sample(model, labels, STEPS, 2.0, 7, policy=policy, eoc=Correction(prior, 0.5)) - full).square().mean()
    assert corrected < 0.9 * plain


# ---- judgment ----------------------------------------------------------------------------------
def _prior_with_stats(consistent_drift: float, noisy_drift: float):
    """Two reuse steps with equal prior drift: at step 1 every sample moved that way, at step 3 the
    samples scattered widely around it."""
    base = torch.ones(4)
    means = {(0, k, UNIT): base + d for k, d in enumerate((0.0, consistent_drift, 0.0, noisy_drift))}
    n = 10
    # stats: (samples, sum of mean-square D, sum of mean-square pooled D)
    stats = {(0, 1, UNIT, 1): (n, n * consistent_drift ** 2 * 1.1, n * consistent_drift ** 2 * 1.05),
             (0, 3, UNIT, 1): (n, n * noisy_drift ** 2 * 40.0, n * noisy_drift ** 2 * 30.0)}
    return Prior("channel", means, {k: n for k in means}, stats)


def test_judgment_picks_steps_by_drift_and_expected_gain():
    prior = _prior_with_stats(0.2, 0.2)
    kinds = parse_pattern("1010").kinds
    correction = Correction(prior, gamma=0.5)
    ok1, drift1, gain1 = correction.judge(0, 1, 0, UNIT)
    ok3, drift3, gain3 = correction.judge(0, 3, 2, UNIT)
    assert drift1 == pytest.approx(drift3) == pytest.approx(0.2)
    assert ok1 and gain1 > 0.5            # the drift explains most of each sample's change
    assert not ok3 and gain3 < 0          # it explains less than its own sampling noise
    assert correction.plan(kinds) == {1: [(0, UNIT)]}
    # Without the gain criterion both are corrected; a drift threshold above 0.2 corrects neither.
    assert sorted(Correction(prior, 0.5, min_gain=None).plan(kinds)) == [1, 3]
    assert Correction(prior, 0.5, threshold=0.25, min_gain=None).plan(kinds) == {}
    assert sorted(Correction(prior, 0.5, min_gain=None, end=0.5).plan(kinds)) == [1]
    # Reuse from an older fill step (gap 2): no statistics for that gap, judged on the drift alone.
    assert Correction(prior, 0.5).judge(0, 3, 1, UNIT)[2] is None


def test_judge_by_trial_keeps_the_steps_whose_correction_lowers_the_final_error(model):
    steps = 6
    labels = torch.tensor([3])
    prior = _extract(model, labels, 5, "token", steps=steps)     # exact prior: every correction helps
    policy = SchedulePolicy(uniform(steps, 2))
    reference = sample(model, labels, steps, 2.0, 5)
    correction = Correction(prior, 1.0, min_gain=None)
    calls = []

    def run(c):
        calls.append(c)
        return sample(model, labels, steps, 2.0, 5, policy=policy, eoc=c)
    result = judge_by_trial(run, reference, correction, uniform(steps, 2).kinds)
    assert sorted(result["ratios"]) == [1, 3, 5] and calls[0] is None and len(calls) == 4
    assert 1 in result["steps"] and result["ratios"][1] < 1e-3      # the first reuse becomes exact
    # A prior of another sample, pushed hard, makes some steps worse: those are left out.
    other = _extract(model, torch.tensor([8]), 77, "token", steps=steps)
    result = judge_by_trial(run, reference, Correction(other, 2.0, min_gain=None), uniform(steps, 2).kinds)
    assert set(result["steps"]) < {1, 3, 5}
    assert all((r < 1.0) == (k in result["steps"]) for k, r in result["ratios"].items())


# ---- formats -----------------------------------------------------------------------------------
def test_prior_round_trips_through_safetensors_and_json(model, tmp_path):
    prior = _extract(model, torch.tensor([1, 2]), 3, "channel", kinds=uniform(STEPS, 3).kinds)
    assert any(gap == 2 for *_, gap in prior.stats)       # the schedule's own gap was recorded
    path = tmp_path / "prior.safetensors"
    prior.save(str(path))
    for again in (Prior.load(str(path)), Prior.from_json(prior.to_json())):
        assert again.pooling == "channel" and again.metadata == {"seed": 3}
        assert again.means.keys() == prior.means.keys() and again.counts == prior.counts
        assert all(torch.equal(again.means[k], v) for k, v in prior.means.items())
        # pytest.approx compares flat containers only: compare each stats tuple on its own.
        assert again.stats.keys() == prior.stats.keys()
        assert all(again.stats[k] == pytest.approx(v) for k, v in prior.stats.items())
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "procache.eoc_prior"
    doc = json.loads(prior.to_json())
    assert doc["format"] == "procache.eoc_prior" and "samples" in doc["summary"]


def test_bad_priors_and_settings_are_refused_with_a_reason():
    with pytest.raises(EOCError, match="not valid JSON"):
        Prior.from_json("{oops")
    with pytest.raises(EOCError, match="not an EOC prior"):
        Prior.from_json(json.dumps({"format": "procache.forecaster"}))
    with pytest.raises(EOCError, match="readable safetensors"):
        Prior.from_bytes(b"\x00" * 16)
    with pytest.raises(EOCError, match="pooling"):
        PriorRecorder("mean")
    prior = Prior("channel", {(0, 0, UNIT): torch.zeros(4)})
    with pytest.raises(EOCError, match="gamma"):
        Correction(prior, gamma=-0.1)
    with pytest.raises(EOCError, match="nothing was recorded"):
        PriorRecorder().prior()


def test_a_prior_of_another_width_or_resolution_is_not_applied():
    prior = Prior("token", {(0, 0, UNIT): torch.zeros(3, 2), (0, 1, UNIT): torch.ones(3, 2)})
    state = CorrectionState(Correction(prior, 1.0, min_gain=None))
    state.filled(("s",), UNIT, 0)
    other = torch.zeros(1, 5, 2)                      # 5 tokens instead of 3
    assert state.correct(("s",), UNIT, 1, other) is other
    assert pooled(torch.ones(2, 3, 4), "channel").shape == (2, 4)


def test_prior_text_is_the_same_for_the_same_prior():
    """safetensors writes its metadata from a hash map; the text kept in a workflow must not change
    between two saves of one prior (the web extension would mark the workflow as modified)."""
    key = (0, 1, (0, "attn"))
    prior = Prior("channel", {key: torch.randn(4)}, {key: 2}, {(*key, 1): (2.0, 0.1, 0.2)},
                  {f"k{i}": i for i in range(12)})
    texts = {prior.to_json() for _ in range(30)}
    assert len(texts) == 1
    again = Prior.from_json(texts.pop())
    assert torch.equal(again.means[key], prior.means[key]) and again.metadata == prior.metadata
