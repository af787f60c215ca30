"""The cache plan inside a real ComfyUI: the plan made before the first block equals the measured
peak of the cache store, budgets pick coarser rungs, and an allocation failure mid-run moves the
rest of the run down the ladder instead of taking it down."""
import logging

import pytest
import torch

import comfy_env

pytestmark = [pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH"),
              pytest.mark.usefixtures("one_thread")]

SELECTIVE = "1,0,2,0,1,2"


@pytest.fixture(scope="module")
def pack():
    comfy_env.load_pack()
    import procache_comfyui
    return procache_comfyui


@pytest.fixture
def runs(pack, monkeypatch):
    from procache_comfyui.nodes import runtime
    made = []
    start_run = runtime.start_run
    monkeypatch.setattr(runtime, "start_run", lambda *a, **k: made.append(start_run(*a, **k)) or made[-1])
    return made


def _apply(pack, mp, budget, pattern=SELECTIVE, forecaster=None, cache_on_cpu=False, precision=None):
    from procache_comfyui.procache_core import parse_pattern
    node = pack.nodes.apply_node.ProCacheApply
    extra = {"cache_precision": precision} if precision else {}     # None: the node's default
    return node.execute(mp, parse_pattern(pattern), 0.0, 1.0, False, cache_on_cpu, memory_budget=budget,
                        forecaster=forecaster, **extra).result[0]


def _residuals_budget(run, count):
    return count * run.census.residual * run.census.streams


def _family_patcher(name):
    import comfy_families
    if name in ("flux", "pixart", "wan"):
        return comfy_env.make_patcher(name), lambda p, **k: comfy_env.sample(p, name, **k)
    if not comfy_families.available(name):
        pytest.skip(f"{name} is not in this ComfyUI")
    return comfy_families.make_patcher(name), lambda p, **k: comfy_families.sample(p, name, **k)


