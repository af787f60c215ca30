"""Token selection on the reference DiT (no ComfyUI): the scores, their top-k, the CFG streams.

Every selection is checked against a top-k computed here, independently, from tensors read off the
model with forward hooks (the full attention map is formed explicitly, which the pack never does).
"""
import logging

import pytest
import torch

from procache_core import Schedule, SchedulePolicy, TokenSelector
from procache_core.reference.dit import DiT, DiTConfig
from procache_core.reference.sampling import sample
from procache_core.tokens import (SCORES, SelectionContext, attention_received, split_heads, text_entropy)

SCHEDULE = Schedule(kinds=(1, 2))        # one full step, then one selective step
DEPTH = 4


class Recording(TokenSelector):
    """A selector that remembers what it selected: (block, indices) per selective branch."""

    def select(self, ctx):
        idx = super().select(ctx)
        picks = RECORDED.setdefault(self, [])
        picks.append((ctx.block, idx.clone()))
        return idx


RECORDED: dict = {}


def _model():
    torch.manual_seed(0)
    m = DiT(DiTConfig(depth=DEPTH, hidden=64, heads=2))
    m.reset_parameters(zero_gates=False)
    with torch.no_grad():                 # classes far apart, so cond and uncond rank tokens differently
        m.y_embedder.weight.normal_(0, 1.0)
    return m.eval()


def _run(m, selector, schedule=SCHEDULE, deep_fraction=0.5, label=3):
    RECORDED.pop(selector, None)
    out = sample(m, torch.tensor([label]), steps=len(schedule.kinds),
                 policy=SchedulePolicy(schedule, deep_fraction=deep_fraction), selector=selector)
    return out, RECORDED.pop(selector, [])


def _capture(m):
    """Per block: step-0 qkv output, step-0 MLP output, MLP input at every step."""
    seen = {"qkv": {}, "mlp_out": {}, "mlp_in": {}}
    hooks = []
    for i, b in enumerate(m.blocks):
        hooks.append(b.attn.qkv.register_forward_hook(
            lambda mod, a, o, i=i: seen["qkv"].setdefault(i, o.detach().clone())))
        hooks.append(b.mlp.register_forward_hook(
            lambda mod, a, o, i=i: seen["mlp_out"].setdefault(i, o.detach().clone())))
        hooks.append(b.mlp.register_forward_pre_hook(
            lambda mod, a, i=i: seen["mlp_in"].setdefault(i, []).append(a[0].detach().clone())))
    return seen, hooks


def _full_map_received(qkv, heads):
    """Mean attention each token receives, from the explicitly formed N x N map of every head."""
    q, k, _ = qkv.chunk(3, dim=-1)
    b, n, c = q.shape
    q = q.view(b, n, heads, -1).transpose(1, 2)
    k = k.view(b, n, heads, -1).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)     # [B, H, N, N]
    return attn.mean(dim=(1, 2))


def _expected_score(score, seen, block, heads):
    if score == "attention_received":
        return _full_map_received(seen["qkv"][block], heads)
    if score in ("output_norm", "cross_entropy"):          # no cross-attention here: output_norm
        return seen["mlp_out"][block].norm(dim=-1)
    now = seen["mlp_in"][block][-1]
    if score == "input_norm":
        return now.norm(dim=-1)
    before = seen["mlp_in"][block][0]
    return (now - before).norm(dim=-1) / before.norm(dim=-1)


def _top(score, k):
    return {tuple(row) for row in score.topk(k, dim=1).indices.sort(dim=1).values.tolist()}


@pytest.mark.parametrize("score", [s for s in SCORES if s != "random"])
def test_selected_tokens_are_the_top_k_of_the_score(score):
    m = _model()
    seen, hooks = _capture(m)
    try:
        _, picks = _run(m, Recording(ratio=0.25, score=score, staleness_weight=0, attention_queries=1024))
    finally:
        for h in hooks:
            h.remove()
    assert [block for block, _ in picks] == [2, 3]           # the deepest half, once each
    for block, idx in picks:
        expected = _expected_score(score, seen, block, m.cfg.heads)
        k = idx.shape[1]
        assert k == m.cfg.tokens // 4
        for row in range(2):                                  # cond and uncond, each its own top-k
            assert set(idx[row].tolist()) == set(expected[row].topk(k).indices.tolist())


def test_random_score_is_seeded_and_varies_by_seed_and_block():
    m = _model()
    _, a = _run(m, Recording(ratio=0.25, score="random", staleness_weight=0, seed=1))
    _, b = _run(m, Recording(ratio=0.25, score="random", staleness_weight=0, seed=1))
    _, c = _run(m, Recording(ratio=0.25, score="random", staleness_weight=0, seed=2))
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert not all(torch.equal(x, y) for (_, x), (_, y) in zip(a, c))
    assert not torch.equal(a[0][1], a[1][1])


