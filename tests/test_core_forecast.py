"""Forecasting cached branches: Taylor extrapolation, least-squares fitting, engine semantics."""
import json

import pytest
import torch

from procache_core import Schedule, SchedulePolicy, StepKind, TokenSelector, parse_pattern
from procache_core.forecast import (Fitted, ForecastError, ForecastFitter, ForecastState, Taylor, from_json,
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
    slots = [state.slot_for("k", step, 10.0 - step) for step in (0, 0, 3, 3, 6)]
    assert slots == [0, 0, 1, 1, 0]                 # a step seen twice (cond, then uncond) keeps its slot
    assert [(s, slot) for s, _, slot in state.entries["k"]] == [(3, 1), (6, 0)]
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


def test_memory_stays_bounded_by_history(monkeypatch):
    from procache_core.engine import Run
    held = []
    close = Run.close

    def counting_close(self):          # count the stored history tensors just before they are freed
        held.append(sum(1 for (_, key) in self.cache._parts if "history" in key))
        return close(self)
    monkeypatch.setattr(Run, "close", counting_close)
    forecaster = Taylor(2)
    _run(_model(), "1" * 14, forecaster=forecaster)
    blocks, branches, streams = 4, 2, 2              # reference DiT: attention and MLP branches
    assert held == [blocks * branches * streams * forecaster.history]


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
