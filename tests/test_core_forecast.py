"""Forecasting cached branches: Taylor extrapolation, least-squares fitting, engine semantics."""
import json

import pytest
import torch

from procache_core import Schedule, SchedulePolicy, StepKind, TokenSelector, parse_pattern
from procache_core.cache import CacheStore
from procache_core.forecast import (Fitted, ForecastError, ForecastFitter, ForecastState, Online, Taylor, from_json,
                                    lagrange_coefficients)
from procache_core.reference.dit import DiT, DiTConfig
from procache_core.reference.sampling import sample

UNEVEN = [951.0, 803.0, 700.5, 412.0]       # searched schedules have uneven gaps


@pytest.mark.parametrize("order", [1, 2])
def test_taylor_is_exact_for_polynomials_of_its_degree_on_uneven_gaps(order):
    gen = torch.Generator().manual_seed(order)
    coeffs = torch.randn(order + 1, 5, 7, generator=gen)         # a tensor-valued polynomial in t

    def trajectory(t):
        return sum(c * (t / 1000.0) ** p for p, c in enumerate(coeffs))

    times = UNEVEN[:order + 1]
    target = 333.0
    weights = Taylor(order).coefficients(10, "mlp", times, target)
    forecast = sum(w * trajectory(t) for w, t in zip(weights, times))
    torch.testing.assert_close(forecast, trajectory(target), rtol=1e-4, atol=1e-4)
    # One degree more is not reproduced: the test would notice a forecaster that ignores the gaps.
    cubic = lambda t: trajectory(t) + coeffs[0] * (t / 1000.0) ** (order + 1)  # noqa: E731
    forecast = sum(w * cubic(t) for w, t in zip(weights, times))
    assert (forecast - cubic(target)).abs().max() > 1e-3


def test_taylor_order_zero_is_plain_reuse_and_bad_inputs_are_refused():
    assert Taylor(0).coefficients(3, "mlp", [5.0, 4.0], 1.0) == [1.0]
    with pytest.raises(ForecastError, match="order must be 0, 1 or 2"):
        Taylor(3)
    with pytest.raises(ForecastError, match="must differ"):
        lagrange_coefficients([2.0, 2.0], 1.0)


def _fit_synthetic(truth, **fit_options):
    # Pattern: full at 0, 1, 4; steps 2, 3, 5 are forecast. True rule: h(t) = a*h(prev2) + b*h(prev1).
    kinds = parse_pattern("110010").kinds
    fitter = ForecastFitter(kinds, history=2, **fit_options)
    gen = torch.Generator().manual_seed(0)
    for run in range(3):
        values = {}
        for step in range(6):
            if kinds[step] == StepKind.FULL:
                values[step] = torch.randn(2, 16, 8, generator=gen) * (1 + step)   # branches of unequal size
            else:
                fulls = [s for s in values if kinds[s] == StepKind.FULL][-2:]
                a, b = truth[step]
                values[step] = a * values[fulls[0]] + b * values[fulls[1]]
            fitter.observe(("c", "u"), (0, "mlp"), "mlp", step, values[step])
    return fitter.fit()


def test_fit_recovers_known_coefficients_from_synthetic_trajectories():
    affine = {2: (-0.6, 1.6), 3: (-1.2, 2.2), 5: (0.3, 0.7)}        # each sums to 1, as extrapolations do
    fitted = _fit_synthetic(affine)
    for step, (a, b) in affine.items():
        assert fitted.table[step]["mlp"] == pytest.approx([a, b], abs=1e-4), step
    free = {2: (-0.7, 1.6), 3: (-1.2, 2.1), 5: (0.3, 0.8)}
    unconstrained = _fit_synthetic(free, affine=False)
    constrained = _fit_synthetic(free)
    for step, (a, b) in free.items():
        assert unconstrained.table[step]["mlp"] == pytest.approx([a, b], abs=1e-4), step
        assert sum(constrained.table[step]["mlp"]) == pytest.approx(1.0, abs=1e-9), step


def test_fitted_json_round_trip_and_clear_errors():
    fitted = Fitted({3: {"mlp": [-0.5, 1.5], "self_attention": [1.0]}}, history=2, metadata={"model": "x"})
    back = from_json(fitted.to_json())
    assert isinstance(back, Fitted) and back.table == fitted.table and back.metadata == {"model": "x"}
    assert from_json(Taylor(2).to_json()).order == 2
    assert from_json(json.dumps({"format": "procache.forecaster", "version": 1, "kind": "none"})) is None
    for text, message in [("{", "not valid JSON"), ('{"format": "x"}', "not a forecaster"),
                          ('{"format": "procache.forecaster", "version": 9}', "version 9"),
                          ('{"format": "procache.forecaster", "version": 1, "kind": "magic"}', "unknown"),
                          ('{"format": "procache.forecaster", "version": 1, "kind": "fitted", "history": 2,'
                           ' "coefficients": {"3": {"mlp": [1, 2, 3]}}}', "coefficients must be")]:
        with pytest.raises(ForecastError, match=message):
            from_json(text)


