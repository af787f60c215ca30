"""Token selection inside a real ComfyUI, on tiny PixArt, Flux and Wan models.

The selector's picks on a selective step are compared with a top-k computed here from ComfyUI's
own tensors, read with forward hooks at the full step: the attention maps are formed in full
(softmax over every key, ComfyUI's own rotary embedding), which the pack never does.
"""
import pytest
import torch

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

FAMILIES = ("pixart", "flux", "wan")
PICKS: list = []
MEASURED: list = []         # per pick: whether the block had an attention score from its probe


@pytest.fixture(scope="module")
def pack():
    comfy_env.load_pack()
    from procache_comfyui.nodes import runtime
    from procache_comfyui.procache_core import TokenSelector

    class Recording(TokenSelector):
        def select(self, ctx):
            idx = super().select(ctx)
            PICKS.append((ctx.block, ctx.role, ctx.tokens.shape[1], idx.clone()))
            MEASURED.append(ctx.importance is not None)
            return idx
    return runtime, Recording


def _patcher(family):
    """A tiny model whose attention is peaked, not near uniform (random weights at 0.02 give
    q·k close to 0, and near-equal scores would make the top-k a matter of rounding)."""
    mp = comfy_env.make_patcher(family)
    dm = mp.model.diffusion_model
    if family == "pixart":
        sharpen = [m for b in dm.blocks for m in (b.attn.qkv, b.cross_attn.q_linear, b.cross_attn.kv_linear)]
    elif family == "wan":
        sharpen = [m for b in dm.blocks for a in (b.self_attn, b.cross_attn) for m in (a.norm_q, a.norm_k)]
    else:
        sharpen = [b.img_attn.norm for b in dm.double_blocks] + [b.txt_attn.norm for b in dm.double_blocks]
        sharpen += [b.norm for b in dm.single_blocks]
    with torch.no_grad():
        for module in sharpen:
            for p in module.parameters():
                p.mul_(40.0)
    return mp


def _run(pack, mp, family, **selector):
    from procache_comfyui.procache_core import Schedule
    runtime, recording = pack
    PICKS.clear()
    MEASURED.clear()
    config = runtime.ApplyConfig(schedule=Schedule(kinds=(1, 2)), deep_fraction=1.0,
                                 selector=recording(**{"ratio": 0.25, "staleness_weight": 0, "attention_queries": 4096,
                                                       **selector}))
    comfy_env.sample(runtime.attach(mp, config), family, steps=2, cfg=2.0)
    return list(PICKS)


# ---- reading ComfyUI's tensors at the full step ---------------------------------------------------
class Reader:
    """Forward hooks that keep the first output (the full step's) of each named module."""

    def __init__(self):
        self.seen, self.hooks = {}, []

    def output(self, name, module):
        self.hooks.append(module.register_forward_hook(lambda m, a, o: self.seen.setdefault(name, o)))

    def inputs(self, name, module):
        self.hooks.append(module.register_forward_pre_hook(
            lambda m, a, kw: self.seen.setdefault(name, (a, kw)), with_kwargs=True))

    def remove(self):
        for h in self.hooks:
            h.remove()


