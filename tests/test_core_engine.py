import math

import pytest
import torch

from procache_core import (CacheStore, Schedule, SchedulePolicy, StepClock, TokenSelector, find_family,
                           parse_pattern, uniform)
from procache_core.reference.dit import DiT, DiTConfig
from procache_core.tokens import SelectionContext, spatial_bonus
from procache_core.reference.sampling import sample

SIGMAS = [14.6, 8.0, 4.1, 2.0, 0.9, 0.3, 0.0]


def _calls(kind):
    """(sigma of each model call, step each belongs to) for common sampler shapes."""
    steps = len(SIGMAS) - 1
    calls = []
    for k in range(steps):
        calls.append((SIGMAS[k], k))
        if kind == "heun" and SIGMAS[k + 1] > 0:
            calls.append((SIGMAS[k + 1], k))              # corrector lands on the next step's sigma
        if kind == "2s" and SIGMAS[k + 1] > 0:
            calls.append((math.sqrt(SIGMAS[k] * SIGMAS[k + 1]), k))
    return calls


@pytest.mark.parametrize("kind", ["euler", "heun", "2s"])
def test_clock_with_sampler_callbacks(kind):
    clock = StepClock(SIGMAS)
    calls = _calls(kind)
    seen = []
    for i, (sigma, expected) in enumerate(calls):
        seen.append(clock.step_for(sigma))
        last_of_step = i + 1 == len(calls) or calls[i + 1][1] != expected
        if last_of_step:
            clock.step_finished(expected)
    assert seen == [e for _, e in calls]


@pytest.mark.parametrize("streams", [[("c", "u")], [("c",), ("u",)]])
def test_clock_heun_reported_after_its_first_call(streams):
    """ComfyUI's heun reports step k after the predictor; the corrector then lands exactly on
    sigma_{k+1} (once per CFG stream when they run apart) and still belongs to step k."""
    clock = StepClock(SIGMAS)
    clock.corrector_at_next_sigma = True
    seen = []
    for k in range(len(SIGMAS) - 1):
        seen += [clock.step_for(SIGMAS[k], s) for s in streams]
        clock.step_finished(k)
        if SIGMAS[k + 1] > 0:
            seen += [clock.step_for(SIGMAS[k + 1], s) for s in streams]
    want = []
    for k in range(len(SIGMAS) - 1):
        want += [k] * len(streams) * (2 if SIGMAS[k + 1] > 0 else 1)
    assert seen == want
    plain = StepClock(SIGMAS)          # without the flag the corrector call is taken for step k+1
    plain.step_for(SIGMAS[0])
    plain.step_finished(0)
    assert plain.step_for(SIGMAS[1]) == 1


def test_clock_without_callbacks_follows_sigmas():
    clock = StepClock(SIGMAS, callback_driven=False)
    assert [clock.step_for(s) for s in SIGMAS[:-1]] == list(range(6))


def test_cache_keeps_streams_apart_in_any_order():
    store = CacheStore()
    value = torch.arange(12.0).view(2, 3, 2)       # rows: cond, uncond
    store.put(("c", "u"), "k", value)
    assert torch.equal(store.get(("c", "u"), "k"), value)
    assert torch.equal(store.get(("u", "c"), "k"), value.flip(0))
    assert torch.equal(store.get(("u",), "k"), value[1:])
    assert store.get(("c", "x"), "k") is None
    store.clear()
    assert len(store) == 0 and store.get(("c",), "k") is None


def _model(depth=4):
    torch.manual_seed(0)
    m = DiT(DiTConfig(depth=depth, hidden=64, heads=2))
    m.reset_parameters(zero_gates=False)
    return m.eval()


def _count_branch_calls(model):
    # Hooks sit inside the branches: the branch modules themselves are still called on reuse
    # steps (they hand back the cache), their inner layers are not.
    counts = {"attn": 0, "mlp": 0}
    hooks = [b.attn.qkv.register_forward_hook(lambda *a: counts.__setitem__("attn", counts["attn"] + 1))
             for b in model.blocks]
    hooks += [b.mlp.fc1.register_forward_hook(lambda *a: counts.__setitem__("mlp", counts["mlp"] + 1))
              for b in model.blocks]
    return counts, hooks


