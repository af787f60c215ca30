"""EOC inside a real ComfyUI: the extractor node on tiny models, its prior text kept in the workflow,
saved priors, and ProCache Apply with a correction (changes reuse steps only; off = plain reuse)."""
import pytest
import torch

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

PATTERN = "1101010"
HW = {"pixart": None, "flux": 16, "wan": 8}    # small latents: these tests check semantics, not speed


@pytest.fixture(scope="module")
def pack():
    return comfy_env.load_pack()


def _extract(pack, mp, family, seed=4, samples=2, pooling="channel", schedule=None, **extra):
    latent, pos, neg = comfy_env.latent_and_conds(family, batch=1, hw=HW[family])
    args = dict(model=mp, positive=pos, negative=neg, latent_image={"samples": latent}, seed=seed, samples=samples,
                sampler_name="euler", scheduler="simple", steps=len(PATTERN), cfg=2.0, pooling=pooling,
                schedule=schedule, **extra)
    return pack.nodes.eoc_node.EOCPriorExtractor.execute(**args), args


def _correction(pack, prior, gamma=0.5, **kw):
    node = pack.nodes.eoc_node.EOCCorrection
    options = dict(saved_prior=pack.nodes.eoc_node.NO_FILE, gamma=gamma, threshold=0.0, min_gain=None,
                   end_percent=1.0)
    options.update(kw)
    return node.execute(prior=prior, **options).result[0]


def _apply(pack, mp, pattern, eoc):
    from procache_comfyui.procache_core import parse_pattern
    node = pack.nodes.apply_node.ProCacheApply
    return node.execute(mp, parse_pattern(pattern), 0.0, 1.0, False, False, None, None, eoc=eoc).result[0]


def _model_outputs(mp, family, patched, batch=2):
    """The diffusion model's output at every call of one sampling run, in order."""
    outs = []
    handle = mp.model.diffusion_model.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    try:
        final = comfy_env.sample(patched, family, steps=len(PATTERN), cfg=2.0, batch=batch, hw=HW[family], seed=7)
    finally:
        handle.remove()
    return outs, final


@pytest.mark.parametrize("family", ["pixart", "flux", "wan"])
def test_extractor_records_a_prior_per_step_branch_and_stream(pack, family):
    mp = comfy_env.make_patcher(family)
    out, _ = _extract(pack, mp, family)
    prior, summary = out.result
    assert prior.steps == len(PATTERN) and prior.streams == 2 and prior.samples == 2
    units = {u for _, _, u in prior.means}
    assert {name for _, name in units} >= ({"attn", "mlp"} if family != "flux" else {"img_attn"}) or len(units) > 2
    assert all(v.ndim == 1 for v in prior.means.values())           # channel pooling: one vector each
    assert "2 samples" in summary and out.ui["prior"][0] == prior.to_json()


def test_prior_text_is_reused_while_the_settings_match(pack, monkeypatch):
    mp = comfy_env.make_patcher("pixart")
    out, args = _extract(pack, mp, "pixart")
    prior, text = out.result[0], out.ui["prior"][0]
    monkeypatch.setattr(pack.nodes.eoc_node, "extract", lambda *a, **k: pytest.fail("extracted again"))
    again = pack.nodes.eoc_node.EOCPriorExtractor.execute(**{**args, "prior": text}).result[0]
    assert again.means.keys() == prior.means.keys()
    assert all(torch.equal(again.means[k], v) for k, v in prior.means.items())
    # Another seed, another prompt: the text no longer describes the graph, so it extracts again.
    calls = []
    monkeypatch.setattr(pack.nodes.eoc_node, "extract", lambda *a, **k: calls.append(1) or prior)
    pack.nodes.eoc_node.EOCPriorExtractor.execute(**{**args, "seed": 5, "prior": text})
    _, pos, neg = comfy_env.latent_and_conds("pixart", seed=3)
    pack.nodes.eoc_node.EOCPriorExtractor.execute(**{**args, "positive": pos, "prior": text})
    assert len(calls) == 2