def _heads(x, heads):                       # [B, N, C] -> [B, H, N, D]
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attention(q, k):                       # [B, H, Nq, Nk], formed in full
    return torch.softmax(q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


def _received(q, k, rows=None):
    attention = _attention(q, k)
    return (attention if rows is None else attention[:, :, rows]).mean(dim=(1, 2))


def _entropy(q, k_text):
    p = _attention(q, k_text).mean(dim=1)
    return -(p * torch.log(p + 1e-7)).sum(-1)


def _read(family, mp):
    dm = mp.model.diffusion_model
    r = Reader()
    if family == "pixart":
        for i, b in enumerate(dm.blocks):
            r.output(("qkv", i), b.attn.qkv)
            r.output(("cq", i), b.cross_attn.q_linear)
            r.output(("ckv", i), b.cross_attn.kv_linear)
            r.output(("cross_attention", i), b.cross_attn)
            r.output(("mlp", i), b.mlp)
    elif family == "wan":
        for i, b in enumerate(dm.blocks):
            r.inputs(("self_in", i), b.self_attn)
            r.output(("sq", i), b.self_attn.norm_q)
            r.output(("sk", i), b.self_attn.norm_k)
            r.output(("cq", i), b.cross_attn.norm_q)
            r.output(("ck", i), b.cross_attn.norm_k)
            r.output(("cross_attention", i), b.cross_attn)
            r.output(("mlp", i), b.ffn)
    else:
        for i, b in enumerate(dm.double_blocks):
            r.inputs(("in", i), b)
            r.output(("img_qk", i), b.img_attn.norm)
            r.output(("txt_qk", i), b.txt_attn.norm)
            r.output(("img_mlp", i), b.img_mlp)
            r.output(("txt_mlp", i), b.txt_mlp)
        for j, b in enumerate(dm.single_blocks):
            i = j + len(dm.double_blocks)
            r.inputs(("in", i), b)
            r.output(("qk", i), b.norm)
            r.output(("fused", i), b.linear2)
    return r


def _expected(family, mp, seen, score, block, role, n, rows=None):
    """The score of every token of the branch the selector ranked, from the full step's tensors
    (rows: the queries attention_received averages over; None: all)."""
    dm = mp.model.diffusion_model
    if family == "pixart":
        heads = dm.blocks[block].attn.num_heads
        if score == "output_norm":
            return seen[(role, block)].norm(dim=-1)
        if score == "attention_received":
            qkv = seen[("qkv", block)]
            q, k, _ = qkv.view(*qkv.shape[:2], 3, -1).unbind(2)
            return _received(_heads(q, heads), _heads(k, heads), rows)
        q = seen[("cq", block)]
        k = seen[("ckv", block)].reshape(q.shape[0], -1, 2 * q.shape[-1])[..., :q.shape[-1]]
        return _entropy(_heads(q, heads), _heads(k, heads))
    if family == "wan":
        from comfy.ldm.flux.math import apply_rope1
        attn = dm.blocks[block].self_attn
        if score == "output_norm":
            return seen[(role, block)].norm(dim=-1)
        if score == "attention_received":
            freqs = seen[("self_in", block)][0][1]
            q, k = (apply_rope1(seen[(name, block)].view(*seen[(name, block)].shape[:2], attn.num_heads, -1), freqs)
                    .transpose(1, 2) for name in ("sq", "sk"))
            return _received(q, k, rows)
        return _entropy(_heads(seen[("cq", block)], attn.num_heads), _heads(seen[("ck", block)], attn.num_heads))
    # flux
    from comfy.ldm.flux.math import apply_rope
    doubles = len(dm.double_blocks)
    args, kwargs = seen[("in", block)]
    if block < doubles:
        txt_n = seen[("txt_qk", block)][0].shape[2]
        branch = "txt_mlp" if n == txt_n else "img_mlp"
        if score == "output_norm":
            return seen[(branch, block)].norm(dim=-1)
        (iq, ik), (tq, tk) = seen[("img_qk", block)], seen[("txt_qk", block)]
        q, k = apply_rope(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), kwargs["pe"])
    else:
        txt_n = seen[("txt_qk", 0)][0].shape[2]
        if score == "output_norm":
            return seen[("fused", block)].norm(dim=-1)
        q, k = apply_rope(*seen[("qk", block)], kwargs["pe"])
        branch = "fused"
    joint = _received(q, k, rows) if score == "attention_received" else _entropy(q, k[:, :, :txt_n])
    return {"txt_mlp": joint[:, :txt_n], "img_mlp": joint[:, txt_n:], "fused": joint}[branch]


def _assert_top_k(idx, expected, where):
    """idx are the top len(idx) of expected; scores equal to rounding may swap places."""
    k = idx.shape[0]
    tol = 1e-5 * float(expected.abs().max())
    kth = expected.topk(k).values[-1]
    assert float(expected.max() - expected.min()) > 100 * tol            # not a sea of ties
    assert bool((expected[idx] >= kth - tol).all()), where
    chosen = torch.zeros_like(expected, dtype=torch.bool)
    chosen[idx] = True
    unchosen = expected[~chosen]
    assert unchosen.numel() == 0 or float(unchosen.max()) <= float(kth) + tol, where
    clear = expected > kth + tol                                         # clearly in the top k: picked
    assert bool(chosen[clear].all()), where


