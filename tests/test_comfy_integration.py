"""ProCache inside a real ComfyUI on tiny PixArt, Flux and Wan models built from ComfyUI's own classes.

What a user relies on: an all-full schedule changes nothing; reuse steps really skip the expensive
branches, by exactly the schedule's share; CFG streams keep their own cache whether ComfyUI batches
cond and uncond or runs them apart; batches, samplers, partial runs and repeated runs are handled;
the input MODEL is never touched; bad input is refused before anything is patched.
"""
import copy

import pytest
import torch

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

FAMILIES = ("pixart", "flux", "wan")
PATTERN = (1, 0, 0, 1, 0, 1)        # 3 full of 6: theoretical speedup 2.0
HW = {"pixart": 40, "flux": 16, "wan": 8}      # latent sizes (PixArt needs >= 40 for its position embedding)


@pytest.fixture(scope="module")
def pack():
    comfy_env.load_pack()
    import procache_comfyui
    return procache_comfyui


@pytest.fixture
def runs(monkeypatch):
    """Every Run a sampling run builds, in order (the run statistics with per-step call counts)."""
    from procache_comfyui.nodes import runtime
    seen, start_run = [], runtime.start_run
    monkeypatch.setattr(runtime, "start_run", lambda *a, **k: seen.append(start_run(*a, **k)) or seen[-1])
    return seen


def _attach(mp, kinds):
    from procache_comfyui.nodes import runtime
    from procache_comfyui.procache_core import Schedule
    return runtime.attach(mp, runtime.ApplyConfig(schedule=Schedule(kinds=tuple(kinds))))


def _apply_node(pack, mp, pattern):
    from procache_comfyui.procache_core import parse_pattern
    return pack.nodes.apply_node.ProCacheApply.execute(mp, parse_pattern(pattern), 0.0, 1.0, False, False).result[0]


def _expensive_modules(mp, family):
    """The first linear layer of the attention and MLP work of every block (what a reuse step must
    not run). Not the branch modules themselves: their calls are intercepted, so hooks on them fire."""
    dm = mp.model.diffusion_model
    if family == "pixart":
        branches = [m for b in dm.blocks for m in (b.attn, b.cross_attn, b.mlp)]
    elif family == "wan":
        branches = [m for b in dm.blocks for m in (b.self_attn, b.cross_attn, b.ffn)]
    else:
        branches = ([m for b in dm.double_blocks for m in (b.img_attn.qkv, b.txt_attn.qkv, b.img_mlp, b.txt_mlp)]
                    + [m for b in dm.single_blocks for m in (b.linear1, b.linear2)])
    return [next(m for m in branch.modules() if isinstance(m, torch.nn.Linear)) for branch in branches]


def _sample(patcher, family, **kw):
    """comfy_env.sample at this file's small sizes (seconds on two CPU cores)."""
    kw.setdefault("hw", HW[family])
    return comfy_env.sample(patcher, family, **kw)


def _instance_forwards(mp):
    return [name for name, m in mp.model.diffusion_model.named_modules() if "forward" in m.__dict__]


def _letters(kinds):
    return "".join("RFS"[int(k)] for k in kinds)


# ---- (a) all-full is the unpatched model ---------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_all_full_schedule_is_bit_identical(pack, family):
    mp = comfy_env.make_patcher(family)
    plain = _sample(mp, family, steps=4)
    assert torch.equal(_sample(_apply_node(pack, mp, "1111"), family, steps=4), plain)
    assert _instance_forwards(mp) == []


# ---- (b) reuse steps skip the expensive branches, by the schedule's share -------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_counted_work_matches_the_theoretical_speedup(pack, family, runs):
    from procache_comfyui.procache_core import Schedule
    mp = comfy_env.make_patcher(family)
    modules = _expensive_modules(mp, family)
    per_step, step = [], {"now": 0}

    def count(module, args, output):
        per_step[step["now"]] += 1

    def next_step(i, *args):
        step["now"] = min(i + 1, len(PATTERN) - 1)
    hooks = [m.register_forward_hook(count) for m in modules]
    try:
        import comfy.sample
        lat, pos, neg = comfy_env.latent_and_conds(family, hw=HW[family])
        noise = comfy.sample.prepare_noise(lat, 0)
        per_step[:] = [0] * len(PATTERN)
        comfy.sample.sample(_attach(mp, [1] * len(PATTERN)), noise, len(PATTERN), 2.0, "euler", "simple", pos, neg,
                            lat, seed=0, disable_pbar=True, callback=next_step)
        full = list(per_step)
        step["now"], per_step[:] = 0, [0] * len(PATTERN)
        comfy.sample.sample(_attach(mp, PATTERN), noise, len(PATTERN), 2.0, "euler", "simple", pos, neg,
                            lat, seed=0, disable_pbar=True, callback=next_step)
        cached = list(per_step)
    finally:
        for h in hooks:
            h.remove()
    assert full == [len(modules)] * len(PATTERN)        # one batched call (cond + uncond) per step
    assert cached == [len(modules) if k else 0 for k in PATTERN]
    theoretical = Schedule(kinds=PATTERN).theoretical_speedup()
    assert sum(full) / sum(cached) == pytest.approx(theoretical)
    assert runs[-1].stats.flops_speedup == pytest.approx(theoretical, rel=1e-6)
    assert runs[-1].stats.summary()["actual"]["stream 0"] == _letters(PATTERN)


