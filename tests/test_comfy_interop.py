"""ProCache next to the rest of a user's graph, inside a real ComfyUI (tiny Flux, random weights):
LoRA patches (before and after Apply), TorchCompileModel's wrapper (before and after Apply), a
second sampler continuing the first, ComfyUI's EasyCache / LazyCache on the same model,
bf16 / fp16 / fp8 (manual cast) weights, and a Flux ControlNet applied by ControlNetApplyAdvanced."""
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


# ---- ControlNet ------------------------------------------------------------------------------------
def _flux_controlnet(seed=5):
    """A tiny XLabs-style Flux ControlNet built as comfy.controlnet's Flux loader builds one
    (ComfyUI's ControlNetFlux wrapped in comfy.controlnet.ControlNet), with random weights: it runs
    the tiny Flux's double and single blocks on the latent plus the embedded hint image and returns
    a residual for every block of the main model."""
    import comfy.controlnet
    import comfy.ldm.flux.controlnet
    import comfy.ops
    _, unet_config = comfy_env.tiny_config("flux")
    model = comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, device=torch.device("cpu"),
                                                     dtype=torch.float32, **unet_config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return comfy.controlnet.ControlNet(model, load_device=torch.device("cpu"), manual_cast_dtype=None,
                                      extra_conds=["y", "guidance"])


def _controlled_conds(control_net, seed=0, strength=1.0):
    """The tiny Flux conditioning with the ControlNet attached by ComfyUI's ControlNetApplyAdvanced."""
    import nodes
    latent, pos, neg = comfy_env.latent_and_conds("flux", seed=seed)
    hint = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(seed + 3))     # an IMAGE (B, H, W, C)
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control_net, hint, strength, 0.0, 1.0)
    return latent, pos, neg


def _sample_with(patcher, conds, steps=4, seed=0):
    import comfy.sample
    latent, pos, neg = conds
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, 2.0, "euler", "simple", pos, neg, latent, seed=seed,
                               disable_pbar=True)


def test_controlnet_all_full_equals_the_controlled_model(pack):
    mp = comfy_env.make_patcher("flux")
    controlled = _controlled_conds(_flux_controlnet())
    plain = _sample_with(mp, controlled)
    assert not torch.allclose(plain, _sample_with(mp, comfy_env.latent_and_conds("flux")), atol=1e-4)   # it acts
    assert torch.equal(_sample_with(_attach(mp, FULL), controlled), plain)
    assert not [n for n, m in mp.model.diffusion_model.named_modules() if "forward" in m.__dict__]


def _replayed_branches(mp, conds, steps=3, control_net=None):
    """ComfyUI's own Flux with every cached branch output (attention projections, MLPs, single
    blocks' linear2) replayed from the first step; with `control_net`, its residuals after the
    first step are replaced by zeros (a ControlNet that only acted on the full step)."""
    dm = mp.model.diffusion_model
    branch_outputs = ([m for b in dm.double_blocks for m in (b.img_attn.proj, b.img_mlp, b.txt_attn.proj, b.txt_mlp)]
                      + [b.linear2 for b in dm.single_blocks])
    seen, calls = {}, []

    def replay(key):
        def hook(module, args, output):
            return seen.setdefault(key, output)
        return hook

    def first_step_only(module, args, output):
        calls.append(1)
        if len(calls) > 1:
            return {k: [None if x is None else torch.zeros_like(x) for x in v] for k, v in output.items()}
    hooks = [m.register_forward_hook(replay(i)) for i, m in enumerate(branch_outputs)]
    if control_net is not None:
        hooks.append(control_net.control_model.register_forward_hook(first_step_only))
    try:
        return _sample_with(mp, conds, steps=steps)
    finally:
        for h in hooks:
            h.remove()


def test_controlnet_residuals_apply_on_reuse_steps(pack):
    """Flux adds the ControlNet's residuals after each block in its own forward, outside the cached
    branches: on a reuse step the block adds its cached branch outputs and then the residual of
    this step's ControlNet call. The reference is ComfyUI's own model with the cached branch
    outputs replayed from the full step (forward hooks); the ControlNet runs at every step."""
    from procache_comfyui.nodes.runtime import LAST_RUNS
    mp = comfy_env.make_patcher("flux")
    control_net = _flux_controlnet()
    controlled = _controlled_conds(control_net)
    calls = []
    counter = control_net.control_model.register_forward_hook(lambda m, a, o: calls.append(a))
    try:
        cached = _sample_with(_attach(mp, (1, 0, 0)), controlled, steps=3)
    finally:
        counter.remove()
    run = LAST_RUNS.latest()
    assert run["mode"] == "branch:flux" and run["counts"]["reuse"] == 2
    assert len(calls) == 3                      # one (batched) ControlNet call per step, reuse steps too
    assert torch.isfinite(cached).all()

    reference = _replayed_branches(mp, controlled)
    assert torch.allclose(cached, reference, atol=1e-5, rtol=1e-5), (cached - reference).abs().max()
    # the residuals of the two reuse steps matter: without them the result is another one
    full_step_control_only = _replayed_branches(mp, controlled, control_net=control_net)
    assert not torch.allclose(cached, full_step_control_only, atol=1e-4)
    assert not torch.allclose(cached, _sample_with(_attach(mp, (1, 0, 0)), comfy_env.latent_and_conds("flux"), steps=3),
                              atol=1e-4)