@pytest.mark.parametrize("score", ["attention_received", "cross_entropy", "output_norm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_selected_tokens_are_the_top_k_of_the_score(pack, family, score):
    mp = _patcher(family)
    reader = _read(family, mp)
    try:
        picks = _run(pack, mp, family, score=score)
    finally:
        reader.remove()
    blocks = {"pixart": 3, "wan": 2, "flux": 4}[family]
    per_block = {"pixart": 2, "wan": 2, "flux": None}[family]        # cross-attention and MLP
    assert {block for block, *_ in picks} == set(range(blocks))       # every block is deep here
    if per_block:
        assert len(picks) == blocks * per_block
    for block, role, n, idx in picks:
        expected = _expected(family, mp, reader.seen, score, block, role, n)
        assert expected.shape == (2, n)                               # cond and uncond in one call
        assert idx.shape == (2, int(0.25 * n))
        for row in range(2):
            _assert_top_k(idx[row], expected[row], (block, role, row))


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_streams_select_on_their_own_or_share(pack, family):
    mp = _patcher(family)
    reader = _read(family, mp)
    try:
        own = _run(pack, mp, family, score="cross_entropy")
        shared = _run(pack, mp, family, score="cross_entropy", shared_streams=True)
    finally:
        reader.remove()
    assert any(not torch.equal(idx[0], idx[1]) for *_, idx in own if idx.shape[1] > 1)
    for block, role, n, idx in shared:
        assert torch.equal(idx[0], idx[1])
        expected = _expected(family, mp, reader.seen, "cross_entropy", block, role, n)
        mean = (expected / expected.norm(dim=1, keepdim=True)).mean(0)
        _assert_top_k(idx[0], mean, (block, role))


def test_selector_node_exposes_every_setting_with_a_tooltip(pack):
    from procache_comfyui.nodes.selector_node import TokenImportanceSelector
    from procache_comfyui.procache_core.tokens import RATIO_SCHEDULES, SCORES
    schema = TokenImportanceSelector.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    assert set(inputs) == {"token_ratio", "ratio_schedule", "deep_fraction", "modules", "score", "staleness_weight",
                           "spatial_bonus", "same_for_cond_uncond", "spatial_grid", "attention_queries"}
    assert all(i.tooltip for i in schema.inputs)
    assert list(inputs["score"].options) == list(SCORES)
    assert list(inputs["ratio_schedule"].options) == list(RATIO_SCHEDULES)
    for score in ("attention_received", "cross_entropy"):
        assert score in inputs["score"].tooltip                  # each attention score says what it costs
    out = TokenImportanceSelector.execute(token_ratio=0.3, ratio_schedule="toca_pixart", deep_fraction=0.5,
                                          modules="mlp only", score="cross_entropy", staleness_weight=0.5,
                                          spatial_bonus=0.4, same_for_cond_uncond=True, spatial_grid=4,
                                          attention_queries=128)
    config = out.result[0]
    sel = config.tokens
    assert config.deep_fraction == 0.5
    assert (sel.ratio, sel.ratio_schedule, sel.modules, sel.score, sel.staleness_weight, sel.spatial_bonus,
            sel.spatial_grid, sel.shared_streams, sel.attention_queries) == \
        (0.3, "toca_pixart", ("mlp",), "cross_entropy", 0.5, 0.4, 4, True, 128)
    older = TokenImportanceSelector.execute(token_ratio=0.1, ratio_schedule="constant", deep_fraction=0.25,
                                            modules="mlp + cross-attention", score="output_norm",
                                            staleness_weight=0.25, spatial_bonus=0.0, same_for_cond_uncond=False)
    assert older.result[0].tokens.attention_queries == 64 and older.result[0].tokens.spatial_grid == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_received_from_sampled_queries(pack, family):
    """With fewer queries than tokens, the score is the mean over the sampled rows of the full map."""
    from procache_comfyui.procache_core import TokenSelector
    mp = _patcher(family)
    reader = _read(family, mp)
    try:
        picks = _run(pack, mp, family, score="attention_received", attention_queries=8)
    finally:
        reader.remove()
    sampler = TokenSelector(attention_queries=8)
    for block, role, n, idx in picks:
        joint = n                                      # queries are drawn from the whole attention sequence
        if family == "flux" and ("txt_qk", block) in reader.seen:
            joint = reader.seen[("txt_qk", block)][0].shape[2] + reader.seen[("img_qk", block)][0].shape[2]
        rows = sampler.query_subset(joint, step=0, block=block)
        assert rows.numel() == 8
        expected = _expected(family, mp, reader.seen, "attention_received", block, role, n, rows)
        for row in range(2):
            _assert_top_k(idx[row], expected[row], (block, role, row))


@pytest.mark.parametrize("name", ["hunyuan_video", "chroma", "flux2", "sd3"])
@pytest.mark.parametrize("score", ["attention_received", "cross_entropy"])
def test_other_models_measure_the_score_or_fall_back_with_a_message(pack, name, score, caplog):
    """Flux-block models (HunyuanVideo with text after the image, Chroma, Flux 2) measure both
    scores in every deep block; a family without probes (SD3) ranks by output_norm and says so."""
    import logging

    import comfy_families
    from procache_comfyui.procache_core import Schedule, tokens
    from procache_comfyui.procache_core.families import FAMILIES as SPECS
    if not comfy_families.available(name):
        pytest.skip(f"{name} is not in ComfyUI {comfy_env.load_comfy()}")
    family = comfy_families.FAMILIES[name]
    runtime, recording = pack
    tokens._fallbacks_logged.clear()
    mp = comfy_families.make_patcher(name)
    PICKS.clear()
    MEASURED.clear()
    config = runtime.ApplyConfig(schedule=Schedule(kinds=(1, 2)), deep_fraction=1.0,
                                 selector=recording(ratio=0.25, staleness_weight=0, score=score))
    with caplog.at_level(logging.INFO, logger="procache"):
        comfy_families.sample(runtime.attach(mp, config), name, steps=2)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "probe" in m and "failed" in m]
    assert PICKS
    if {f.name: f for f in SPECS}[family.adapter].provides(score):
        assert all(MEASURED)
        assert not [m for m in messages if "ranking their tokens by output_norm" in m]
    else:
        assert not any(MEASURED)
        assert [m for m in messages if score in m and "output_norm" in m]
