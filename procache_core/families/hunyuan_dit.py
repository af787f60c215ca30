"""HunyuanDiT 1.0-1.2 (ComfyUI `HunYuanDiT`): self-attention, cross-attention, MLP, long skips.

Both attention modules return a tuple, so their output projections are the cached branches and
the block runs the forward below on reuse steps (the long-skip merge of the second half's blocks
is cheap and always recomputed). The cross-attention's queries carry RoPE by token position, so
selective steps do not refresh it per token; they refresh the MLP.
"""
import torch

from ..tokens import gather_tokens
from .base import BlockStack, Branch, FamilySpec


def block_reuse(block, branch, x, c=None, text_states=None, freq_cis_img=None, skip=None):
    if block.skip_linear is not None:
        cat = torch.cat([x, skip], dim=-1)
        if cat.dtype != x.dtype:
            cat = cat.to(x.dtype)
        x = block.skip_linear(block.skip_norm(cat))
    x = x + branch("attn1", like=x)
    x = x + branch("attn2", like=x)
    h = x
    return x + branch("mlp", like=x, tokens=lambda: block.norm2(h),
                      rows=lambda idx, t, kept: block.mlp(gather_tokens(t, idx)))


def _is_hunyuan_dit(model) -> bool:
    return all(hasattr(model, n) for n in ("blocks", "mlp_t5", "pooler", "extra_embedder", "text_embedding_padding"))


HUNYUAN_DIT = FamilySpec(
    name="hunyuan_dit",
    description="HunyuanDiT: self-attention, cross-attention and MLP per block",
    stacks=(BlockStack("blocks", reuse_forward=block_reuse, branches=(
        Branch("attn1", "attn1.out_proj", role="self_attention", cost_paths=("attn1",)),
        # position-dependent queries: never refreshed per token, like self-attention
        Branch("attn2", "attn2.out_proj", role="self_attention", cost_paths=("attn2",)),
        Branch("mlp", "mlp", role="mlp"),
    )),),
    detect=_is_hunyuan_dit,
)