# ---- low-VRAM partial loading ----------------------------------------------------------------------
def _load_partially(monkeypatch, budget):
    """ComfyUI loads a model partially when the GPU lacks room for its weights: load_models_gpu
    hands LoadedModel.model_load a weight budget below the model's size, and ModelPatcher.load
    keeps the modules that do not fit on the offload device with comfy_cast_weights on (each
    forward casts its weight to the compute device) and their LoRA patches as LowVramPatch weight
    functions applied at that cast. On a CPU-only ComfyUI the budget is always 'everything'; this
    passes `budget` bytes instead, so the real partial-load code runs (load and offload devices
    are both the CPU, so the casts copy without moving)."""
    import comfy.model_management
    full_load = comfy.model_management.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        # as load_models_gpu does: the memory to use beyond what is loaded already, never 0 ('all')
        more = max(0.1, budget - self.model_loaded_memory())
        return full_load(self, more, force_patch_weights=force_patch_weights)
    monkeypatch.setattr(comfy.model_management.LoadedModel, "model_load", model_load)


def _cast_state(dm):
    """(modules casting their weights per forward, of them with LoRA weight functions, modules
    loaded as usual) among the modules that can cast."""
    castable = [m for m in dm.modules() if hasattr(m, "comfy_cast_weights")]
    cast = [m for m in castable if m.comfy_cast_weights]
    patched = [m for m in cast if any(type(f).__name__ == "LowVramPatch" for f in m.weight_function)]
    return len(cast), len(patched), len(castable) - len(cast)


def test_low_vram_partial_load_with_lora(pack, monkeypatch):
    import comfy.model_management
    from procache_comfyui.nodes.runtime import LAST_RUNS
    mp = comfy_env.make_patcher("flux")
    lora = mp.clone()
    lora.add_patches(_lora_patches(mp), 1.0)
    loaded_fully = comfy_env.sample(lora, "flux", steps=3)
    cached_loaded_fully = comfy_env.sample(_attach(lora, (1, 0, 2)), "flux", steps=3)

    dm = mp.model.diffusion_model
    states = []
    probe = dm.register_forward_pre_hook(lambda module, args: states.append(_cast_state(module)))
    counted = ([m for b in dm.double_blocks for m in (b.img_attn.qkv, b.img_mlp[0], b.txt_attn.qkv)]
               + [b.linear1 for b in dm.single_blocks])
    calls = []
    counters = [m.register_forward_hook(lambda module, a, o: calls.append(module.comfy_cast_weights)) for m in counted]
    try:
        comfy.model_management.unload_all_models()      # a loaded model is not reloaded for a smaller budget
        _load_partially(monkeypatch, budget=lora.model_size() // 3)
        plain = comfy_env.sample(lora, "flux", steps=3)
        cast, patched, loaded = states[-1]
        assert cast > 0 and patched > 0 and loaded > 0          # partly loaded, partly cast per module
        calls.clear()
        full = comfy_env.sample(_attach(lora, FULL[:3]), "flux", steps=3)
        full_calls, full_cast = len(calls), set(calls)
        calls.clear()
        reused = comfy_env.sample(_attach(lora, (1, 0, 0)), "flux", steps=3)
        reuse_calls = len(calls)
        assert states[-1][:2] == (cast, patched)                # ProCache's runs were loaded partially too
        cached = comfy_env.sample(_attach(lora, (1, 0, 2)), "flux", steps=3)
        run = LAST_RUNS.latest()
    finally:
        probe.remove()
        for h in counters:
            h.remove()
        comfy.model_management.unload_all_models()          # weights patched back, casts wiped
    assert torch.equal(plain, loaded_fully)      # the LoRA patches computed at each cast are the same weights
    assert torch.equal(full, plain)
    assert full_cast == {True, False}           # the counted branches: some cast per forward, some loaded
    assert full_calls == 3 * len(counted) and reuse_calls == len(counted)
    assert torch.isfinite(reused).all() and not torch.equal(reused, plain)
    assert run["mode"] == "branch:flux" and run["counts"] == {"full": 1, "selective": 1, "reuse": 1}
    assert torch.equal(cached, cached_loaded_fully)
    assert _cast_state(dm)[0] == 0


# ---- image-to-video conditioning -------------------------------------------------------------------
@pytest.mark.parametrize("name,channels,clip_vision,per_frame_timesteps", [
    ("wan21_i2v", 36, True, False), ("wan22_i2v", 36, False, False), ("wan22_ti2v", 48, False, True)])
def test_wan_image_to_video_conditioning_reaches_the_cached_model(pack, name, channels, clip_vision,
                                                                   per_frame_timesteps):
    """The Wan image-to-video families of tests/comfy_families.py (tested there like every family)
    really feed what ComfyUI's I2V nodes produce through ProCache: the concat latent and mask as
    extra input channels, the CLIP-vision features, or per-frame timesteps for the kept frame."""
    import comfy_families
    from procache_comfyui.nodes.runtime import LAST_RUNS
    mp = comfy_families.make_patcher(name)
    seen = []
    hook = mp.model.diffusion_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape[1], args[1].ndim, kwargs.get("clip_fea") is not None)),
        with_kwargs=True)
    try:
        out = comfy_families.sample(_attach(mp, (1, 0)), name, steps=2)
    finally:
        hook.remove()
    assert LAST_RUNS.latest()["mode"] == "branch:wan" and LAST_RUNS.latest()["counts"]["reuse"] == 1
    assert torch.isfinite(out).all()
    assert seen and all(s == (channels, 2 if per_frame_timesteps else 1, clip_vision) for s in seen)
