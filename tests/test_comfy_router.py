"""HarmoniCa routers inside a real ComfyUI: ProCache Apply with a router computes exactly the routed
units (tiny PixArt and Flux), and the trainer node trains, reuses its own text, and resumes."""
import pytest
import torch

import comfy_env

pytestmark = [pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH"),
              pytest.mark.usefixtures("one_thread")]

HW = {"pixart": None, "flux": 16, "wan": 8}
STEPS = 5


@pytest.fixture(scope="module")
def pack():
    return comfy_env.load_pack()




def _counters(diffusion_model, family):
    """Hooks counting the expensive submodule of each unit: {(block, 'attention'|'mlp'): calls}."""
    counts, handles = {}, []

    def count(key):
        def hook(module, inputs, output):
            counts[key] = counts.get(key, 0) + 1
        return hook
    if family == "pixart":
        pairs = [(i, b.attn.qkv, b.mlp.fc1) for i, b in enumerate(diffusion_model.blocks)]
    elif family == "wan":
        pairs = [(i, b.self_attn.q, b.ffn[0]) for i, b in enumerate(diffusion_model.blocks)]
    else:
        doubles = list(diffusion_model.double_blocks)
        pairs = [(i, b.img_attn.qkv, b.img_mlp[0]) for i, b in enumerate(doubles)]
        pairs += [(len(doubles) + i, b.linear1, None) for i, b in enumerate(diffusion_model.single_blocks)]
    for i, attention, mlp in pairs:
        handles.append(attention.register_forward_hook(count((i, "attention"))))
        if mlp is not None:
            handles.append(mlp.register_forward_hook(count((i, "mlp"))))
    return counts, handles, len(pairs)


def _router_schedule(pack, rows):
    from procache_comfyui.procache_core.router import Router
    logits = torch.tensor([[5.0 if c == "1" else -5.0 for c in row] for row in rows])
    return Router(logits, tau=0.1, metadata={"steps": len(rows)}).to_schedule()


def _apply(pack, mp, schedule):
    return pack.nodes.apply_node.ProCacheApply.execute(mp, schedule, 0.0, 1.0, False, False).result[0]


