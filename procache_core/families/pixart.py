"""PixArt-α / Σ (ComfyUI `PixArtMS`): self-attention, cross-attention (ungated) and MLP branches.

All three branches are submodules, so reuse hands their cached outputs back inside PixArt's own
block code; the block still recomputes its modulation from `scale_shift_table` and the step's t0.
The attention scores read q and k from the attention modules' own projections and norms.
"""
from ..tokens import attention_received, split_heads, text_entropy
from .base import BlockStack, Branch, FamilySpec

_REFRESHED = ("cross_attn", "mlp")      # both rank the same image tokens


def _received(block, args, kwargs, ctx):
    attn = block.attn
    if not ctx.deep or getattr(attn, "sr_ratio", 1) > 1:    # compressed keys are not the tokens
        return []
    seen = {}

    def on_q(module, inputs, q):                           # q_norm(q): [B, N, C]
        seen["q"] = q[:, ctx.queries(q.shape[1], q.device)]

    def on_k(module, inputs, k):
        if "q" not in seen:
            return
        score = attention_received(split_heads(seen.pop("q"), attn.num_heads), split_heads(k, attn.num_heads))
        ctx.store(dict.fromkeys(_REFRESHED, score))
    return [(attn.q_norm, on_q), (attn.k_norm, on_k)]


def _cross_entropy(block, args, kwargs, ctx):
    cross = block.cross_attn
    if not ctx.deep:
        return []
    seen = {}

    def on_q(module, inputs, q):                           # q_linear(x): [B, N, C]
        seen["q"] = q

    def on_kv(module, inputs, kv):                         # kv_linear(text), text flattened over the batch
        q = seen.pop("q", None)
        if q is None or kv.numel() % (q.shape[0] * 2 * q.shape[-1]):
            return
        keys = kv.reshape(q.shape[0], -1, 2 * q.shape[-1])[..., :q.shape[-1]]
        score = text_entropy(split_heads(q, cross.num_heads), split_heads(keys, cross.num_heads))
        ctx.store(dict.fromkeys(_REFRESHED, score))
    return [(cross.q_linear, on_q), (cross.kv_linear, on_kv)]


def _is_pixart(model) -> bool:
    blocks = getattr(model, "blocks", None)
    return (hasattr(model, "t_block") and hasattr(model, "y_embedder") and blocks is not None
            and len(blocks) > 0 and hasattr(blocks[0], "scale_shift_table") and hasattr(blocks[0], "cross_attn"))


PIXART = FamilySpec(
    name="pixart",
    description="PixArt-α/Σ: self-attention, cross-attention and MLP per block",
    stacks=(BlockStack("blocks", branches=(
        Branch("attn", "attn", role="self_attention", probes=(("attention_received", _received),)),
        Branch("cross_attn", "cross_attn", role="cross_attention", probes=(("cross_entropy", _cross_entropy),)),
        Branch("mlp", "mlp", role="mlp"),
    )),),
    detect=_is_pixart,
)
