"""The pack's reference DiT (procache_core.reference.dit): attention and MLP branches."""
from ..tokens import attention_received, split_heads
from .base import BlockStack, Branch, FamilySpec


def _received(block, args, kwargs, ctx):
    # The attention's qkv projection output holds q and k side by side: [B, N, 3C].
    attn = block.attn
    if not ctx.deep:
        return []

    def hook(module, inputs, out):
        q, k, _ = out.chunk(3, dim=-1)
        sampled = q[:, ctx.queries(q.shape[1], q.device)]
        ctx.store({"mlp": attention_received(split_heads(sampled, attn.heads), split_heads(k, attn.heads))})
    return [(attn.qkv, hook)]


REFERENCE = FamilySpec(
    name="reference-dit",
    description="reference DiT: self-attention and MLP, adaLN-Zero gates",
    stacks=(BlockStack("blocks", branches=(
        Branch("attn", "attn", role="self_attention", probes=(("attention_received", _received),)),
        Branch("mlp", "mlp", role="mlp"),
    )),),
    detect=lambda m: type(m).__name__ == "DiT" and hasattr(m, "blocks") and hasattr(m, "final_layer"),
)
