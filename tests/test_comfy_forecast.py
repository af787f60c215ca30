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
    for source in ("taylor 1", "taylor 2"):
        patched = _apply(pack, mp, "11111", _forecaster(pack, source))
        assert torch.equal(comfy_env.sample(patched, family, steps=5, cfg=2.0, batch=2, hw=HW[family]), plain), source


@pytest.mark.parametrize("family", FAMILIES)
def test_each_forecaster_runs_with_cfg_and_batch_two(pack, family):
    mp = comfy_env.make_patcher(family)
    full = comfy_env.sample(mp, family, steps=len(PATTERN), cfg=2.0, batch=2, hw=HW[family])
    outs = {}
    for source in ("reuse (no forecast)", "taylor 1", "taylor 2"):
        patched = _apply(pack, mp, PATTERN, _forecaster(pack, source))
        outs[source] = comfy_env.sample(patched, family, steps=len(PATTERN), cfg=2.0, batch=2, hw=HW[family])
        assert torch.isfinite(outs[source]).all()
        assert outs[source].shape == full.shape
    plain_reuse = _apply(pack, mp, PATTERN, None)
    assert torch.equal(comfy_env.sample(plain_reuse, family, steps=len(PATTERN), cfg=2.0, batch=2, hw=HW[family]),
                       outs["reuse (no forecast)"])
    assert not torch.equal(outs["taylor 1"], outs["reuse (no forecast)"])
    assert not torch.equal(outs["taylor 2"], outs["taylor 1"])
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
