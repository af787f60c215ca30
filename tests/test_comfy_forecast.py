"""Forecasters inside a real ComfyUI: Apply with each forecaster on tiny PixArt, Flux and Wan,
all-full bit-identity, and the trainer node (calibration, text round trip, reuse of its own text)."""
import pytest
import torch

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

FAMILIES = ("pixart", "flux", "wan")
PATTERN = "1100100"
HW = {"pixart": None, "flux": 16, "wan": 8}    # small latents: these tests check semantics, not speed


@pytest.fixture(scope="module")
def pack():
    return comfy_env.load_pack()


def _apply(pack, mp, pattern, forecaster):
    from procache_comfyui.procache_core import parse_pattern
    node = pack.nodes.apply_node.ProCacheApply
    return node.execute(mp, parse_pattern(pattern), 0.0, 1.0, False, False, None, forecaster).result[0]


def _forecaster(pack, source, text=""):
    return pack.nodes.forecaster_node.ProCacheForecaster.execute(source, text).result[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_full_with_a_forecaster_is_bit_identical(pack, family):
    mp = comfy_env.make_patcher(family)
    plain = comfy_env.sample(mp, family, steps=5, cfg=2.0, batch=2, hw=HW[family])
    for source in ("taylor 1", "taylor 2", "online (chebyshev)"):
        patched = _apply(pack, mp, "11111", _forecaster(pack, source))
        assert torch.equal(comfy_env.sample(patched, family, steps=5, cfg=2.0, batch=2, hw=HW[family]), plain), source


@pytest.mark.parametrize("family", FAMILIES)
def test_each_forecaster_runs_with_cfg_and_batch_two(pack, family):
    mp = comfy_env.make_patcher(family)
    full = comfy_env.sample(mp, family, steps=len(PATTERN), cfg=2.0, batch=2, hw=HW[family])
    outs = {}
    for source in ("reuse (no forecast)", "taylor 1", "taylor 2", "online (chebyshev)"):
        patched = _apply(pack, mp, PATTERN, _forecaster(pack, source))
        outs[source] = comfy_env.sample(patched, family, steps=len(PATTERN), cfg=2.0, batch=2, hw=HW[family])
        assert torch.isfinite(outs[source]).all()
        assert outs[source].shape == full.shape
    plain_reuse = _apply(pack, mp, PATTERN, None)
    assert torch.equal(comfy_env.sample(plain_reuse, family, steps=len(PATTERN), cfg=2.0, batch=2, hw=HW[family]),
                       outs["reuse (no forecast)"])
    assert not torch.equal(outs["taylor 1"], outs["reuse (no forecast)"])
    assert not torch.equal(outs["taylor 2"], outs["taylor 1"])
    assert not torch.equal(outs["online (chebyshev)"], outs["reuse (no forecast)"])
    # The two images of the batch are forecast separately: they differ as the full-compute ones do.
    assert not torch.equal(outs["taylor 1"][0], outs["taylor 1"][1])


def test_trainer_fits_on_the_graph_and_its_text_reproduces_the_forecaster(pack, monkeypatch):
    from procache_comfyui.procache_core import parse_pattern
    from procache_comfyui.procache_core.forecast import Fitted
    trainer = pack.nodes.forecaster_node.ProCacheForecasterTrainer
    mp = comfy_env.make_patcher("pixart")
    latent, pos, neg = comfy_env.latent_and_conds("pixart", batch=1)
    args = dict(model=mp, positive=pos, negative=neg, latent_image={"samples": latent},
                schedule=parse_pattern(PATTERN), seed=4, samples=2, sampler_name="euler", scheduler="simple",
                steps=len(PATTERN), cfg=2.0, history=2, grouping="role")
    out = trainer.execute(**args)
    fitted, text = out.result
    assert isinstance(fitted, Fitted)
    cached_steps = [i for i, c in enumerate(PATTERN) if c != "1"]
    assert sorted(fitted.table) == cached_steps
    assert set(fitted.table[2]) == {"self_attention", "cross_attention", "mlp"}
    assert out.ui["fitted"] == [text]

    # The text kept in the workflow is used as is while the settings match: no calibration.
    monkeypatch.setattr(pack.nodes.forecaster_node, "calibrate", lambda *a, **k: pytest.fail("calibrated again"))
    again, _ = trainer.execute(**args, fitted=text).result
    assert again.table == fitted.table
    with pytest.raises(Exception, match="names may use"):      # a bad file name fails before calibrating
        trainer.execute(**{**args, "seed": 5}, save_name="../x")
    # ... and the Forecaster node reads the same text into the same forecaster.
    assert _forecaster(pack, "fitted (text below)", text).table == fitted.table

    patched = _apply(pack, mp, PATTERN, fitted)
    out_fitted = comfy_env.sample(patched, "pixart", steps=len(PATTERN), cfg=2.0, seed=9)
    assert torch.isfinite(out_fitted).all()


def test_bad_forecaster_text_is_a_clear_validation_message(pack):
    node = pack.nodes.forecaster_node.ProCacheForecaster
    assert "empty" in node.validate_inputs("fitted (text below)", "")
    assert "not valid JSON" in node.validate_inputs("fitted (text below)", "{oops")
    assert node.validate_inputs("taylor 2", "") is True


# ---- sampler awareness ------------------------------------------------------------------------
def test_every_comfyui_sampler_has_a_kind_in_the_forecast_table(pack):
    import comfy.samplers
    from procache_comfyui.procache_core.forecast import SAMPLER_KIND
    assert set(comfy.samplers.KSampler.SAMPLERS) - set(SAMPLER_KIND) == set()


@pytest.mark.parametrize("family", ["pixart", "wan"])
def test_the_run_is_told_the_sampler_and_its_report_says_what_the_forecast_did(pack, family):
    from procache_comfyui.nodes.runtime import LAST_RUNS
    mp = comfy_env.make_patcher(family)
    forecaster = _forecaster(pack, "online (chebyshev)")
    patched = _apply(pack, mp, PATTERN, forecaster)
    reuse = _apply(pack, mp, PATTERN, None)
    sde = comfy_env.sample(patched, family, steps=len(PATTERN), sampler="dpmpp_sde", hw=HW[family])
    assert any("forecast off under dpmpp_sde" in n for n in LAST_RUNS.latest()["notes"])
    assert torch.equal(sde, comfy_env.sample(reuse, family, steps=len(PATTERN), sampler="dpmpp_sde", hw=HW[family]))
    comfy_env.sample(patched, family, steps=len(PATTERN), sampler="euler", hw=HW[family])
    assert not any("forecast off" in n for n in LAST_RUNS.latest()["notes"])
    # Switched off on the node, the forecast runs under the SDE sampler too.
    raw = _apply(pack, mp, PATTERN, pack.nodes.forecaster_node.ProCacheForecaster.execute(
        "online (chebyshev)", "", 2, 0.5, False, False).result[0])
    assert not torch.equal(comfy_env.sample(raw, family, steps=len(PATTERN), sampler="dpmpp_sde", hw=HW[family]), sde)


def test_under_dpmpp_sde_no_forecast_is_worse_than_plain_reuse_on_a_model_where_taylor_overshoots():
    """The trained reference DiT under ComfyUI's own dpmpp_sde, every other step cached: Taylor and
    the online fit without safeguards land further from full compute than reuse; with them, none."""
    comfy_env.load_comfy()
    from benchmarks.forecast_sampler_bench import ALTERNATING, sample
    from benchmarks.train_reference import load_reference
    from procache_core import parse_pattern
    from procache_core.forecast import Online, Taylor
    model, labels, schedule = load_reference(), torch.arange(4), parse_pattern(ALTERNATING)
    full, _ = sample(model, labels, "dpmpp_sde", schedule.steps, 0)

    def error(forecaster):
        out, run = sample(model, labels, "dpmpp_sde", schedule.steps, 0, schedule, forecaster)
        return float((out - full).norm() / full.norm()), run
    reuse, _ = error(None)
    for forecaster in (Taylor(1), Taylor(2), Online(2), Online(3)):
        raw, _ = error(forecaster.with_safeguards(False, False))
        guarded, run = error(forecaster)
        assert raw > reuse * 1.05, forecaster.describe()         # the overshoot this guards against
        assert guarded <= reuse + 1e-6, forecaster.describe()
        assert any("forecast off under dpmpp_sde" in n for n in run.stats.notes)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_frequency_split_on_the_node_splits_image_tokens_and_forecasts_the_rest_whole(pack, family):
    from procache_comfyui.nodes.runtime import LAST_RUNS
    node = pack.nodes.forecaster_node.ProCacheForecaster
    assert "frequency cutoff must be a number from 0 to 1" in node.validate_inputs("taylor 1", "", 2, 0.5, True,
                                                                                    True, 1.5)
    mp = comfy_env.make_patcher(family)
    result = node.execute("taylor 1", "", 2, 0.5, True, True, 0.5)
    assert "0.5 x Nyquist" in result.ui["text"][0]
    split = comfy_env.sample(_apply(pack, mp, PATTERN, result.result[0]), family, steps=len(PATTERN), hw=HW[family])
    notes = LAST_RUNS.latest()["notes"]
    taylor = comfy_env.sample(_apply(pack, mp, PATTERN, _forecaster(pack, "taylor 1")), family, steps=len(PATTERN),
                              hw=HW[family])
    assert torch.isfinite(split).all() and not torch.equal(split, taylor)
    # Flux: text branches and the joint single blocks have no image grid; Wan's blocks see video tokens only
    assert any("no image token grid" in n for n in notes) == (family == "flux")
