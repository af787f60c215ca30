"""ProCache Schedule Search in a real ComfyUI, on a tiny Flux model with ComfyUI's own samplers."""
import json

import pytest
import torch

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

STEPS = 8


@pytest.fixture(scope="module")
def pack():
    comfy_env.load_pack()
    from procache_comfyui.nodes import search_node
    return search_node


@pytest.fixture()
def user_folder(pack, tmp_path, monkeypatch):
    from procache_comfyui.nodes import library
    folder = tmp_path / "procache" / "schedules"
    monkeypatch.setattr(library, "user_dir", lambda: str(folder))
    return folder


@pytest.fixture(scope="module")
def inputs(pack):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    latent, pos, neg = comfy_env.latent_and_conds("flux")
    yield dict(model=comfy_env.make_patcher("flux"), sampler_name="euler", scheduler="simple", steps=STEPS,
               cfg=2.0, positive=pos, negative=neg, latent_image={"samples": latent}, seed=5, seeds=2,
               candidates=3, full_steps=3, target_speedup=2.0, min_interval=0, max_interval=4, selective=True,
               prerank_pool=20, save_name="")
    torch.set_num_threads(threads)


def _search(pack, inputs, **changes):
    return pack.ProCacheScheduleSearch.execute(**{**inputs, **changes})


def _sample(inputs, model, seed):
    """What KSampler gives for `seed` with the search's sampler settings."""
    import comfy.sample
    latent = inputs["latent_image"]["samples"]
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), STEPS, 2.0, "euler", "simple",
                               inputs["positive"], inputs["negative"], latent, seed=seed, disable_pbar=True)


def test_search_saves_a_schedule_the_loader_gives_back(pack, inputs, user_folder):
    from procache_comfyui.nodes import library
    from procache_comfyui.nodes.schedule_loader import ProCacheScheduleLoader
    from procache_comfyui.procache_core import StepKind
    out = _search(pack, inputs, save_name="tiny-flux")
    schedule, pattern, image, report = out.args
    assert schedule.pattern == pattern and schedule.steps == STEPS
    assert schedule.count(StepKind.FULL) == 3 and StepKind.SELECTIVE in schedule.kinds
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] > 100
    assert float(image.std()) > 0.01                 # something was drawn
    assert "<- winner" in report and "uniform" in report
    doc = json.loads((user_folder / "tiny-flux.json").read_text())
    meta = doc["search"]
    assert meta["model"] == "Flux" and meta["sampler"] == "euler" and meta["steps"] == STEPS
    assert meta["cfg"] == 2.0 and meta["seeds"] == [5, 6] and meta["date"]
    assert meta["error"] > 0 and meta["theoretical_speedup"] == pytest.approx(STEPS / 3, rel=1e-3)
    assert meta["prerank_pool"] > 3 and meta["candidates"] >= 3
    assert "user/tiny-flux" in library.listing()
    loaded = ProCacheScheduleLoader.execute("user/tiny-flux", "", 3, 0, False)
    assert loaded.args[0].pattern == pattern
    assert "searched on a model" in loaded.args[1] and "Flux" in loaded.args[1]
    # the pattern output carried as typed text gives the same schedule too
    typed = ProCacheScheduleLoader.execute("typed pattern", pattern, 3, 0, False)
    assert typed.args[0].pattern == pattern
    # same seed, same result
    again = _search(pack, inputs)
    assert again.args[1] == pattern
    assert again.args[3].splitlines()[0] == report.splitlines()[0]          # same errors, same winner
    # the input model was never patched
    assert not any(k.startswith("procache") for by_key in inputs["model"].wrappers.values() for k in by_key)


