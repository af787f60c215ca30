"""Selective steps inside a real ComfyUI, on tiny PixArt, Flux and Wan models.

The reference for "a selective step at ratio 1 equals recomputing the chosen modules for every
token" is built without the pack: ComfyUI's own model runs step 1 with forward hooks that put back
the step-0 outputs of the branches a selective step does not recompute (self-attention; in Flux
single blocks the attention half of linear2's input).
"""
import pytest
import torch

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

FAMILIES = ("pixart", "flux", "wan")


@pytest.fixture(scope="module")
def pack():
    comfy_env.load_pack()
    from procache_comfyui.nodes import runtime
    return runtime


def _selective(runtime, mp, family, ratio, kinds=(1, 2), **selector):
    from procache_comfyui.procache_core import Schedule, TokenSelector
    config = runtime.ApplyConfig(schedule=Schedule(kinds=kinds), deep_fraction=1.0,
                                 selector=TokenSelector(ratio=ratio, staleness_weight=0, **selector))
    return comfy_env.sample(runtime.attach(mp, config), family, steps=len(kinds), cfg=2.0)


def _replay_hooks(model, family):
    """Hooks that record step-0 outputs of non-refreshed parts and put them back at step 1."""
    dm = model.model.diffusion_model
    hooks, seen = [], {}

    def replay_output(key):
        def hook(module, args, output):
            if key not in seen:
                seen[key] = output
                return None
            return seen[key]
        return hook

    def replay_attention_half(key, width):
        def hook(module, args):
            x = args[0]
            if key not in seen:
                seen[key] = x[..., :width].clone()
                return None
            return (torch.cat((seen[key], x[..., width:]), dim=-1),)
        return hook

    if family == "pixart":
        for i, b in enumerate(dm.blocks):
            hooks.append(b.attn.register_forward_hook(replay_output(("attn", i))))
    elif family == "wan":
        for i, b in enumerate(dm.blocks):
            hooks.append(b.self_attn.register_forward_hook(replay_output(("attn", i))))
    else:
        for i, b in enumerate(dm.double_blocks):
            hooks.append(b.img_attn.proj.register_forward_hook(replay_output(("img", i))))
            hooks.append(b.txt_attn.proj.register_forward_hook(replay_output(("txt", i))))
        for i, b in enumerate(dm.single_blocks):
            hooks.append(b.linear2.register_forward_pre_hook(replay_attention_half(("single", i), b.hidden_size)))
    return hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_equals_recomputing_chosen_modules(pack, family):
    mp = comfy_env.make_patcher(family)
    out = _selective(pack, mp, family, ratio=1.0)
    hooks = _replay_hooks(mp, family)
    try:
        reference = comfy_env.sample(mp, family, steps=2, cfg=2.0)
    finally:
        for h in hooks:
            h.remove()
    plain_reuse = _selective(pack, mp, family, ratio=0.0)
    assert torch.allclose(out, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, plain_reuse, atol=1e-6)      # the refresh really changed something


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_equals_reuse(pack, family):
    from procache_comfyui.procache_core import Schedule
    mp = comfy_env.make_patcher(family)
    selective = _selective(pack, mp, family, ratio=0.0, kinds=(1, 0, 2, 0))
    reuse = comfy_env.sample(pack.attach(mp, pack.ApplyConfig(schedule=Schedule(kinds=(1, 0, 0, 0)))), family,
                             steps=4, cfg=2.0)
    assert torch.equal(selective, reuse)


@pytest.mark.parametrize("family", FAMILIES)
def test_selective_recomputes_only_the_selected_share(pack, family):
    """Token-wise modules of deep blocks see ratio x tokens rows on the selective step."""
    mp = comfy_env.make_patcher(family)
    dm = mp.model.diffusion_model
    if family == "flux":
        modules = [b.img_mlp for b in dm.double_blocks] + [b.linear1 for b in dm.single_blocks]
    elif family == "pixart":
        modules = [b.mlp.fc1 for b in dm.blocks]
    else:
        modules = [b.ffn[0] for b in dm.blocks]
    rows = []
    hooks = [m.register_forward_hook(lambda mod, a, o: rows.append(a[0].shape[1])) for m in modules]
    try:
        _selective(pack, mp, family, ratio=0.25)
    finally:
        for h in hooks:
            h.remove()
    full_rows, selective_rows = rows[:len(modules)], rows[len(modules):]
    assert len(selective_rows) == len(modules)           # every deep block refreshed once
    for full, part in zip(full_rows, selective_rows):
        assert part == int(0.25 * full)