@pytest.mark.parametrize("score", ["attention_received", "input_norm"])
def test_cfg_streams_select_on_their_own_or_share(score):
    m = _model()
    seen, hooks = _capture(m)
    try:
        _, own = _run(m, Recording(ratio=0.25, score=score, staleness_weight=0, attention_queries=1024))
        _, shared = _run(m, Recording(ratio=0.25, score=score, staleness_weight=0, attention_queries=1024,
                                      shared_streams=True))
    finally:
        for h in hooks:
            h.remove()
    assert any(not torch.equal(idx[0], idx[1]) for _, idx in own)      # the streams really differ
    for block, idx in shared:
        assert torch.equal(idx[0], idx[1])
        # ... and the shared pick is the top-k of the streams' mean (each stream scaled to unit norm)
        if score == "attention_received":
            expected = _full_map_received(seen["qkv"][block], m.cfg.heads)
        else:
            expected = seen["mlp_in"][block][-1].norm(dim=-1)
        mean = (expected / expected.norm(dim=1, keepdim=True)).mean(0)
        assert set(idx[0].tolist()) == set(mean.topk(idx.shape[1]).indices.tolist())


@pytest.mark.parametrize("score", ["attention_received", "cross_entropy", "output_norm"])
def test_ratio_one_is_the_same_for_every_score_and_ratio_zero_is_reuse(score):
    """Probes only read: at ratio 1 every score gives the same result (all tokens), at 0 plain reuse."""
    m = _model()
    base, _ = _run(m, TokenSelector(ratio=1.0, score="random"), schedule=Schedule(kinds=(1, 0, 2)))
    out, _ = _run(m, TokenSelector(ratio=1.0, score=score), schedule=Schedule(kinds=(1, 0, 2)))
    assert torch.equal(out, base)
    reuse = sample(m, torch.tensor([3]), steps=3, policy=SchedulePolicy(Schedule(kinds=(1, 0, 0))))
    none, _ = _run(m, TokenSelector(ratio=0.0, score=score), schedule=Schedule(kinds=(1, 0, 2)))
    assert torch.equal(none, reuse)


def test_probes_read_only_deep_blocks_on_full_steps_and_leave_no_hooks():
    m = _model()
    calls = []
    hooks = [b.attn.qkv.register_forward_hook(lambda mod, a, o, i=i: calls.append(i)) for i, b in enumerate(m.blocks)]
    sample(m, torch.tensor([3]), steps=4, policy=SchedulePolicy(Schedule(kinds=(1, 0, 2, 0)), deep_fraction=0.5),
           selector=TokenSelector(ratio=0.25, score="attention_received"))
    for h in hooks:
        h.remove()
    assert calls == list(range(DEPTH))                       # one full step; attention never recomputed
    assert all(not b.attn.qkv._forward_hooks for b in m.blocks)
    assert all("forward" not in mod.__dict__ for mod in m.modules())


def test_probe_stores_scores_only_for_deep_blocks():
    from procache_core.clock import StepClock
    from procache_core.engine import Run
    from procache_core.families import find_family
    m = _model()
    run = Run(SchedulePolicy(Schedule(kinds=(1, 2)), deep_fraction=0.5), StepClock([2.0, 1.0, 0.0]),
              find_family(m)[0], selector=TokenSelector(score="attention_received"))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad(), run.model_call(m, 2.0, ("c", "u")):
        m(x, torch.tensor([900, 900]), torch.tensor([1, 10]))
    stored = sorted(k[0] for (stream, k) in run.cache._parts if stream == "c" and k[-1] == "importance")
    assert stored == [2, 3]
    received = run.cache.get(("c", "u"), (3, "mlp", "importance"))
    assert received.shape == (2, m.cfg.tokens)
    assert torch.allclose(received.sum(dim=1), torch.ones(2), atol=1e-5)     # a mean of softmax rows
    run.close()


def test_cross_entropy_falls_back_to_output_norm_with_one_message(caplog):
    from procache_core import tokens
    tokens._fallbacks_logged.clear()
    m = _model()
    with caplog.at_level(logging.INFO, logger="procache"):
        _, fallback = _run(m, Recording(ratio=0.25, score="cross_entropy", staleness_weight=0, seed=5),
                           schedule=Schedule(kinds=(1, 2, 0, 2)))
        _, plain = _run(m, Recording(ratio=0.25, score="output_norm", staleness_weight=0, seed=5),
                        schedule=Schedule(kinds=(1, 2, 0, 2)))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fallback, plain))
    messages = [r.getMessage() for r in caplog.records if "cross_entropy" in r.getMessage()]
    assert len(messages) == 1            # once for this model family and branch, not per block or step
    assert "reference-dit" in messages[0] and "output_norm" in messages[0]