# ---- (c) CFG batched together and run apart ------------------------------------------------------
class _NoFreeMemory:
    """comfy.samplers' view of model_management with no free memory: only the sampler's batching
    decision sees it (attention still sees the real module)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def get_free_memory(self, *args, **kwargs):
        return 0


def _sample_apart(monkeypatch, patcher, family, **kw):
    """ComfyUI batches cond and uncond only when it thinks memory allows: with no free memory
    reported it runs them as separate model calls."""
    import comfy.samplers
    with monkeypatch.context() as m:
        m.setattr(comfy.samplers, "model_management", _NoFreeMemory(comfy.samplers.model_management))
        return _sample(patcher, family, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_streams_cache_apart_whether_batched_or_not(pack, family, runs, monkeypatch):
    mp = comfy_env.make_patcher(family)
    steps = len(PATTERN)
    plain_batched = _sample(mp, family, steps=steps)
    plain_apart = _sample_apart(monkeypatch, mp, family, steps=steps)
    batched = _sample(_attach(mp, PATTERN), family, steps=steps)
    batched_run = runs[-1]
    apart = _sample_apart(monkeypatch, _attach(mp, PATTERN), family, steps=steps)
    apart_run = runs[-1]
    assert [r.calls for r in batched_run.stats.steps] == [1] * steps
    assert [r.calls for r in apart_run.stats.steps] == [2] * steps           # really run apart
    for run in (batched_run, apart_run):
        actual = run.stats.summary()["actual"]
        assert len(actual) == 2 and set(actual.values()) == {_letters(PATTERN)}   # each stream by the schedule
    # Batching itself moves the result by float rounding only; caching per stream keeps it so.
    rounding = (plain_batched - plain_apart).abs().max().item()
    assert (batched - apart).abs().max().item() <= max(10 * rounding, 1e-5)
    assert (batched - plain_batched).abs().max().item() > 3 * max(10 * rounding, 1e-5)    # caching did act
    # all-full run apart is still the unpatched model run apart
    assert torch.equal(_sample_apart(monkeypatch, _attach(mp, [1] * steps), family, steps=steps), plain_apart)


def test_streams_are_not_shared_between_cond_and_uncond(pack, runs, monkeypatch):
    """Run apart, a cache keyed by batch position would hand the cond's branches to the uncond call."""
    mp = comfy_env.make_patcher("flux")
    _sample_apart(monkeypatch, _attach(mp, PATTERN), "flux", steps=len(PATTERN))
    cache_streams = set(runs[-1].stats.streams)
    assert len(cache_streams) == 2


# ---- (d) batch 2 -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_two(pack, family):
    mp = comfy_env.make_patcher(family)
    plain = _sample(mp, family, steps=len(PATTERN), batch=2)
    assert torch.equal(_sample(_attach(mp, [1] * len(PATTERN)), family, steps=len(PATTERN), batch=2), plain)
    cached2 = _sample(_attach(mp, PATTERN), family, steps=len(PATTERN), batch=2)
    cached1 = _sample(_attach(mp, PATTERN), family, steps=len(PATTERN), batch=1)
    plain1 = _sample(mp, family, steps=len(PATTERN), batch=1)
    # the first image of the batch saw the same noise as the single image: caching mixes no images
    rounding = (plain[:1] - plain1).abs().max().item()
    assert (cached2[:1] - cached1).abs().max().item() <= max(10 * rounding, 1e-5)
    assert not torch.allclose(cached2[0], cached2[1])


