"""Branch-level caching on every DiT family of ComfyUI's comfy/ldm, on tiny models built from
ComfyUI's own classes (tests/comfy_families.py), against whichever ComfyUI COMFYUI_PATH names.

Per family: the adapter is chosen at Apply time; an all-full schedule is bit-identical to the
unpatched model; reuse steps skip the branches; a selective step at ratio 1 equals ComfyUI's own
model with the non-refreshed outputs replayed from the full step (forward hooks, no pack code);
and a block that no longer looks as the adapter expects falls back to model-level reuse.
"""
import pytest
import torch

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

import comfy_families  # noqa: E402

NAMES = tuple(comfy_families.FAMILIES)


@pytest.fixture(scope="module")
def pack():
    comfy_env.load_pack()
    from procache_comfyui.nodes import runtime
    return runtime


@pytest.fixture(params=NAMES)
def family(request):
    if not comfy_families.available(request.param):
        pytest.skip(f"{request.param} is not in ComfyUI {comfy_env.load_comfy()}")
    return comfy_families.FAMILIES[request.param]


def _cached(runtime, mp, family, kinds, ratio=0.1, deep_fraction=0.25):
    from procache_comfyui.procache_core import Schedule, TokenSelector
    config = runtime.ApplyConfig(schedule=Schedule(kinds=tuple(kinds)), deep_fraction=deep_fraction,
                                 selector=TokenSelector(ratio=ratio, staleness_weight=0))
    return comfy_families.sample(runtime.attach(mp, config), family.name, steps=len(kinds))


def _spec(name):
    from procache_comfyui.procache_core.families import FAMILIES
    return {f.name: f for f in FAMILIES}[name]


def test_adapter_is_chosen(pack, family):
    mp = comfy_families.make_patcher(family.name)
    mode, sentence = pack.describe_model(mp)
    assert mode == family.adapter, sentence
    assert "branch-level" in sentence


def test_all_full_is_bit_identical_and_reuse_skips_the_branches(pack, family):
    mp = comfy_families.make_patcher(family.name)
    plain = comfy_families.sample(mp, family.name, steps=3)
    modules = family.counted(mp.model.diffusion_model)
    calls = {"n": 0}

    def count(module, args, output):
        calls["n"] += 1
    hooks = [m.register_forward_hook(count) for m in modules]
    try:
        full = _cached(pack, mp, family, (1, 1, 1))
        full_calls, calls["n"] = calls["n"], 0
        reused = _cached(pack, mp, family, (1, 0, 0))
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(plain, full)
    assert not [n for n, m in mp.model.diffusion_model.named_modules() if "forward" in m.__dict__]
    assert full_calls == 3 * len(modules)       # one batched call per step (cond and uncond together)
    assert calls["n"] == len(modules)           # the two reuse steps computed none of them
    assert torch.isfinite(reused).all() and not torch.equal(full, reused)


def _replay_hooks(modules, inputs=()):
    """Outputs of `modules`, and the first `width` input features of `inputs` ((module, width)),
    recorded at the first call and put back at every later one."""
    seen, hooks = {}, []

    def replay(key):
        def hook(module, args, output):
            if key not in seen:
                seen[key] = output
                return None
            return seen[key]
        return hook
    def replay_input_part(key, width):
        def hook(module, args):
            x = args[0]
            if key not in seen:
                seen[key] = x[..., :width].clone()
                return None
            return (torch.cat((seen[key], x[..., width:]), dim=-1),)
        return hook
    for i, m in enumerate(modules):
        hooks.append(m.register_forward_hook(replay(i)))
    for i, (m, width) in enumerate(inputs):
        hooks.append(m.register_forward_pre_hook(replay_input_part(("input", i), width)))
    return hooks


def test_selective_ratio_one_equals_recomputing_chosen_modules(pack, family):
    mp = comfy_families.make_patcher(family.name)
    out = _cached(pack, mp, family, (1, 2), ratio=1.0, deep_fraction=1.0)
    dm = mp.model.diffusion_model
    hooks = _replay_hooks(family.replayed(dm), family.replayed_inputs(dm))
    try:
        reference = comfy_families.sample(mp, family.name, steps=2)
    finally:
        for h in hooks:
            h.remove()
    plain_reuse = _cached(pack, mp, family, (1, 2), ratio=0.0, deep_fraction=1.0)
    assert torch.allclose(out, reference, atol=1e-5, rtol=1e-5), (out - reference).abs().max()
    assert not torch.allclose(out, plain_reuse, atol=1e-6)       # the refresh really changed something


def test_selective_recomputes_only_the_selected_share(pack, family):
    mp = comfy_families.make_patcher(family.name)
    modules = family.refreshed(mp.model.diffusion_model)
    rows = []
    # tokens per batch row (Cosmos's MLP sees a [B, T, H, W, C] grid on full steps)
    hooks = [m.register_forward_hook(lambda mod, a, o: rows.append(a[0].shape[1:-1].numel())) for m in modules]
    try:
        _cached(pack, mp, family, (1, 2), ratio=0.25, deep_fraction=1.0)
    finally:
        for h in hooks:
            h.remove()
    full_rows, selective_rows = rows[:len(modules)], rows[len(modules):]
    assert len(selective_rows) == len(modules)
    for full, part in zip(full_rows, selective_rows):
        assert part == int(0.25 * full)


def test_changed_blocks_fall_back_to_model_level(pack, family):
    """A ComfyUI update that renames a branch module: Apply says so and caches the model output."""
    mp = comfy_families.make_patcher(family.name)
    spec = _spec(family.adapter)
    stack = spec.stacks[0]
    path = next(b.path for b in stack.branches if not b.optional)
    block = getattr(mp.model.diffusion_model, stack.attr)[0]
    parent_path, _, leaf = path.rpartition(".")
    parent = block
    for part in filter(None, parent_path.split(".")):
        parent = getattr(parent, part)
    module = getattr(parent, leaf)
    delattr(parent, leaf)
    try:
        mode, sentence = pack.describe_model(mp)
    finally:
        setattr(parent, leaf, module)
    assert mode == "model-level"
    assert family.adapter in sentence and "changed" in sentence and leaf in sentence
