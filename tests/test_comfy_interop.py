"""ProCache next to the rest of a user's graph, inside a real ComfyUI (tiny Flux, random weights):
LoRA patches (before and after Apply), TorchCompileModel's wrapper (before and after Apply), a
second sampler continuing the first, ComfyUI's EasyCache / LazyCache on the same model, and
bf16 / fp16 / fp8 (manual cast) weights."""
import logging

import pytest
import torch

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

FULL = (1, 1, 1, 1)


@pytest.fixture(scope="module")
def pack():
    comfy_env.load_pack()
    import procache_comfyui
    return procache_comfyui


def _config(kinds):
    from procache_comfyui.nodes import runtime
    from procache_comfyui.procache_core import Schedule
    return runtime.ApplyConfig(schedule=Schedule(kinds=tuple(kinds)))


def _attach(mp, kinds):
    from procache_comfyui.nodes import runtime
    return runtime.attach(mp, _config(kinds))


# ---- LoRA ------------------------------------------------------------------------------------------
def _lora_patches(mp, rank=4, seed=7):
    """What ComfyUI's LoraLoader adds: a LoRA state dict of random up/down pairs for every linear
    weight of the transformer blocks, loaded through comfy.lora."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(mp.model, {})
    state = mp.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, weight_key in key_map.items():
        if not (isinstance(weight_key, str) and name.startswith("diffusion_model.") and "blocks." in name):
            continue
        weight = state.get(weight_key)
        if weight is None or weight.ndim != 2:
            continue
        out_features, in_features = weight.shape
        lora[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.1
        lora[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * 0.1
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    assert len(patches) >= 8          # every block's linears got one
    return patches


def test_lora_then_apply_equals_the_lora_model(pack):
    mp = comfy_env.make_patcher("flux")
    patches = _lora_patches(mp)
    lora = mp.clone()
    lora.add_patches(patches, 1.0)
    with_lora = comfy_env.sample(lora, "flux", steps=4)
    assert not torch.allclose(with_lora, comfy_env.sample(mp, "flux", steps=4), atol=1e-4)   # the LoRA acts
    assert torch.equal(comfy_env.sample(_attach(lora, FULL), "flux", steps=4), with_lora)
    # and the other order: LoRA loaded onto ProCache's output
    applied_first = _attach(mp, FULL).clone()
    applied_first.add_patches(patches, 1.0)
    assert torch.equal(comfy_env.sample(applied_first, "flux", steps=4), with_lora)


def test_lora_model_is_cached_at_branch_level(pack):
    from procache_comfyui.nodes.runtime import LAST_RUNS
    mp = comfy_env.make_patcher("flux")
    lora = mp.clone()
    lora.add_patches(_lora_patches(mp), 1.0)
    cached = comfy_env.sample(_attach(lora, (1, 0, 1, 0)), "flux", steps=4)
    run = LAST_RUNS.latest()
    assert run["mode"] == "branch:flux" and run["counts"]["reuse"] == 2
    assert torch.isfinite(cached).all()
    # reuse on the LoRA model is not reuse on the base model: the patched weights were used
    assert not torch.allclose(cached, comfy_env.sample(_attach(mp, (1, 0, 1, 0)), "flux", steps=4), atol=1e-4)


# ---- TorchCompileModel ---------------------------------------------------------------------------
def test_torch_compile_before_and_after_apply(pack):
    """ComfyUI's TorchCompileModel installs an APPLY_MODEL wrapper that swaps in the compiled
    diffusion model for each call. The 'eager' backend runs TorchDynamo's graph capture (which
    has to trace through ProCache's per-call block forwards) without a C++ build, so the test
    stays short on CPU; inductor adds code generation on top of the same graphs."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY
    import comfy.patcher_extension as pe
    mp = comfy_env.make_patcher("flux")
    kinds = (1, 0)
    reference = comfy_env.sample(_attach(mp, kinds), "flux", steps=2)
    try:
        with torch._dynamo.config.patch(recompile_limit=2, accumulated_recompile_limit=8):
            compiled_first = mp.clone()
            set_torch_compile_wrapper(compiled_first, backend="eager")
            applied = _attach(compiled_first, kinds)
            assert applied.get_wrappers(pe.WrappersMP.APPLY_MODEL, COMPILE_KEY)      # Apply kept it
            out_compile_then_apply = comfy_env.sample(applied, "flux", steps=2)

            applied_first = _attach(mp, kinds)
            set_torch_compile_wrapper(applied_first, backend="eager")
            assert applied_first.get_wrappers(pe.WrappersMP.APPLY_MODEL, "procache")
            out_apply_then_compile = comfy_env.sample(applied_first, "flux", steps=2)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out_compile_then_apply, reference)
    assert torch.equal(out_apply_then_compile, reference)
    assert not [n for n, m in mp.model.diffusion_model.named_modules() if "forward" in m.__dict__]


# ---- a second sampler continuing the first -------------------------------------------------------
def _two_samplers(patcher, split=2, steps=4, seed=0, second=None, family="flux"):
    """KSamplerAdvanced x 2: the first adds noise and stops at `split` with noise left, the second
    (the same model unless `second` is given) continues from its latent without adding noise."""
    import comfy.sample
    latent, pos, neg = comfy_env.latent_and_conds(family, seed=seed)
    noise = comfy.sample.prepare_noise(latent, seed)
    first = comfy.sample.sample(patcher, noise, steps, 2.0, "euler", "simple", pos, neg, latent,
                                start_step=0, last_step=split, force_full_denoise=False, seed=seed, disable_pbar=True)
    return comfy.sample.sample(second or patcher, torch.zeros_like(first), steps, 2.0, "euler", "simple", pos, neg, first,
                               start_step=split, last_step=steps, force_full_denoise=True, seed=seed,
                               disable_pbar=True)