def test_stored_result_travels_in_the_workflow_and_is_reused_while_settings_match(pack, inputs, monkeypatch):
    out = _search(pack, inputs)
    stored = out.ui["searched"][0]
    doc = json.loads(stored)
    assert doc["pattern"] == [int(c) for c in out.args[1]] and doc["search"]["settings"]["steps"] == STEPS
    ran = []
    monkeypatch.setattr(pack, "search", lambda *a, **k: ran.append(1) or pytest.fail("searched again"))
    reused = _search(pack, inputs, searched=stored)
    assert reused.args[1] == out.args[1] and "reused" in reused.args[3] and not ran
    monkeypatch.undo()
    # other settings (or unusable text) search again rather than hand back a stale schedule
    calls = []
    real = pack.search
    monkeypatch.setattr(pack, "search", lambda *a, **k: calls.append(1) or real(*a, **k))
    _search(pack, inputs, searched=stored, cfg=3.0)
    _search(pack, inputs, searched=stored[:-5])
    assert len(calls) == 2


def test_searched_candidates_are_what_apply_and_ksampler_give(pack, inputs):
    """The winner's reported error is reproduced by ProCache Apply + a plain sampler run."""
    from procache_comfyui.nodes import runtime
    from procache_comfyui.procache_core.search import output_error
    out = _search(pack, inputs, selective=False, prerank_pool=0, candidates=2)
    schedule, report = out.args[0], out.args[3]
    winner_error = float(report.splitlines()[0].split("winner error ")[1].split(",")[0])
    model = inputs["model"]
    patched = runtime.attach(model, runtime.ApplyConfig(schedule=schedule))
    err = output_error([_sample(inputs, patched, s) for s in (5, 6)], [_sample(inputs, model, s) for s in (5, 6)])
    assert err == pytest.approx(winner_error, rel=1e-3)


@pytest.mark.parametrize("changes, words", [
    (dict(full_steps=1, max_interval=4), ["1 full steps", "at most 4", "5 of steps=8"]),
    (dict(full_steps=5, min_interval=1), ["5 full steps", "at least 1", "10 steps", "steps=8"]),
    (dict(full_steps=0, target_speedup=8.0, max_interval=3), ["target speedup 8x", "1 full steps", "at most 3"]),
    (dict(min_interval=3, max_interval=2), ["min_interval=3", "max_interval=2"]),
])
def test_bad_constraints_are_refused_before_sampling(pack, inputs, changes, words):
    from procache_comfyui.procache_core import ScheduleError
    args = {**inputs, **changes}
    message = pack.ProCacheScheduleSearch.validate_inputs(**args)
    assert isinstance(message, str)
    for word in words:
        assert word in message
    with pytest.raises(ScheduleError):
        _search(pack, inputs, **changes)
    assert pack.ProCacheScheduleSearch.validate_inputs(**inputs) is True


@pytest.mark.parametrize("steps, full_steps, target, expected", [
    (20, 0, 6.0, 12),      # 3 full steps: a fixed 4 would admit no pattern
    (20, 0, 5.0, 8),       # 4 full steps: a fixed 4 would admit even spacing only
    (50, 8, 2.0, 12),      # full_steps given: it decides, target_speedup is ignored
    (8, 4, 2.0, 4),        # short runs keep at least 4
])
def test_automatic_max_interval_admits_uneven_spacings(pack, steps, full_steps, target, expected):
    from procache_comfyui.nodes.search_node import AUTO, constraints_from
    from procache_comfyui.procache_core.search import count_partitions, even_pattern
    c = constraints_from(steps, full_steps, target, 0, AUTO)
    assert c.max_interval == expected
    assert count_partitions(c) > 1 and even_pattern(c)
    assert pack.ProCacheScheduleSearch.validate_inputs(steps=steps, full_steps=full_steps, target_speedup=target,
                                                       min_interval=0, max_interval=AUTO) is True