def test_all_full_is_bit_identical_and_model_untouched():
    m = _model()
    labels = torch.tensor([1, 7])
    base = sample(m, labels, steps=8)
    full = sample(m, labels, steps=8, policy=SchedulePolicy(uniform(8, 1)))
    assert torch.equal(base, full)
    assert not any("forward" in mod.__dict__ for mod in m.modules())


def test_reuse_steps_skip_branches_and_work_matches_theory():
    m = _model()
    schedule = parse_pattern("1,0,0,1,0,0,1,0")
    counts, hooks = _count_branch_calls(m)
    x, run = sample(m, torch.tensor([3]), steps=8, policy=SchedulePolicy(schedule), return_run=True)
    for h in hooks:
        h.remove()
    assert counts == {"attn": 3 * 4, "mlp": 3 * 4}        # 3 full steps x 4 blocks, one batched CFG call
    assert run.stats.flops_speedup == pytest.approx(schedule.theoretical_speedup())
    assert run.stats.summary()["actual"]["stream 0"] == "FRRFRRFR"
    base = sample(m, torch.tensor([3]), steps=8)
    assert not torch.equal(x, base)                        # reuse really changed something
    assert len(run.cache) == 0                             # freed at the end of the run


def test_selective_ratio_one_equals_recomputing_token_wise_branches():
    """A selective step at ratio 1 recomputes the MLP of deep blocks for every token: the same as a
    step where deep blocks recompute MLP and reuse only attention."""
    m = _model()
    schedule = Schedule(kinds=(1, 2))
    x_sel = sample(m, torch.tensor([2]), steps=2, policy=SchedulePolicy(schedule, deep_fraction=1.0),
                   selector=TokenSelector(ratio=1.0))

    # Reference: run step 1 with every MLP fresh and every attention cached, by hand.
    cached = {}
    hooks = [b.attn.register_forward_hook(lambda mod, i, o, k=k: cached.setdefault(k, o)) for k, b in enumerate(m.blocks)]
    sample(m, torch.tensor([2]), steps=1)                 # fills `cached` at the first step's input
    for h in hooks:
        h.remove()
    originals = [b.attn.forward for b in m.blocks]
    x_ref = None
    try:
        calls = {"n": 0}

        def make(k, orig):
            def fwd(*a):
                calls["n"] += 1
                return orig(*a) if calls["n"] <= len(m.blocks) else cached[k]
            return fwd
        for k, b in enumerate(m.blocks):
            b.attn.forward = make(k, originals[k])
        x_ref = sample(m, torch.tensor([2]), steps=2)
    finally:
        for b in m.blocks:
            b.attn.__dict__.pop("forward", None)
    assert torch.allclose(x_sel, x_ref, atol=1e-5)


def test_selective_ratio_zero_equals_reuse():
    m = _model()
    reuse = sample(m, torch.tensor([5]), steps=4, policy=SchedulePolicy(Schedule(kinds=(1, 0, 0, 0))))
    selective = sample(m, torch.tensor([5]), steps=4, policy=SchedulePolicy(Schedule(kinds=(1, 0, 2, 0))),
                       selector=TokenSelector(ratio=0.0))
    assert torch.equal(reuse, selective)