# ---- (e) samplers and the step clock --------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
@pytest.mark.parametrize("family", FAMILIES)
def test_samplers_all_full_identical_and_cached_finite(pack, family, sampler):
    mp = comfy_env.make_patcher(family)
    plain = _sample(mp, family, steps=len(PATTERN), sampler=sampler)
    assert torch.equal(_sample(_attach(mp, [1] * len(PATTERN)), family, steps=len(PATTERN), sampler=sampler),
                       plain)
    cached = _sample(_attach(mp, PATTERN), family, steps=len(PATTERN), sampler=sampler)
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)


SECOND_ORDER = ("heun", "dpmpp_2s_ancestral", "dpmpp_sde")     # two model calls per step, one on the last


def _model_calls(mp, sample):
    calls = []
    hook = mp.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        sample()
    finally:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize("sampler,denoise,window,apart", [
    ("euler", 1.0, None, False), ("heun", 1.0, None, False), ("dpmpp_2s_ancestral", 1.0, None, False),
    ("dpmpp_sde", 1.0, None, False), ("dpmpp_2m", 1.0, None, False), ("euler", 0.6, None, False),
    ("heun", 0.6, None, False), ("euler", 1.0, (2, 5), False), ("heun", 1.0, (3, 6), False),
    ("heun", 1.0, None, True), ("dpmpp_2s_ancestral", 1.0, None, True),
])
def test_step_clock_follows_the_sampler(pack, runs, monkeypatch, sampler, denoise, window, apart):
    import comfy.sample
    mp = comfy_env.make_patcher("flux")
    kinds = (1, 0, 0, 1, 0, 0)
    patched = _attach(mp, kinds)
    lat, pos, neg = comfy_env.latent_and_conds("flux", hw=HW["flux"])
    noise = comfy.sample.prepare_noise(lat, 0)
    start, last = window or (None, None)

    def sample():
        return comfy.sample.sample(patched, noise, len(kinds), 2.0, sampler, "simple", pos, neg, lat, denoise=denoise,
                                   start_step=start, last_step=last, seed=0, disable_pbar=True)
    if apart:
        import comfy.samplers
        monkeypatch.setattr(comfy.samplers, "model_management", _NoFreeMemory(comfy.samplers.model_management))
    total = _model_calls(mp, sample)
    run = runs[-1]
    planned = list(kinds[start:last] if window else kinds)
    planned[0] = 1                                   # a run's first step is full: its cache starts empty
    # Second-order samplers evaluate the model twice per step; the last step (down to sigma 0) once.
    per_step = 2 if sampler in SECOND_ORDER else 1
    expected = [n * (2 if apart else 1) for n in [per_step] * (len(planned) - 1) + [1]]
    assert sum(expected) == total
    assert [r.calls for r in run.stats.steps] == expected
    summary = run.stats.summary()
    assert summary["planned"] == "".join(str(k) for k in planned)
    assert summary["actual"]["stream 0"] == _letters(planned)


# ---- (f) nothing stale between runs -----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_runs_in_a_row_and_another_resolution_reuse_nothing_stale(pack, family):
    mp = comfy_env.make_patcher(family)
    patched = _attach(mp, PATTERN)
    other = HW[family] + (4 if family != "wan" else 2)
    first = _sample(patched, family, steps=len(PATTERN))
    second = _sample(patched, family, steps=len(PATTERN), seed=1)
    resized = _sample(patched, family, steps=len(PATTERN), hw=other)
    again = _sample(patched, family, steps=len(PATTERN))
    fresh = lambda **kw: _sample(_attach(comfy_env.make_patcher(family), PATTERN), family,  # noqa: E731
                                          steps=len(PATTERN), **kw)
    assert torch.equal(second, fresh(seed=1))
    assert torch.equal(resized, fresh(hw=other))
    assert torch.equal(again, first)
    assert _instance_forwards(mp) == []


# ---- (g) the input MODEL is untouched, and removing the node leaves no trace -------------------------
def _patcher_state(mp):
    state = {"options": copy.deepcopy(mp.model_options),
             "wrappers": {k: {kk: list(v) for kk, v in d.items()} for k, d in mp.wrappers.items()},
             "callbacks": {k: {kk: list(v) for kk, v in d.items()} for k, d in mp.callbacks.items()},
             "patches": {k: list(v) for k, v in mp.patches.items()},
             "object_patches": dict(mp.object_patches)}
    return state