def test_second_sampler_continues_the_schedule(pack):
    from procache_comfyui.nodes.runtime import LAST_RUNS
    mp = comfy_env.make_patcher("flux")
    assert torch.equal(_two_samplers(_attach(mp, FULL)), _two_samplers(mp))
    out = _two_samplers(_attach(mp, (1, 0, 0, 0, 1, 0)), split=3, steps=6)
    second = LAST_RUNS.latest()
    assert second["planned"] == "110"          # steps 3..5 of the schedule; a run's first step is full
    assert any("steps 3..5" in note for note in second["notes"])
    # the same as a second sampler given a 3-step schedule of that slice
    sliced = _two_samplers(_attach(mp, (1, 0, 0, 0, 1, 0)), split=3, steps=6, second=_attach(mp, (1, 1, 0)))
    assert torch.equal(out, sliced)
    assert not torch.equal(out, _two_samplers(mp, split=3, steps=6))


def test_wan22_high_and_low_noise_models_share_one_schedule(pack):
    """Wan 2.2 A14B: a high-noise model samples the first steps, a low-noise model the rest; each
    has its own Apply with the same schedule, and each run takes its own part of it."""
    from procache_comfyui.nodes.runtime import LAST_RUNS
    high, low = comfy_env.make_patcher("wan", seed=0), comfy_env.make_patcher("wan", seed=1)
    schedule = (1, 0, 0, 0, 1, 0)
    out = _two_samplers(_attach(high, schedule), split=3, steps=6, second=_attach(low, schedule), family="wan")
    first, second = LAST_RUNS.all()[-2:]
    assert (first["planned"], second["planned"]) == ("100", "110")
    assert first["mode"] == second["mode"] == "branch:wan"
    assert any("steps 3..5" in note for note in second["notes"])
    assert torch.equal(out, _two_samplers(_attach(high, (1, 0, 0)), split=3, steps=6,
                                          second=_attach(low, (1, 1, 0)), family="wan"))


# ---- EasyCache / LazyCache -------------------------------------------------------------------------
def _other_cache(mp, name):
    from comfy_extras import nodes_easycache
    node = {"EasyCache": nodes_easycache.EasyCacheNode, "LazyCache": nodes_easycache.LazyCacheNode}[name]
    return node.execute(mp, 0.2, 0.15, 0.95, False).result[0]


def _apply_node(pack, mp, pattern="1,0,1,0"):
    from procache_comfyui.procache_core import parse_pattern
    return pack.nodes.apply_node.ProCacheApply.execute(mp, parse_pattern(pattern), 0.0, 1.0, False, False)


@pytest.mark.parametrize("other", ["EasyCache", "LazyCache"])
def test_other_cache_before_apply_is_reported(pack, other, caplog):
    mp = comfy_env.make_patcher("flux")
    clean = _apply_node(pack, mp).result[1]
    assert "WARNING" not in clean
    with caplog.at_level(logging.WARNING, logger="procache"):
        report = _apply_node(pack, _other_cache(mp, other)).result[1]
    assert report.startswith("WARNING") and other in report
    assert any(other in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("other", ["EasyCache", "LazyCache"])
def test_other_cache_after_apply_is_reported_at_sampling(pack, other, caplog):
    from procache_comfyui.nodes.runtime import LAST_RUNS
    mp = comfy_env.make_patcher("flux")
    stacked = _other_cache(_apply_node(pack, mp).result[0], other)
    with caplog.at_level(logging.WARNING, logger="procache"):
        out = comfy_env.sample(stacked, "flux", steps=4)
    assert torch.isfinite(out).all()
    assert any(other in note and "also applied" in note for note in LAST_RUNS.latest()["notes"])
    assert any(other in r.getMessage() for r in caplog.records)


# ---- weight dtypes ---------------------------------------------------------------------------------
def _flux_in(weight_dtype, compute_dtype):
    """Tiny Flux with weights stored in `weight_dtype`; compute_dtype set means ComfyUI's manual cast
    (as for fp8 checkpoints: weights are cast to the compute dtype op by op)."""
    import comfy.model_patcher
    cls, unet_config = comfy_env.tiny_config("flux")
    cfg = cls(unet_config)
    cfg.set_inference_dtype(weight_dtype, compute_dtype)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    comfy_env._fill(model, 0)      # fills in float32, stored in the weight dtype
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.parametrize("weight_dtype,compute_dtype", [
    (torch.bfloat16, None), (torch.float16, None), (torch.float8_e4m3fn, torch.float32)],
    ids=["bf16", "fp16", "fp8-manual-cast"])
def test_low_precision_weights(pack, weight_dtype, compute_dtype):
    from procache_comfyui.nodes.runtime import LAST_RUNS
    mp = _flux_in(weight_dtype, compute_dtype)
    assert next(mp.model.diffusion_model.parameters()).dtype == weight_dtype
    plain = comfy_env.sample(mp, "flux", steps=4)
    assert torch.equal(comfy_env.sample(_attach(mp, FULL), "flux", steps=4), plain)
    cached = comfy_env.sample(_attach(mp, (1, 0, 2, 0)), "flux", steps=4)
    run = LAST_RUNS.latest()
    assert run["mode"] == "branch:flux" and run["counts"] == {"full": 1, "selective": 1, "reuse": 2}
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