@pytest.mark.parametrize("family", ["pixart", "flux", "wan"])
def test_apply_with_a_router_computes_exactly_the_routed_units(pack, family):
    mp = comfy_env.make_patcher(family)
    diffusion_model = mp.model.diffusion_model
    blocks = 4 if family == "flux" else len(diffusion_model.blocks)
    # per step: a mix of attention-only, MLP-only, both and neither per block (Flux single blocks:
    # one fused unit, so their two columns agree)
    patterns = ["11" * blocks, "10" * blocks, "01" * blocks, "1100" * (blocks // 2) + "11" * (blocks % 2), "00" * blocks]
    if family == "flux":
        patterns = ["11111111", "10101100", "01011111", "11000000", "00001100"]
    schedule = _router_schedule(pack, patterns)
    counts, handles, units = _counters(diffusion_model, family)
    try:
        full = comfy_env.sample(mp, family, steps=STEPS, cfg=2.0, hw=HW[family])
        calls_per_step = counts[(0, "attention")] // STEPS      # cond and uncond batched: 1
        counts.clear()
        routed = comfy_env.sample(_apply(pack, mp, schedule), family, steps=STEPS, cfg=2.0, hw=HW[family])
    finally:
        for h in handles:
            h.remove()
    assert {block for block, _ in counts} == set(range(units))     # every block was counted
    for (block, unit), n in sorted(counts.items()):
        column = 2 * block + (unit == "mlp")
        expected = sum(row[column] == "1" or (family == "flux" and block >= 2 and row[column + 1] == "1")
                       for row in patterns)
        assert n == calls_per_step * expected, (block, unit)
    assert torch.isfinite(routed).all() and not torch.equal(routed, full)
    everything = _router_schedule(pack, ["11" * blocks] * STEPS)
    assert torch.equal(comfy_env.sample(_apply(pack, mp, everything), family, steps=STEPS, cfg=2.0, hw=HW[family]), full)


def test_a_router_for_another_model_is_refused_before_the_first_step(pack):
    from procache_comfyui.procache_core import ScheduleError
    mp = comfy_env.make_patcher("pixart")
    blocks = len(mp.model.diffusion_model.blocks)
    schedule = _router_schedule(pack, ["11" * (blocks + 1)] + ["10" * (blocks + 1)] * (STEPS - 1))
    calls = []
    handle = mp.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ScheduleError, match=f"{2 * blocks + 2} units per step but this model has {blocks} blocks"):
            comfy_env.sample(_apply(pack, mp, schedule), "pixart", steps=STEPS, cfg=2.0)
    finally:
        handle.remove()
    assert calls == []          # not one model call was spent on a run that could not finish


def _trainer_args(family, **changes):
    latent, pos, neg = comfy_env.latent_and_conds(family, batch=1, hw=HW[family])
    args = dict(positive=pos, negative=neg, latent_image={"samples": latent}, seed=7, sampler_name="euler",
                scheduler="simple", steps=4, cfg=2.0, iterations=8, beta=1e-3, learning_rate=0.1, tau=0.1,
                lambda_period=100, lambda_mode="code", resume=True)
    args.update(changes)
    return args


def test_trainer_node_trains_a_router_that_apply_runs_and_its_text_reproduces_it(pack, monkeypatch, tmp_path):
    node = pack.nodes.router_node
    monkeypatch.setattr(node, "router_dir", lambda: str(tmp_path))
    mp = comfy_env.make_patcher("pixart")
    out = node.HarmoniCaRouterTrainer.execute(model=mp, **_trainer_args("pixart"), save_name="tiny")
    schedule, text, report = out.result
    assert schedule.steps == 4 and len(schedule.units[0]) == 2 * len(mp.model.diffusion_model.blocks)
    assert out.ui["router"] == [text] and "trained" in report
    from procache_comfyui.procache_core.router import Router
    router = Router.from_text(text)
    assert router.metadata["sampler"] == "euler" and router.metadata["cfg"] == "2.0" and router.tau == 0.1
    assert float(router.metadata["beta"]) == 1e-3 and router.metadata["family"] == "pixart"
    # the saved file and the loader give the same schedule
    assert Router.load(str(tmp_path / "tiny.safetensors")).to_schedule().units == schedule.units
    loaded = node.HarmoniCaRouterLoader.execute("router text (below)", text).result[0]
    assert loaded.units == schedule.units
    # the text kept in the workflow is reused while the settings match: no training
    monkeypatch.setattr(node, "train", lambda *a, **k: pytest.fail("trained again"))
    again = node.HarmoniCaRouterTrainer.execute(model=mp, **_trainer_args("pixart"), router=text)
    assert again.result[0].units == schedule.units
    with pytest.raises(Exception, match="names may use"):      # a bad file name fails before training
        node.HarmoniCaRouterTrainer.execute(model=mp, **_trainer_args("pixart", seed=8), save_name="../x")
    images = comfy_env.sample(_apply(pack, mp, schedule), "pixart", steps=4, cfg=2.0)
    assert torch.isfinite(images).all()


def test_trainer_node_cancelled_then_resumed_matches_an_uninterrupted_run(pack, monkeypatch, tmp_path):
    import comfy.model_management
    node = pack.nodes.router_node
    monkeypatch.setattr(node, "router_dir", lambda: str(tmp_path))
    mp = comfy_env.make_patcher("flux")
    args = _trainer_args("flux", iterations=12)
    whole = node.HarmoniCaRouterTrainer.execute(model=mp, **{**args, "resume": False}).result[1]

    # Cancel as ComfyUI's Cancel button does: the interrupt flag, set when the bar reaches
    # iteration 6 (mid second trajectory); the next check inside the model or the node raises
    def cancel_at_iteration_6(value, total, preview, node_id=None):
        if value == 6:
            comfy.model_management.interrupt_current_processing(True)
    import comfy.utils
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", cancel_at_iteration_6)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            node.HarmoniCaRouterTrainer.execute(model=mp, **args)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    assert len(list(tmp_path.glob(".partial-*"))) == 1
    out = node.HarmoniCaRouterTrainer.execute(model=mp, **args)
    assert "resumed at iteration 4" in out.result[2]
    assert not list(tmp_path.glob(".partial-*"))
    from procache_comfyui.procache_core.router import Router
    assert torch.allclose(Router.from_text(out.result[1]).logits, Router.from_text(whole).logits, atol=1e-5)


def test_trainer_refuses_fp8_weights_with_a_reason_and_trains_bf16(pack):
    """An fp8 checkpoint (ComfyUI's manual cast) runs, but autograd cannot go back through fp8
    weights ("add_stub not implemented for Float8_e4m3fn"): the node says why before training."""
    from test_comfy_interop import _flux_in
    mp = _flux_in(torch.float8_e4m3fn, torch.float32)
    with pytest.raises(Exception, match="needs fp32, fp16 or bf16 weights.*float8_e4m3fn"):
        pack.nodes.router_node.HarmoniCaRouterTrainer.execute(model=mp, **_trainer_args("flux"))
    # bf16 weights train (the gradient runs back through the blocks in bf16)
    out = pack.nodes.router_node.HarmoniCaRouterTrainer.execute(model=_flux_in(torch.bfloat16, None),
                                                                **_trainer_args("flux"))
    assert out.result[0].steps == 4 and "trained" in out.result[2]


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_trainer_node_options_refresh_credit_and_max_reuse(pack, monkeypatch, tmp_path, family):
    from procache_comfyui.procache_core import router_training
    from procache_comfyui.procache_core.router import Router
    node = pack.nodes.router_node
    monkeypatch.setattr(node, "router_dir", lambda: str(tmp_path))
    mp = comfy_env.make_patcher(family)
    # the credit reaches earlier steps' logits through the cache (random weights make it too small
    # to move the logits visibly, so the gradient it adds is what is checked)
    credit, added = router_training.SoftUnits.give_refresh_credit, []

    def recorded(self, grad, logits):
        before = grad.clone()
        credit(self, grad, logits)
        added.append(grad - before)
    monkeypatch.setattr(router_training.SoftUnits, "give_refresh_credit", recorded)
    args = _trainer_args(family, steps=5, iterations=15, beta=1.0, resume=False)
    plain = Router.from_text(node.HarmoniCaRouterTrainer.execute(model=mp, **args).result[1])
    assert not added
    credited = Router.from_text(node.HarmoniCaRouterTrainer.execute(model=mp, **args, refresh_credit=True,
                                                                    router=plain.to_text()).result[1])
    assert credited.metadata["refresh_credit"] == "on" and "refresh_credit" not in plain.metadata
    assert len(added) == 12                                 # every student step of 3 trajectories
    # at step k the credit goes to steps 1..k-1 only
    assert all(float(a[k:].abs().sum()) == 0 for k, a in zip([1, 2, 3, 4] * 3, added))
    assert any(float(a[1:k].abs().sum()) > 0 for k, a in zip([1, 2, 3, 4] * 3, added))
    args["learning_rate"] = 1.0
    plain = Router.from_text(node.HarmoniCaRouterTrainer.execute(model=mp, **args).result[1])
    limited = Router.from_text(node.HarmoniCaRouterTrainer.execute(model=mp, **args, max_reuse=1).result[1])
    # beta 1: the plain router reuses runs of steps; the limited one never two in a row
    mask = limited.mask()
    assert plain.cache_usage_ratio() > limited.cache_usage_ratio() > 0
    assert not (~mask[1:] & ~mask[:-1]).any() and limited.metadata["max_reuse"] == "1"