@pytest.mark.parametrize("family", FAMILIES)
def test_input_model_is_untouched_and_leaves_no_trace(pack, family):
    mp = comfy_env.make_patcher(family)
    before = _sample(mp, family, steps=len(PATTERN))
    state = _patcher_state(mp)
    weights = {k: v.clone() for k, v in mp.model.state_dict().items()}
    patched = _apply_node(pack, mp, ",".join(map(str, PATTERN)))
    assert patched is not mp and patched.model is mp.model
    assert _patcher_state(mp) == state
    cached = _sample(patched, family, steps=len(PATTERN))
    assert not torch.equal(cached, before)
    assert _patcher_state(mp) == state
    after = mp.model.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert _instance_forwards(mp) == []
    assert torch.equal(_sample(mp, family, steps=len(PATTERN)), before)


# ---- bad input through the nodes ---------------------------------------------------------------------
@pytest.mark.parametrize("source,pattern,steps,message", [
    ("typed pattern", "1,0,x,1", 0, "may only contain"),
    ("typed pattern", "", 0, "empty"),
    ("typed pattern", "0,1,1", 0, "step 0 must be full"),
    ("typed pattern", '{"format": "procache.schedule", "version": 1, "pattern": [1, 0', 0, "not valid JSON"),
    ("typed pattern", '{"format": "procache.schedule", "version": 1, "steps": 5, "pattern": [1, 0, 1]}', 0,
     "'steps' says 5"),
    ("typed pattern", '{"format": "other", "pattern": [1]}', 0, "'format' must be"),
    ("uniform interval", "", 0, "steps >= 1"),
    ("../schedules/procache-dit-50-17full", "", 0, "no schedule named"),
    ("/etc/passwd", "", 0, "no schedule named"),
])
def test_bad_input_is_a_clear_message_before_anything_runs(pack, source, pattern, steps, message):
    from procache_comfyui.procache_core import ScheduleError
    loader = pack.nodes.schedule_loader.ProCacheScheduleLoader
    problem = loader.validate_inputs(source, pattern, 3, steps, False)
    assert isinstance(problem, str) and message in problem
    with pytest.raises(ScheduleError, match="."):
        loader.execute(source, pattern, 3, steps, False)


def test_loader_lists_the_paper_schedules_then_the_fast_ones_before_the_generic_ones(pack):
    loader = pack.nodes.schedule_loader.ProCacheScheduleLoader
    source = next(i for i in loader.define_schema().inputs if i.id == "source")
    names = [n for n in source.options if n not in ("uniform interval", "typed pattern")]
    kinds = [1 if n.startswith("procache-fast-") else 0 if n.startswith("procache-") else 3 if n.startswith("generic-")
             else 2 for n in names]
    assert kinds == sorted(kinds) and kinds[0] == 0 and 1 in kinds and 3 in kinds
    assert source.default == names[0] == "procache-dit-50-17full"


def test_loader_reads_every_fast_schedule_as_searched(pack):
    loader = pack.nodes.schedule_loader.ProCacheScheduleLoader
    source = next(i for i in loader.define_schema().inputs if i.id == "source")
    fast = [n for n in source.options if n.startswith("procache-fast-")]
    assert len(fast) == 8
    for name in fast:
        assert loader.validate_inputs(name, "", 3, 0, False) is True
        schedule, report = loader.execute(name, "", 3, 0, False).result
        assert schedule.name == name and f"library: {name} was searched on a model" in report


def test_apply_refuses_bad_settings_and_patches_nothing(pack):
    from procache_comfyui.procache_core import ScheduleError, parse_pattern
    mp = comfy_env.make_patcher("pixart")
    state = _patcher_state(mp)
    with pytest.raises(ScheduleError, match="start_percent"):
        pack.nodes.apply_node.ProCacheApply.execute(mp, parse_pattern("1,0,1"), 0.8, 0.2, False, False)
    with pytest.raises(ScheduleError, match="connect ProCache Schedule Loader"):
        pack.nodes.apply_node.ProCacheApply.execute(mp, "1,0,1", 0.0, 1.0, False, False)
    assert _patcher_state(mp) == state and _instance_forwards(mp) == []


def test_schedule_of_another_length_runs_resampled_with_a_note(pack, runs):
    mp = comfy_env.make_patcher("pixart")
    out = _sample(_apply_node(pack, mp, "[1,0,0]x4"), "pixart", steps=6)
    assert torch.isfinite(out).all()
    summary = runs[-1].stats.summary()
    assert len(summary["planned"]) == 6 and summary["planned"][0] == "1"
    assert any("12" in n and "6" in n for n in summary["notes"])