FAMILY_NAMES = ["flux", "pixart", "wan", "sd3", "qwen_image", "lumina2", "hunyuan_video", "ltxv", "auraflow",
                "cosmos_predict2", "hunyuan_dit", "mochi", "kandinsky5", "wan22_ti2v"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_plan_equals_measured_peak_in_every_family(pack, runs, name):
    mp, sample = _family_patcher(name)
    for budget in ("unlimited", "3 residuals", "minimal"):
        out = sample(_apply(pack, mp, budget), steps=6)
        run = runs[-1]
        plan = run.stats.plan
        assert torch.isfinite(out).all()
        assert plan is not None, run.stats.notes
        assert plan["bytes"] == run.stats.cache_bytes_peak, (budget, plan["text"])
        if budget == "minimal":
            assert plan["rung"] == "model"
        if budget == "unlimited":
            assert plan["rung"] == "branch" and plan["budget"] is None


@pytest.mark.parametrize("cfg,batch,forecast,pattern", [
    (1.0, 1, None, SELECTIVE), (2.0, 2, None, SELECTIVE), (2.0, 1, 2, SELECTIVE), (2.0, 1, 1, "1,0,0,1,0,0")])
def test_plan_equals_peak_with_cfg_batch_forecasters_and_selective_steps(pack, runs, cfg, batch, forecast, pattern):
    from procache_comfyui.procache_core.forecast import Taylor
    mp = comfy_env.make_patcher("wan")
    forecaster = Taylor(forecast) if forecast else None
    streams = 1 if cfg == 1.0 else 2
    for budget in ("unlimited", "4 residuals", "2 residuals", "minimal"):
        comfy_env.sample(_apply(pack, mp, budget, pattern, forecaster), "wan", cfg=cfg, batch=batch)
        run = runs[-1]
        assert run.census.streams == streams
        assert run.stats.plan["bytes"] == run.stats.cache_bytes_peak, (budget, run.stats.plan["text"])
        if budget.endswith("residuals"):
            assert run.stats.plan["bytes"] <= _residuals_budget(run, int(budget[0]))


def test_budget_walks_the_ladder_finest_first(pack, runs):
    from procache_comfyui.procache_core import memory
    mp = comfy_env.make_patcher("flux", size="small")
    sizes = []
    for budget in ("unlimited", "24 residuals", "8 residuals", "2 residuals", "minimal"):
        out = comfy_env.sample(_apply(pack, mp, budget), "flux")
        run = runs[-1]
        assert torch.isfinite(out).all()
        plan = run.plan
        sizes.append(plan.bytes)
        # the chosen rung fits, and every finer rung of the ladder did not
        rungs = memory_ladder(run)
        finer = rungs[:rungs.index(plan.rung)]
        assert all(memory.planned_bytes(run.census, r, run.phases) > plan.budget
                   for r in finer if plan.budget is not None)
        assert plan.budget is None or plan.bytes <= plan.budget or plan.rung.model_level
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 4 * sizes[-2] > 0
    assert [runs[i].plan.rung.kind for i in (-5, -1)] == ["branch", "model"]


def test_mixed_rungs_keep_the_first_blocks_at_branch_level(pack, runs):
    mp = comfy_env.make_patcher("flux", size="small")
    comfy_env.sample(_apply(pack, mp, "16 residuals", precision="model dtype"), "flux")
    run = runs[-1]
    assert run.plan.rung.kind == "mixed", run.plan.text()
    kept = run.plan.rung.branch_blocks
    assert kept == frozenset(range(len(kept)))          # shallow blocks keep their branches longest
    spanned = {b for first, last in run.plan.rung.spans for b in range(first, last + 1)}
    assert spanned == set(range(run.census.num_blocks)) - kept
    assert "branch level in" in run.stats.plan["text"] and "residual spans" in run.stats.plan["text"]


def test_an_all_full_schedule_is_exact_at_every_rung(pack, runs):
    mp = comfy_env.make_patcher("flux")
    plain = comfy_env.sample(mp, "flux")
    for budget in ("2 residuals", "minimal"):
        out = comfy_env.sample(_apply(pack, mp, budget, pattern="1,1,1,1,1,1"), "flux")
        assert torch.equal(out, plain), budget


def test_reuse_at_span_rung_differs_from_full_and_stays_close(pack, runs):
    mp = comfy_env.make_patcher("wan")
    plain = comfy_env.sample(mp, "wan")
    errors = {}
    for budget in ("unlimited", "2 residuals", "minimal"):
        out = comfy_env.sample(_apply(pack, mp, budget, pattern="1,0,1,0,1,1", precision="model dtype"), "wan")
        errors[runs[-1].plan.rung.kind] = ((out - plain).norm() / plain.norm()).item()
    assert set(errors) == {"branch", "spans", "model"}
    assert all(0 < e < 0.5 for e in errors.values()), errors


def test_out_of_memory_mid_run_moves_down_the_ladder_and_the_image_comes_out(pack, runs, monkeypatch, caplog):
    from procache_comfyui.nodes import runtime
    from procache_comfyui.procache_core import cache as cache_module
    mp = comfy_env.make_patcher("wan")
    failures = {"left": 1}
    put = cache_module.CacheStore.put

    def failing_put(self, *args, **kwargs):
        if failures["left"] and runs and self is runs[-1].cache and len(self) > 4:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 2.00 GiB")
        return put(self, *args, **kwargs)
    monkeypatch.setattr(cache_module.CacheStore, "put", failing_put)
    with caplog.at_level(logging.WARNING, logger="procache"):
        out = comfy_env.sample(_apply(pack, mp, "unlimited", pattern="1,0,1,0,1,0"), "wan")
    run = runs[-1]
    assert torch.isfinite(out).all() and failures["left"] == 0
    # the default precision's first step down is branch level in 8 bits
    assert (run.rung.kind, run.rung.quantize) == ("branch", "int8") and run.stats.plan["rung"] == run.rung.kind
    notes = runtime.LAST_RUNS.latest()["notes"]
    assert any("out of memory while caching" in n and "smaller one" in n for n in notes)
    assert "R" in runtime.LAST_RUNS.latest()["actual"]["stream 0"][3:]    # still caching after the failure


def test_repeated_out_of_memory_ends_in_full_compute(pack, runs, monkeypatch):
    from procache_comfyui.nodes import runtime
    from procache_comfyui.procache_core import cache as cache_module
    mp = comfy_env.make_patcher("wan")

    put = cache_module.CacheStore.put

    def failing_put(self, *args, **kwargs):
        if self is runs[-1].cache:      # the census (fake tensors) stores fine; the run's cache never
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return put(self, *args, **kwargs)
    monkeypatch.setattr(cache_module.CacheStore, "put", failing_put)
    out = comfy_env.sample(_apply(pack, mp, "auto", pattern="1,0,1,0,1,0"), "wan")
    notes, failed = runtime.LAST_RUNS.latest()["notes"], runs[-1]
    monkeypatch.undo()
    full = comfy_env.sample(_apply(pack, comfy_env.make_patcher("wan"), "unlimited", pattern="1,1,1,1,1,1"), "wan")
    assert torch.equal(out, full)
    assert any("computes the rest of this run in full" in n for n in notes)
    # every rung below branch level was tried once before giving up
    assert sum("smaller one" in n for n in notes) == len(memory_ladder(failed)) - 1


def memory_ladder(run):
    from procache_comfyui.procache_core import memory
    quantize, quantize_all = run.quantize_options
    return memory.ladder(run.census, run.deep_blocks(run.census), quantize=quantize, quantize_all=quantize_all)


def test_memory_budget_input_refuses_text_it_cannot_read(pack):
    node = pack.nodes.apply_node.ProCacheApply
    message = node.validate_inputs(memory_budget="lots")
    assert isinstance(message, str) and "memory_budget" in message and "GiB" in message
    assert node.validate_inputs(memory_budget="6 GiB") is True
    option = next(i for i in node.GET_SCHEMA().inputs if i.id == "memory_budget")
    assert option.default == "auto" and "residual" in option.tooltip


def test_a_model_the_census_cannot_trace_keeps_branch_level_and_says_so(pack, runs):
    # HiDream routes tokens to experts with a data-dependent nonzero(): fake tensors cannot follow it
    mp, sample = _family_patcher("hidream")
    out = sample(_apply(pack, mp, "auto"), steps=6)
    run = runs[-1]
    assert torch.isfinite(out).all()
    assert run.plan is None and run.rung.kind == "branch" and run.stats.cache_bytes_peak > 0
    assert any(n.startswith("no cache plan: this model could not be traced") for n in run.stats.notes)


@pytest.mark.parametrize("forecast", [None, 2])
def test_plan_equals_peak_when_cfg_passes_run_in_separate_calls(pack, runs, monkeypatch, forecast):
    # Short of memory, ComfyUI runs the positive and negative passes one at a time: the census sees
    # one stream, and the plan counts every conditioning the guider will evaluate.
    from procache_comfyui.procache_core.forecast import Taylor
    calls = []
    mp = comfy_env.make_patcher("wan")
    monkeypatch.setattr(mp.model, "memory_required", lambda *a, **k: float("inf"))     # never batch two passes
    hook = mp.model.diffusion_model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        comfy_env.sample(_apply(pack, mp, "unlimited", forecaster=Taylor(forecast) if forecast else None), "wan",
                         cfg=2.0)
    finally:
        hook.remove()
    run = runs[-1]
    assert set(calls) == {1}                    # every call held one stream
    assert run.census.streams == 2 and run.stats.plan["bytes"] == run.stats.cache_bytes_peak


def test_default_precision_keeps_branch_level_in_8_bits_before_going_coarser(pack, runs):
    node = pack.nodes.apply_node.ProCacheApply
    option = next(i for i in node.GET_SCHEMA().inputs if i.id == "cache_precision")
    assert option.default == "8-bit when needed"
    mp = comfy_env.make_patcher("flux", size="small")
    comfy_env.sample(_apply(pack, mp, "16 residuals", precision="model dtype"), "flux")
    in_model_dtype = runs[-1].plan
    comfy_env.sample(_apply(pack, mp, "16 residuals"), "flux")
    by_default = runs[-1].plan
    assert in_model_dtype.rung.kind != "branch"
    assert by_default.rung.kind == "branch" and by_default.rung.quantize == "int8", by_default.text()
    assert by_default.bytes <= by_default.budget and by_default.bytes == runs[-1].stats.cache_bytes_peak


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_check_model_level_measures_both_and_keeps_the_rung_it_does_not_beat(pack, runs, family):
    from procache_comfyui.procache_core import parse_pattern
    node = pack.nodes.apply_node.ProCacheApply
    mp = comfy_env.make_patcher(family)
    option = next(i for i in node.GET_SCHEMA().inputs if i.id == "check_model_level")
    assert option.default is False and option.optional

    def apply(check):
        return node.execute(mp, parse_pattern("1,0,1,0,1,0,1,1"), 0.0, 1.0, False, False,
                            memory_budget="unlimited", check_model_level=check).result[0]
    plain = comfy_env.sample(apply(False), family, steps=8)
    checked = comfy_env.sample(apply(True), family, steps=8)
    run = runs[-1]
    note = next(n for n in run.stats.notes if n.startswith("rung check"))
    assert "over 4 full steps (2-7)" in note
    # random weights: branch level is far closer, so it stays, and the cached pass inside ComfyUI's
    # model (transformer_options, patches) leaves the run untouched
    assert "branch level in all" in note and "stays" in note, note
    assert torch.equal(plain, checked) and run.rung.kind == "branch"


def test_check_model_level_stays_off_under_sde_samplers(pack, runs):
    from procache_comfyui.procache_core import parse_pattern
    node = pack.nodes.apply_node.ProCacheApply
    mp = comfy_env.make_patcher("flux")

    def apply(check):
        return node.execute(mp, parse_pattern("1,0,1,0,1,0,1,1"), 0.0, 1.0, False, False,
                            memory_budget="unlimited", check_model_level=check).result[0]
    plain = comfy_env.sample(apply(False), "flux", steps=8, sampler="dpmpp_sde")
    checked = comfy_env.sample(apply(True), "flux", steps=8, sampler="dpmpp_sde")
    notes = runs[-1].stats.notes
    assert any(n.startswith("model-level check off under dpmpp_sde (sde sampler)") for n in notes), notes
    assert not any(n.startswith("rung check") for n in notes)
    assert torch.equal(plain, checked)


def test_a_budget_with_no_branches_left_advises_a_forecaster(pack, runs):
    from procache_comfyui.nodes.runtime import SMALL_BUDGET_ADVICE
    from procache_comfyui.procache_core.forecast import Taylor
    mp = comfy_env.make_patcher("wan")
    for budget, forecaster, advised in (("minimal", None, True), ("unlimited", None, False),
                                        ("minimal", Taylor(1), False)):
        comfy_env.sample(_apply(pack, mp, budget, forecaster=forecaster), "wan")
        assert (SMALL_BUDGET_ADVICE in runs[-1].stats.notes) == advised, (budget, forecaster)
