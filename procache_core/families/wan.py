"""Wan 2.1 / 2.2 (ComfyUI `WanModel` and its variants): self-attention, cross-attention, FFN.

Wan's per-frame modulation (Wan 2.2 TI2V) is applied by Wan's own block code around the branches,
so it is right on reuse steps without any Wan-specific code here. The attention scores read q
and k after Wan's q/k norms (self-attention: and its rotary embedding, from the branch inputs).
"""
from ..tokens import attention_received, rotary, split_heads, text_entropy
from .base import BlockStack, Branch, FamilySpec

_REFRESHED = ("cross_attn", "ffn")


def _heads(x, freqs, attn, rows=None):
    # [B, S, C] -> rotary in Wan's [B, S, H, D] layout (tokens on axis 1) -> [B, H, S, D]
    return rotary(x.unflatten(-1, (attn.num_heads, -1)), freqs, rows, dim=1).transpose(1, 2)


def _received(block, args, kwargs, ctx):
    attn = block.self_attn
    freqs = args[1] if len(args) > 1 else kwargs.get("freqs")
    if not ctx.deep:
        return []
    seen = {}

    def on_q(module, inputs, q):
        seen["q"] = q

    def on_k(module, inputs, k):
        if "q" not in seen:
            return
        q = seen.pop("q")
        sampled = ctx.queries(q.shape[1], q.device)
        q = _heads(q[:, sampled], freqs, attn, sampled)
        ctx.store(dict.fromkeys(_REFRESHED, attention_received(q, _heads(k, freqs, attn))))
    return [(attn.norm_q, on_q), (attn.norm_k, on_k)]


def _cross_entropy(block, args, kwargs, ctx):
    cross = block.cross_attn
    if not ctx.deep:
        return []
    seen = {}

    def on_q(module, inputs, q):                           # image queries [B, N, C]
        seen["q"] = q

    def on_k(module, inputs, k):                           # text keys [B, L, C] (I2V: the text part only)
        if "q" not in seen:
            return
        score = text_entropy(split_heads(seen.pop("q"), cross.num_heads), split_heads(k, cross.num_heads))
        ctx.store(dict.fromkeys(_REFRESHED, score))
    return [(cross.norm_q, on_q), (cross.norm_k, on_k)]


def _is_wan(model) -> bool:
    # Recognised by WanModel's own embeddings, not by the branch modules: a block that lost one of
    # them is still Wan, and Apply then says which one changed.
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        return False
    return (all(hasattr(model, name) for name in ("patch_embedding", "text_embedding", "time_projection"))
            and hasattr(blocks[0], "modulation"))


WAN = FamilySpec(
    name="wan",
    description="Wan 2.1/2.2: self-attention, cross-attention and FFN per block",
    stacks=(BlockStack("blocks", branches=(
        Branch("self_attn", "self_attn", role="self_attention", probes=(("attention_received", _received),)),
        Branch("cross_attn", "cross_attn", role="cross_attention", probes=(("cross_entropy", _cross_entropy),)),
        Branch("ffn", "ffn", role="mlp"),
    )),),
    detect=_is_wan,
)