def test_extraction_is_deterministic_and_records_the_schedules_gaps(pack):
    from procache_comfyui.procache_core import parse_pattern
    mp = comfy_env.make_patcher("pixart")
    a = _extract(pack, mp, "pixart", schedule=parse_pattern("1100010"))[0].result[0]
    b = _extract(pack, mp, "pixart", schedule=parse_pattern("1100010"))[0].result[0]
    assert all(torch.equal(a.means[k], b.means[k]) for k in a.means)
    assert {gap for *_, gap in a.stats} == {1, 2, 3}       # 1..2 always, 3 from the schedule's own reuse


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_apply_with_a_prior_changes_reuse_steps_only(pack, family):
    mp = comfy_env.make_patcher(family)
    prior = _extract(pack, mp, family, samples=3)[0].result[0]
    plain_outs, plain = _model_outputs(mp, family, _apply(pack, mp, PATTERN, None))
    eoc_outs, corrected = _model_outputs(mp, family, _apply(pack, mp, PATTERN, _correction(pack, prior, 0.5)))
    assert len(plain_outs) == len(eoc_outs) == len(PATTERN)      # CFG batched: one call per step
    first_reuse = PATTERN.index("0")
    for step in range(first_reuse):
        assert torch.equal(eoc_outs[step], plain_outs[step]), step
    assert not torch.equal(eoc_outs[first_reuse], plain_outs[first_reuse])
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, plain)
    # Correction off (gamma 0) is plain reuse, bit for bit; an all-full schedule is untouched.
    _, off = _model_outputs(mp, family, _apply(pack, mp, PATTERN, _correction(pack, prior, 0.0)))
    assert torch.equal(off, plain)
    _, full = _model_outputs(mp, family, mp)
    _, all_full = _model_outputs(mp, family, _apply(pack, mp, "1" * len(PATTERN), _correction(pack, prior, 1.0)))
    assert torch.equal(all_full, full)


def test_corrections_land_on_reuse_steps_of_each_stream(pack, monkeypatch):
    from procache_comfyui.procache_core.eoc import CorrectionState
    mp = comfy_env.make_patcher("pixart")
    prior = _extract(pack, mp, "pixart")[0].result[0]
    states = []
    original = CorrectionState.__init__

    def spy(self, correction):
        original(self, correction)
        states.append(self)
    monkeypatch.setattr(CorrectionState, "__init__", spy)
    comfy_env.sample(_apply(pack, mp, PATTERN, _correction(pack, prior, 0.5)), "pixart", steps=len(PATTERN),
                     cfg=2.0, batch=2, seed=7)
    assert len(states) == 1
    reuse_steps = {i for i, c in enumerate(PATTERN) if c == "0"}
    assert set(states[0].corrected) == reuse_steps
    assert len(states[0].order.ordinals) == 2           # cond and uncond keep their own prior rows


def test_saved_prior_loads_in_the_correction_node(pack, tmp_path, monkeypatch):
    eoc_node = pack.nodes.eoc_node
    monkeypatch.setattr(eoc_node, "prior_dir", lambda: str(tmp_path))
    mp = comfy_env.make_patcher("pixart")
    prior = _extract(pack, mp, "pixart", save_name="my-prior")[0].result[0]
    assert (tmp_path / "my-prior.safetensors").is_file()
    assert eoc_node.EOCCorrection.validate_inputs("my-prior") is True
    assert "no saved EOC prior" in eoc_node.EOCCorrection.validate_inputs("other")
    correction = eoc_node.EOCCorrection.execute("my-prior", 0.5, 0.0, 0.0, 1.0).result[0]
    assert correction.prior.means.keys() == prior.means.keys()
    with pytest.raises(Exception, match="connect an EOC Prior Extractor"):
        eoc_node.EOCCorrection.execute(eoc_node.NO_FILE, 0.5, 0.0, 0.0, 1.0)
    monkeypatch.setattr(eoc_node, "extract", lambda *a, **k: pytest.fail("sampled before checking the name"))
    with pytest.raises(Exception, match="names may use"):
        _extract(pack, mp, "pixart", save_name="../x")


def test_apply_warns_when_a_forecaster_and_a_correction_are_both_connected(pack, caplog):
    from procache_comfyui.procache_core import parse_pattern
    mp = comfy_env.make_patcher("pixart")
    prior = _extract(pack, mp, "pixart")[0].result[0]
    forecaster = pack.nodes.forecaster_node.ProCacheForecaster.execute("taylor 1", "").result[0]
    apply = pack.nodes.apply_node.ProCacheApply
    args = (mp, parse_pattern(PATTERN), 0.0, 1.0, False, False, None)
    alone = apply.execute(*args, forecaster, None).result[1]
    assert "WARNING" not in alone
    with caplog.at_level("WARNING", logger="procache"):
        both = apply.execute(*args, forecaster, _correction(pack, prior)).result[1]
    assert both.startswith("WARNING: a forecaster and an EOC correction")
    assert any("connect one" in r.getMessage() for r in caplog.records)