# ---- the two attention scores on constructed inputs ---------------------------------------------
def test_token_every_query_attends_to_ranks_first():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 64, 16, generator=gen)
    k = torch.randn(1, 2, 100, 16, generator=gen) * 0.1
    k[:, :, 37] = q.mean(dim=2) * 3.0                  # aligned with every query's mean direction
    q = q + q.mean(dim=2, keepdim=True)                # and every query leans that way
    received = attention_received(q, k)
    assert received.argmax().item() == 37
    assert received.sum().item() == pytest.approx(1.0, abs=1e-5)
    sel = TokenSelector(ratio=0.01, score="attention_received", staleness_weight=0)
    ctx = SelectionContext(tokens=torch.zeros(1, 100, 8), cached=torch.rand(1, 100, 8), reference=None,
                           staleness=None, step=1, steps=4, block=0, blocks=1, role="mlp", importance=received)
    assert sel.select(ctx).tolist() == [[37]]


def test_sampled_queries_find_the_tokens_all_queries_find():
    """64 of 1024 queries: the received score's top 10 % overlaps the exact one by at least 80 %."""
    gen = torch.Generator().manual_seed(1)
    n, d = 1024, 32
    popularity = torch.rand(n, generator=gen) * 4                         # how strongly each key stands out
    common = torch.randn(d, generator=gen)
    k = (torch.randn(1, 1, n, d, generator=gen) * 0.5 + popularity[:, None] * common / common.norm())
    q = torch.randn(1, 1, n, d, generator=gen) * 0.5 + common / common.norm() * 2
    exact = attention_received(q, k)
    sel = TokenSelector(attention_queries=64)
    idx = sel.query_subset(n, step=3, block=5)
    assert idx.shape == (64,) and torch.equal(idx, idx.sort().values) and idx.unique().numel() == 64
    assert torch.equal(idx, sel.query_subset(n, step=3, block=5))         # seeded
    assert not torch.equal(idx, sel.query_subset(n, step=4, block=5))
    estimate = attention_received(q[:, :, idx], k)
    top = n // 10
    overlap = len(set(exact[0].topk(top).indices.tolist()) & set(estimate[0].topk(top).indices.tolist()))
    assert overlap >= 0.8 * top
    assert torch.equal(TokenSelector(attention_queries=64).query_subset(50, 0, 0), torch.arange(50))


def test_diffuse_text_attention_ranks_first_by_cross_entropy():
    gen = torch.Generator().manual_seed(2)
    k_text = torch.randn(1, 2, 8, 16, generator=gen)
    q = k_text[:, :, torch.arange(20) % 8] * 4.0       # each image token looks sharply at one text token
    q[:, :, 11] = 0.0                                  # this one attends uniformly: log(8) nats
    q[:, :, 4] *= 0.1                                  # and this one fairly diffusely
    entropy = text_entropy(q, k_text)
    assert entropy.shape == (1, 20)
    assert entropy[0, 11].item() == pytest.approx(torch.log(torch.tensor(8.0)).item(), abs=1e-4)
    assert entropy[0].argsort(descending=True)[:2].tolist() == [11, 4]
    assert split_heads(torch.arange(12.0).view(1, 1, 12), 3).shape == (1, 3, 1, 4)


def test_pixart_ratio_schedule_matches_the_method():
    sel = TokenSelector(ratio=0.30, ratio_schedule="toca_pixart")
    assert sel.ratio_at(2, 20, 21, 28, "mlp") == pytest.approx(0.55, abs=5e-3)       # method.md §3.11
    assert sel.ratio_at(17, 20, 21, 28, "mlp") == pytest.approx(0.12, abs=5e-3)
    assert sel.ratio_at(2, 20, 27, 28, "mlp") == pytest.approx(0.6 * sel.ratio_at(2, 20, 21, 28, "mlp"), rel=1e-6)
    assert sel.ratio_at(9, 20, 21, 28, "cross_attention") == pytest.approx(
        0.375 * sel.ratio_at(9, 20, 21, 28, "mlp"), rel=1e-6)
    assert sel.ratio_at(0, 20, 0, 28, "mlp") == 1.0                                   # clamped


def test_selector_checks_its_settings():
    with pytest.raises(ValueError, match="attention_queries"):
        TokenSelector(attention_queries=0)
    with pytest.raises(ValueError, match="score"):
        TokenSelector(score="attention")