def test_selective_recomputes_only_deep_blocks_for_selected_tokens():
    m = _model(depth=8)
    rows = []
    hooks = [b.mlp.fc1.register_forward_hook(lambda mod, i, o, k=k: rows.append((k, i[0].shape[1])))
             for k, b in enumerate(m.blocks)]
    sample(m, torch.tensor([4]), steps=3, policy=SchedulePolicy(Schedule(kinds=(1, 0, 2)), deep_fraction=0.25),
           selector=TokenSelector(ratio=0.25))
    for h in hooks:
        h.remove()
    tokens = m.cfg.tokens
    assert rows[:8] == [(k, tokens) for k in range(8)]               # full step
    assert rows[8:] == [(6, tokens // 4), (7, tokens // 4)]          # selective step: deepest 2 of 8


def _ctx(tokens, cached=None, **kw):
    base = dict(tokens=tokens, cached=tokens if cached is None else cached, reference=None, staleness=None,
                step=0, steps=10, block=0, blocks=4, role="mlp", streams=1)
    base.update(kw)
    return SelectionContext(**base)


def test_top_k_selection_by_score_and_shared_streams():
    x = torch.zeros(2, 10, 4)
    x[0, [2, 5, 7]] = 5.0
    x[1, [1, 3, 4]] = 5.0
    sel = TokenSelector(ratio=0.3, score="input_norm", staleness_weight=0)
    assert sel.select(_ctx(x)).tolist() == [[2, 5, 7], [1, 3, 4]]
    by_output = TokenSelector(ratio=0.3, score="output_norm", staleness_weight=0)
    assert by_output.select(_ctx(torch.zeros(2, 10, 4), cached=x)).tolist() == [[2, 5, 7], [1, 3, 4]]
    noisy = x + torch.rand(2, 10, 4) * 0.01
    shared = TokenSelector(ratio=0.3, score="input_norm", shared_streams=True).select(_ctx(noisy, streams=2))
    assert shared[0].tolist() == shared[1].tolist()
    own = TokenSelector(ratio=0.3, score="input_norm", shared_streams=False).select(_ctx(noisy, streams=2))
    assert own[0].tolist() != own[1].tolist()


def test_change_score_staleness_and_spatial_bonus():
    ref = torch.ones(1, 16, 4)
    now = ref.clone()
    now[0, 9] += 3.0
    sel = TokenSelector(ratio=1 / 16, score="change", staleness_weight=0)
    assert sel.select(_ctx(now, reference=ref)).tolist() == [[9]]
    stale = torch.zeros(1, 16, dtype=torch.int32)
    stale[0, 4] = 40                       # never refreshed for a long time: outranks the change
    with_stale = TokenSelector(ratio=1 / 16, score="change", staleness_weight=0.25)
    assert with_stale.select(_ctx(now, reference=ref, staleness=stale)).tolist() == [[4]]
    flat = torch.ones(1, 16)
    boosted = spatial_bonus(flat + torch.arange(16.0) * 1e-3, grid=2, bonus=0.6)
    assert (boosted > 1.5).sum() == 4      # one token in each of the four 2x2 cells


def test_toca_ratio_schedule_grows_late_and_deep():
    sel = TokenSelector(ratio=0.07, ratio_schedule="toca")
    assert sel.ratio_at(10, 50, 21, 28, "mlp") == 0.0             # the method's early zero-ratio steps
    assert sel.ratio_at(14, 50, 21, 28, "mlp") == pytest.approx(0.039, abs=5e-4)   # method.md §3.11
    late, early = sel.ratio_at(35, 50, 21, 28, "mlp"), sel.ratio_at(14, 50, 21, 28, "mlp")
    assert late > early > 0
    assert sel.ratio_at(35, 50, 27, 28, "mlp") > late
    assert sel.ratio_at(35, 50, 21, 28, "cross_attention") < late
    with pytest.raises(ValueError, match="score"):
        TokenSelector(score="nope")


def test_family_detection_and_fallback_message():
    assert find_family(_model())[0].name == "reference-dit"
    family, sentence = find_family(torch.nn.Linear(2, 2))
    assert family is None and "model-level" in sentence


def test_steps_computed_in_full_after_an_out_of_memory_count_as_full_steps():
    from procache_core.clock import StepClock
    from procache_core.schedule import StepKind
    from procache_core.stats import RunStats
    planned = [StepKind.FULL, StepKind.REUSE, StepKind.REUSE, StepKind.FULL, StepKind.REUSE, StepKind.REUSE]
    stats = RunStats(planned)
    clock = StepClock([6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    for step, kind in enumerate(planned[:3]):
        stats.record_call(step, ["cond"], kind, 0.1, 10.0 if kind == StepKind.FULL else 0.0, 10.0, 0)
        clock.step_finished(step)
    stats.record_call(3, ["cond"], StepKind.FULL, 0.05, 4.0, 4.0, 0)     # the call that ran out of memory
    stats.computed_in_full_from(3, clock)
    assert stats.summary()["actual"] == {"stream 0": "FRRF--"}       # step 3 runs again in full at once
    clock.step_finished(3)
    clock.step_finished(4)                                            # then the run is cancelled
    summary = stats.summary()
    assert summary["actual"] == {"stream 0": "FRRFF-"} and summary["counts"]["full"] == 3
    assert summary["compute_share"] == [1.0, 0.0, 0.0, 1.0, 1.0, None]
    assert summary["recovered_at_step"] == 3
    assert stats.flops_speedup == pytest.approx(50.0 / 30.0)        # 5 steps of work 10, 3 of them computed


def _stats_after(steps_run: int, ending: str = "complete", overhead: float = 0.41):
    """RunStats of a 10-step run with 4 full steps of which the first `steps_run` ran: full steps take
    1 s, reused steps 0.25 s, both CFG streams in one batch; `overhead` seconds outside the model."""
    from procache_core.stats import RunStats
    schedule = parse_pattern("1,0,0,1,0,0,1,0,0,1")
    stats = RunStats(list(schedule.kinds), mode="branch:pixart", model="PixArtSigma")
    for step in range(steps_run):
        kind = schedule.kinds[step]
        full = kind == 1
        stats.record_call(step, ("positive:a", "negative:b"), kind, 1.0 if full else 0.25,
                          flops_done=10.0 if full else 0.0, flops_full=10.0, misses=0)
    stats.wall_seconds = sum(r.seconds for r in stats.steps) + overhead
    stats.ending = ending
    return stats


def test_run_statistics_of_a_cancelled_run_cover_only_the_steps_that_ran():
    summary = _stats_after(5, "cancelled").summary()
    assert summary["status"] == "cancelled" and summary["steps_run"] == 5 and summary["steps"] == 10
    assert summary["seconds_per_step"] == [1.0, 0.25, 0.25, 1.0, 0.25] + [None] * 5
    # model time 2.75 s + 0.41 s outside it; without caching the 5 steps take 5 x 1 s + 0.41 s
    assert summary["sampling_seconds"] == pytest.approx(3.16)
    assert summary["seconds_without"] == pytest.approx(5.41)
    assert summary["speedup"] == pytest.approx(5.41 / 3.16, abs=1e-4)
    assert summary["schedule_speedup"] == 2.5 and summary["flops_speedup"] == 2.5     # 5 steps, 2 full
    assert summary["headline"] == ("cancelled after 5 of 10 steps; over those: about 1.7x faster, "
                                   "sampling 3.2 s (about 5.4 s without)")
    assert summary["actual"] == {"stream 0": "FRRFR-----", "stream 1": "FRRFR-----"}
    assert summary["stream_labels"] == {"stream 0": "positive", "stream 1": "negative"}
    assert "cancelled after 5 of 10 steps" in _stats_after(5, "cancelled").line()


def test_run_statistics_name_complete_failed_and_partial_runs():
    complete = _stats_after(10).summary()
    assert complete["status"] == "complete" and complete["error"] == ""
    assert complete["headline"] == "about 1.8x faster, sampling 5.9 s (about 10 s without)"   # 10.41 / 5.91 s
    assert complete["schedule_speedup"] == 2.5
    failed = _stats_after(3, "failed: RuntimeError: boom").summary()
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom"
    assert failed["headline"].startswith("failed after 3 of 10 steps; over those: about")
    partial = _stats_after(9).summary()
    assert partial["status"] == "partial" and partial["headline"].startswith("stopped after 9 of 10 steps")
    assert _stats_after(0, "cancelled").summary()["headline"] == "cancelled: no step ran"


def test_stream_labels_number_a_role_seen_twice():
    from procache_core.stats import stream_labels
    streams = ["positive-0", "positive-1", "negative-0", "all"]
    names = {s: f"stream {i}" for i, s in enumerate(streams)}
    assert stream_labels(streams, names) == {"stream 0": "positive 1", "stream 1": "positive 2",
                                             "stream 2": "negative", "stream 3": "stream 3"}