def test_a_prior_that_does_not_fit_the_run_is_skipped_with_a_note_and_a_warning(pack, caplog):
    from procache_comfyui.nodes import runtime
    pixart = comfy_env.make_patcher("pixart")
    token_prior = _extract(pack, pixart, "pixart", pooling="token")[0].result[0]     # 48 x 48 latent
    correction = _correction(pack, token_prior, 0.5)
    with caplog.at_level("WARNING", logger="procache"):
        comfy_env.sample(_apply(pack, pixart, PATTERN, correction), "pixart", steps=len(PATTERN), hw=40)
    notes = [n for n in runtime.LAST_RUNS.latest()["notes"] if n.startswith("EOC correction skipped")]
    assert len(notes) == 1 and "another resolution" in notes[0] and "[576, " in notes[0] and "[400, " in notes[0]
    assert [r.getMessage() for r in caplog.records if "EOC correction skipped" in r.getMessage()] == \
        [f"ProCache: {notes[0]}"]
    # at the prior's own size nothing is skipped
    comfy_env.sample(_apply(pack, pixart, PATTERN, correction), "pixart", steps=len(PATTERN))
    assert not any("EOC correction skipped" in n for n in runtime.LAST_RUNS.latest()["notes"])
    # a PixArt prior on another family
    wan = comfy_env.make_patcher("wan")
    comfy_env.sample(_apply(pack, wan, PATTERN, _correction(pack, _extract(pack, pixart, "pixart")[0].result[0])),
                     "wan", steps=len(PATTERN), hw=HW["wan"])
    notes = [n for n in runtime.LAST_RUNS.latest()["notes"] if n.startswith("EOC correction skipped")]
    assert notes and "extract a prior on this model" in notes[0] and "PixArtMS" in notes[0]


def test_a_saved_prior_with_bad_metadata_is_refused_at_validation_naming_the_file(pack, tmp_path, monkeypatch):
    from procache_comfyui.procache_core.eoc import MAX_PRIOR_BYTES, Prior
    from safetensors.torch import save
    eoc_node = pack.nodes.eoc_node
    monkeypatch.setattr(eoc_node, "prior_dir", lambda: str(tmp_path))
    tensors = {"mean|0|0|0|attn": torch.ones(4)}
    header = {"format": "procache.eoc_prior", "version": "1", "pooling": "channel", "metadata": "{}"}
    (tmp_path / "counts.safetensors").write_bytes(save(tensors, metadata={**header, "counts": "not json"}))
    (tmp_path / "listed.safetensors").write_bytes(save(tensors, metadata={**header, "counts": "[1, 2]"}))
    (tmp_path / "meta.safetensors").write_bytes(save(tensors, metadata={**header, "counts": "{}", "metadata": "[]"}))
    (tmp_path / "ok.safetensors").write_bytes(save(tensors, metadata={**header, "counts": '{"count|0|0|0|attn": 3}'}))
    with open(tmp_path / "huge.safetensors", "wb") as f:
        f.truncate(MAX_PRIOR_BYTES + 1)        # sparse: the size alone must refuse it
    for name, words in [("counts", "'counts' metadata should be a JSON object"), ("listed", "a JSON list"),
                        ("meta", "'metadata' should be a JSON object"), ("huge", "larger than the 1024 MiB")]:
        problem = eoc_node.EOCCorrection.validate_inputs(name)
        assert isinstance(problem, str) and f"EOC prior file '{name}.safetensors'" in problem and words in problem, name
        with pytest.raises(Exception, match="EOC prior file"):
            eoc_node.EOCCorrection.execute(name, 0.5, 0.0, 0.0, 1.0)
    assert eoc_node.EOCCorrection.validate_inputs("ok") is True
    assert Prior.load(str(tmp_path / "ok.safetensors")).counts == {(0, 0, (0, "attn")): 3}