def test_cancel_stops_the_search_and_leaves_the_model_clean(pack, inputs, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils
    steps_seen = []

    class Bar(comfy.utils.ProgressBar):
        def update(self, value):
            super().update(value)
            steps_seen.append(self.current)
            if self.current == STEPS * 2 + 3:       # inside the first candidate's runs
                mm.interrupt_current_processing(True)

    monkeypatch.setattr(pack.comfy.utils, "ProgressBar", Bar)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _search(pack, inputs)
    finally:
        mm.interrupt_current_processing(False)
    assert steps_seen[-1] in (STEPS * 2 + 3, STEPS * 2 + 4)      # stopped within a step
    assert not any(k.startswith("procache") for by_key in inputs["model"].wrappers.values() for k in by_key)


def test_a_connected_forecaster_is_what_the_candidates_run_with(pack, inputs):
    from procache_comfyui.procache_core.forecast import Taylor
    plain = _search(pack, inputs, selective=False)
    taylor = _search(pack, inputs, selective=False, forecaster=Taylor(1))
    plain_doc, taylor_doc = (json.loads(out.ui["searched"][0]) for out in (plain, taylor))
    assert "forecaster" not in plain_doc["search"]["settings"]          # stored results from before stay valid
    assert taylor_doc["search"]["settings"]["forecaster"] == "Taylor order 1"
    assert "candidates ran with Taylor order 1" in taylor_doc["provenance"]
    # Apply forecasts by default, so a schedule searched with plain reuse says how to run it as searched
    assert "plain reuse: set ProCache Apply's forecast to none" in plain_doc["provenance"]
    assert taylor_doc["search"]["error"] != plain_doc["search"]["error"]


def test_search_measures_one_model_level_residual_on_its_calibration_and_keeps_the_choice(pack, inputs, monkeypatch):
    """After the search, the winner runs once more with one model-level residual; the measured error
    travels in the searched text, and where it is clearly lower the schedule says model level."""
    from procache_comfyui.nodes import runtime
    from procache_comfyui.procache_core import Schedule
    from procache_comfyui.procache_core.schedule import MODEL_LEVEL
    from procache_comfyui.procache_core.search import output_error
    out = _search(pack, inputs, selective=False, prerank_pool=0, candidates=2)
    schedule = out.args[0]
    meta = json.loads(out.ui["searched"][0])["search"]
    model_error = meta["model_level_error"]
    assert 0 < model_error and model_error != meta["error"]
    # the figure is what Apply with budget minimal gives on the same seeds
    model = inputs["model"]
    minimal = runtime.attach(model, runtime.ApplyConfig(schedule=schedule, budget=runtime.Budget("minimal")))
    assert output_error([_sample(inputs, minimal, s) for s in (5, 6)], [_sample(inputs, model, s) for s in (5, 6)]) == \
        pytest.approx(model_error, rel=1e-3)
    expected = MODEL_LEVEL if model_error <= 0.8 * meta["error"] else ""
    assert schedule.granularity == expected and "one model-level residual: error" in "\n".join(schedule.notes)

    # where model level wins, the choice is written into the schedule and read back from the workflow text
    monkeypatch.setattr(pack, "prefer_model_level", lambda branch, model_level: True)
    chosen = _search(pack, inputs, selective=False, prerank_pool=0, candidates=2)
    assert chosen.args[0].granularity == MODEL_LEVEL
    text = chosen.ui["searched"][0]
    assert json.loads(text)["granularity"] == MODEL_LEVEL
    assert Schedule.from_json(text).granularity == MODEL_LEVEL
    assert "granularity: model level" in chosen.args[3]


@pytest.mark.parametrize("budget, rung", [("auto", "model"), ("unlimited", "branch")])
def test_apply_follows_a_searched_model_level_granularity_only_under_the_auto_budget(pack, inputs, budget, rung):
    from procache_comfyui.nodes import runtime
    from procache_comfyui.nodes.runtime import LAST_RUNS, SEARCHED_MODEL_LEVEL
    from procache_comfyui.procache_core import parse_pattern
    from procache_comfyui.procache_core.memory import Budget
    import dataclasses
    schedule = dataclasses.replace(parse_pattern("10010010"), granularity="model level")
    patched = runtime.attach(inputs["model"], runtime.ApplyConfig(schedule=schedule, budget=Budget.parse(budget)))
    _sample(inputs, patched, 0)
    latest = LAST_RUNS.latest()
    assert latest["plan"]["rung"] == rung
    assert (SEARCHED_MODEL_LEVEL in latest["notes"]) == (budget == "auto")
