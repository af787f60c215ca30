"""Faults and bad input inside a real ComfyUI: nothing left patched, nothing stale, clear messages."""
import pytest
import torch

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

SD15_TINY = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
             "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
             "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 2,
             "transformer_depth_output": [1, 1, 1, 1], "adm_in_channels": None, "use_temporal_attention": False,
             "use_temporal_resblock": False}
PATTERN = "1,0,0,1,0,2"


@pytest.fixture(scope="module")
def pack():
    comfy_env.load_pack()
    import procache_comfyui
    return procache_comfyui


def _apply(pack, mp, pattern=PATTERN):
    from procache_comfyui.procache_core import parse_pattern
    return pack.nodes.apply_node.ProCacheApply.execute(mp, parse_pattern(pattern), 0.0, 1.0, False, False)


def _no_instance_forwards(mp):
    return [name for name, m in mp.model.diffusion_model.named_modules() if "forward" in m.__dict__]


def test_unet_passes_through_unchanged_with_a_message(pack):
    import comfy.model_patcher
    import comfy.supported_models as sm
    cfg = sm.SD15(dict(SD15_TINY))
    cfg.set_inference_dtype(torch.float32, None)
    mp = comfy.model_patcher.ModelPatcher(cfg.get_model({}, "", device=torch.device("cpu")),
                                          load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    out = _apply(pack, mp)
    assert out.result[0] is mp                      # passed through, not even cloned
    assert "UNet" in out.result[1] and "unchanged" in out.result[1]


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_exception_inside_a_block_unwinds_everything(pack, family):
    mp = comfy_env.make_patcher(family)
    patched = _apply(pack, mp).result[0]
    dm = mp.model.diffusion_model
    block = (dm.single_blocks if family == "flux" else dm.blocks)[-1]
    calls = {"n": 0}

    def fail_on_third_call(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated failure inside a block")
    hook = block.register_forward_pre_hook(fail_on_third_call)
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            comfy_env.sample(patched, family)
    finally:
        hook.remove()
    assert _no_instance_forwards(mp) == []
    from procache_comfyui.nodes.runtime import RUN_KEY
    assert RUN_KEY not in patched.model_options.get("transformer_options", {})
    # the next run is exactly a fresh run: no stale cache survived the failure
    again = comfy_env.sample(patched, family)
    fresh = comfy_env.sample(_apply(pack, comfy_env.make_patcher(family)).result[0], family)
    assert torch.equal(again, fresh)


def test_cancel_mid_sampling_frees_the_cache_and_next_run_is_fresh(pack):
    import comfy.model_management
    import comfy.sample
    from procache_comfyui.nodes.runtime import LAST_RUNS
    mp = comfy_env.make_patcher("wan")
    patched = _apply(pack, mp).result[0]
    lat, pos, neg = comfy_env.latent_and_conds("wan")
    noise = comfy.sample.prepare_noise(lat, 0)

    def cancel_at_step_3(step, *args):
        if step == 3:
            raise comfy.model_management.InterruptProcessingException()
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        comfy.sample.sample(patched, noise, 6, 2.0, "euler", "simple", pos, neg, lat, seed=0,
                            disable_pbar=True, callback=cancel_at_step_3)
    cancelled = LAST_RUNS.latest()
    assert cancelled["actual"]["stream 0"].startswith("FRRF") and cancelled["actual"]["stream 0"][4:] == "--"
    # marked as cancelled, its figures over the 4 steps that ran, the steps never run without a time
    assert cancelled["status"] == "cancelled" and cancelled["steps_run"] == 4
    assert cancelled["headline"].startswith("cancelled after 4 of 6 steps; over those: about")
    assert cancelled["seconds_per_step"][4:] == [None, None] and all(cancelled["seconds_per_step"][:4])
    assert cancelled["schedule_speedup"] == 2.0                  # 4 steps, 2 of them full
    assert sorted(cancelled["stream_labels"].values()) == ["negative", "positive"]   # CFG 2: both passes
    assert _no_instance_forwards(mp) == []
    assert torch.equal(comfy_env.sample(patched, "wan"), comfy_env.sample(_apply(pack, mp).result[0], "wan"))


def test_library_names_never_leave_the_schedule_folders(pack, tmp_path, monkeypatch):
    from procache_comfyui.nodes import library
    from procache_comfyui.procache_core import ScheduleError
    secret = tmp_path / "secret.json"
    secret.write_text('{"format": "procache.schedule", "version": 1, "pattern": [1]}')
    for name in ["../../etc/passwd", str(secret), "../schedules/procache-dit-50-17full", "user/../../x"]:
        with pytest.raises(ScheduleError, match="no schedule named"):
            library.load(name)
    monkeypatch.setattr(library, "user_dir", lambda: str(tmp_path))
    (tmp_path / "huge.json").write_text("{" + " " * (library.MAX_FILE_BYTES + 10) + "}")
    with pytest.raises(ScheduleError, match="larger than 1 MiB"):
        library.load("user/huge")
    (tmp_path / "old.json").write_text('{"format": "procache.schedule", "version": 7, "pattern": [1, 0]}')
    with pytest.raises(ScheduleError, match="version 7"):
        library.load("user/old")
    with pytest.raises(ScheduleError, match="letters, digits"):
        library.save_user(library.load("procache-dit-50-17full"), "../escape")