def test_history_ring_keeps_k_values_and_streams_share_step_slots():
    state = ForecastState(Taylor(1))
    slots = [state.memory.slot_for("k", step, 10.0 - step) for step in (0, 0, 3, 3, 6)]
    assert slots == [0, 0, 1, 1, 0]                 # a step seen twice (cond, then uncond) keeps its slot
    assert [(s, slot) for s, _, slot in state.memory.entries["k"]] == [(3, 1), (6, 0)]
    plan = state.plan("k", 7, "mlp", 3.0)
    assert [slot for slot, _ in plan] == [1, 0] and sum(w for _, w in plan) == pytest.approx(1.0)


# ---- in the engine, on the reference DiT ------------------------------------------------------
def _model():
    torch.manual_seed(0)
    model = DiT(DiTConfig(depth=4, hidden=64, heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)      # wake the zero-initialised gates
    return model.eval()


LABELS = torch.tensor([1, 7])


def _run(model, pattern, **kw):
    schedule = parse_pattern(pattern)
    return sample(model, LABELS, steps=schedule.steps, cfg=2.0, seed=3, policy=SchedulePolicy(schedule),
                  return_run=True, **kw)


def test_all_full_with_a_forecaster_is_bit_identical_to_the_unpatched_model():
    model = _model()
    plain = sample(model, LABELS, steps=8, cfg=2.0, seed=3)
    for forecaster in (Taylor(1), Taylor(2)):
        out, _ = _run(model, "1" * 8, forecaster=forecaster)
        assert torch.equal(out, plain)


def test_order_zero_equals_plain_reuse_and_order_one_changes_the_result():
    model = _model()
    pattern = "1101000100"
    reuse, _ = _run(model, pattern)
    order0, _ = _run(model, pattern, forecaster=Taylor(0))
    order1, run = _run(model, pattern, forecaster=Taylor(1))
    torch.testing.assert_close(order0, reuse, rtol=0, atol=1e-6)
    assert (order1 - reuse).abs().max() > 1e-4
    assert run.cache.nbytes == 0                    # freed at the end of the run


@pytest.fixture
def held_history(monkeypatch):
    """The number of stored history tensors of each run just before they are freed."""
    from procache_core.engine import Run
    held = []
    close = Run.close

    def counting_close(self):
        held.append(sum(1 for (_, key) in self.cache._parts if "history" in key))
        return close(self)
    monkeypatch.setattr(Run, "close", counting_close)
    return held


def test_memory_stays_bounded_by_history(held_history):
    forecaster = Taylor(2)
    _run(_model(), "1" * 14, forecaster=forecaster)
    blocks, branches, streams = 4, 2, 2              # reference DiT: attention and MLP branches
    assert held_history == [blocks * branches * streams * forecaster.history]


def test_selective_steps_overwrite_the_forecast_for_recomputed_tokens():
    model = _model()
    pattern = "1" + "0" * 3 + "2" + "0" * 3
    selector = TokenSelector(ratio=1.0, staleness_weight=0)
    sched = Schedule(kinds=parse_pattern(pattern).kinds)
    with_sel, _ = sample(model, LABELS, steps=8, cfg=2.0, seed=3, policy=SchedulePolicy(sched, deep_fraction=1.0),
                         selector=selector, forecaster=Taylor(0), return_run=True)
    plain_sel = sample(model, LABELS, steps=8, cfg=2.0, seed=3, policy=SchedulePolicy(sched, deep_fraction=1.0),
                       selector=selector)
    # Order 0 plus corrections is exactly the plain cache updated in place by selective steps.
    torch.testing.assert_close(with_sel, plain_sel, rtol=0, atol=1e-6)


# ---- the online forecaster --------------------------------------------------------------------
SIGMAS = [1.0, 0.9, 0.75, 0.6, 0.45, 0.3, 0.2, 0.1, 0.0]


def _stored_forecast(state, cache, streams, key, step, sigma):
    from procache_core.forecast import combine
    return combine(cache, streams, key, state.plan(key, step, "mlp", sigma))


def test_chebyshev_basis_values():
    from procache_core.forecast import chebyshev
    x = 0.3
    assert chebyshev(x, 3) == pytest.approx([1.0, x, 2 * x * x - 1, 4 * x ** 3 - 3 * x])
    assert chebyshev(-0.7, 1) == [1.0, -0.7]


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_online_fit_is_exact_for_polynomials_of_its_degree_in_step_position(degree):
    gen = torch.Generator().manual_seed(degree)
    coeffs = torch.randn(degree + 1, 2, 4, 3, generator=gen)
    state = ForecastState(Online(degree, forgetting=0.7, ridge=0.0), SIGMAS)
    position = state.memory.position

    def trajectory(sigma):
        x = position(sigma)
        return sum(c * x ** p for p, c in enumerate(coeffs))

    cache, streams, key = CacheStore(), ("c", "u"), (0, "mlp")
    full_steps = [0, 1, 3, 4, 6]
    for step in full_steps:
        state.store(cache, streams, key, step, SIGMAS[step], trajectory(SIGMAS[step]))
    for step in (5, 7):
        torch.testing.assert_close(_stored_forecast(state, cache, streams, key, step, SIGMAS[step]),
                                   trajectory(SIGMAS[step]), rtol=1e-4, atol=1e-4)
    # A second evaluation inside a step (sigma between two schedule entries) is placed in between.
    assert position(0.675) == pytest.approx((position(0.75) + position(0.6)) / 2)
    # Constant memory: degree + 1 sums and the latest value per stream, however many full steps.
    assert len(cache) == len(streams) * (degree + 2)


def test_online_with_one_value_is_plain_reuse_and_streams_apart_match_streams_together():
    gen = torch.Generator().manual_seed(0)
    values = {step: torch.randn(2, 5, 3, generator=gen) for step in (0, 2, 3)}
    together, apart = ForecastState(Online(2)), ForecastState(Online(2))
    cache_t, cache_a, key = CacheStore(), CacheStore(), (1, "attn")
    for i, step in enumerate((0, 2, 3)):
        together.store(cache_t, ("c", "u"), key, step, SIGMAS[step], values[step])
        cond, uncond = values[step].chunk(2)
        apart.store(cache_a, ("u",), key, step, SIGMAS[step], uncond)
        apart.store(cache_a, ("c",), key, step, SIGMAS[step], cond)
        apart.store(cache_a, ("c",), key, step, SIGMAS[step], cond)        # a repeated call adds nothing
        if i == 0:
            torch.testing.assert_close(_stored_forecast(together, cache_t, ("c", "u"), key, 1, SIGMAS[1]),
                                       values[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(_stored_forecast(together, cache_t, ("c", "u"), key, 4, SIGMAS[4]),
                               _stored_forecast(apart, cache_a, ("c", "u"), key, 4, SIGMAS[4]), rtol=1e-5, atol=1e-6)


def test_online_json_round_trip_and_bad_settings():
    back = from_json(Online(3, 0.25, 1e-2).to_json())
    assert isinstance(back, Online) and (back.degree, back.forgetting, back.ridge) == (3, 0.25, 1e-2)
    for kwargs, message in [({"degree": 0}, "degree must be"), ({"degree": 9}, "degree must be"),
                            ({"forgetting": 0.0}, "forgetting must be"), ({"forgetting": 1.5}, "forgetting must be"),
                            ({"ridge": -1.0}, "ridge must be")]:
        with pytest.raises(ForecastError, match=message):
            Online(**kwargs)
    with pytest.raises(ForecastError, match="online"):
        from_json('{"format": "procache.forecaster", "version": 1, "kind": "online", "degree": "x"}')
    # Without ridge, two values at one position leave the fit singular: the unit reuses its latest value.
    state, cache = ForecastState(Online(1, ridge=0.0)), CacheStore()
    state.store(cache, ("c",), ("k",), 0, 0.5, torch.ones(1, 2))
    state.store(cache, ("c",), ("k",), 1, 0.5, torch.zeros(1, 2))
    assert state.plan(("k",), 2, "mlp", 0.25) == [("latest", 1.0)]


def test_online_forecaster_in_the_engine_differs_from_reuse_and_holds_degree_plus_two_tensors(held_history):
    model = _model()
    pattern = "11010101011011"
    reuse, _ = _run(model, pattern)
    online, run = _run(model, pattern, forecaster=Online(3))
    assert torch.isfinite(online).all() and (online - reuse).abs().max() > 1e-4
    assert run.cache.nbytes == 0
    blocks, branches, streams = 4, 2, 2
    assert held_history[-1] == blocks * branches * streams * (3 + 2)       # 4 sums and the latest value, 9 full steps
    all_full, _ = _run(model, "1" * 8, forecaster=Online(2))
    assert torch.equal(all_full, sample(model, LABELS, steps=8, cfg=2.0, seed=3))


# ---- sampler awareness and the per-unit guard -------------------------------------------------
def test_sampler_table_damps_or_switches_off_extrapolation_and_says_so():
    from procache_core.forecast import DAMPING, SAMPLER_KIND, sampler_name
    assert sampler_name("sample_dpmpp_sde") == "dpmpp_sde" and sampler_name("sample_unipc") == "uni_pc"
    assert sampler_name("dpm_adaptive_function") == "dpm_adaptive"
    for function, kind in [("sample_euler", "ode"), ("sample_dpmpp_2m", "multistep"),
                           ("sample_unipc_bh2", "multistep"), ("sample_dpmpp_sde", "sde"), ("sample_er_sde", "sde"),
                           ("sample_euler_ancestral", "ancestral")]:
        assert SAMPLER_KIND[sampler_name(function)] == kind
        state = ForecastState(Taylor(1))
        notes = state.use_sampler(function)
        assert state.damping == DAMPING[kind]
        assert bool(notes) == (DAMPING[kind] < 1.0)
    state = ForecastState(Online(2))
    assert "forecast off under dpmpp_sde" in state.use_sampler("sample_dpmpp_sde")[0]
    _cache = CacheStore()
    state.memory.keep(_cache, ("c",), ("k",), 0, 1.0, torch.ones(1, 2, 2))
    state.memory.keep(_cache, ("c",), ("k",), 1, 0.5, torch.zeros(1, 2, 2))
    assert state.plan(("k",), 2, "mlp", 0.25) == [("latest", 1.0)]          # off: plain reuse of the latest
    state.damping = 0.5
    damped = _stored_forecast(state, _cache, ("c",), ("k",), 2, 0.25)
    state.damping = 1.0
    undamped = _stored_forecast(state, _cache, ("c",), ("k",), 2, 0.25)
    torch.testing.assert_close(damped, undamped * 0.5)                     # latest + 0.5 (forecast - latest)
    unknown = ForecastState(Taylor(1))
    assert "not in ProCache's sampler table" in unknown.use_sampler("sample_my_own")[0] and unknown.damping == 1.0
    off = ForecastState(Taylor(1).with_safeguards(True, sampler_aware=False))
    assert off.use_sampler("sample_dpmpp_sde") == [] and off.damping == 1.0


NOISY, LINEAR = ("noisy",), ("linear",)


def test_guard_makes_a_unit_whose_forecasts_miss_more_than_reuse_reuse():
    state, cache, streams = ForecastState(Taylor(1)), CacheStore(), ("c",)
    gen = torch.Generator().manual_seed(0)
    noisy = [torch.randn(1, 4, 4, generator=gen) for _ in range(5)]           # no trend: extrapolation overshoots
    linear = [torch.full((1, 4, 4), 1.0 - 0.1 * step) for step in range(5)]   # a trend Taylor 1 follows exactly
    for step in range(5):
        state.store(cache, streams, NOISY, step, SIGMAS[step], noisy[step])
        state.store(cache, streams, LINEAR, step, 1.0 - 0.1 * step, linear[step])
    assert state.reusing == {NOISY}
    latest = state.memory.latest(NOISY)
    assert state.plan(NOISY, 5, "mlp", SIGMAS[5]) == [(latest, 1.0)]
    assert len(state.plan(LINEAR, 5, "mlp", 0.5)) == 2
    assert "1 of 2 units reused" in state.report()[0]
    # Forecasts that catch up again (the noisy unit turns linear) bring the unit back.
    for step in range(5, 14):
        state.store(cache, streams, NOISY, step, 1.0 - 0.1 * step, torch.full((1, 4, 4), 5.0 - 0.5 * step))
    assert state.reusing == set() and len(state.plan(NOISY, 14, "mlp", -0.4)) == 2
    unguarded = ForecastState(Taylor(1).with_safeguards(False, True))
    for step in range(5):
        unguarded.store(cache, streams, NOISY, step, SIGMAS[step], noisy[step])
    assert unguarded.reusing == set() and unguarded.report() == []


def test_a_second_evaluation_of_a_full_step_is_labelled_with_its_own_noise_level():
    state = ForecastState(Taylor(1))
    state.memory.slot_for("k", 0, 1.0)
    state.memory.slot_for("k", 0, 0.95)          # dpmpp_sde / heun: the step's later model call
    assert state.memory.entries["k"] == [(0, 0.95, 0)]
