"""Wan 2.1 / 2.2 (ComfyUI `WanModel` and its variants): self-attention, cross-attention, FFN.

Wan's per-frame modulation (Wan 2.2 TI2V) is applied by Wan's own block code around the branches,
so it is right on reuse steps without any Wan-specific code here.
"""
from .base import BlockStack, Branch, FamilySpec


def _is_wan(model) -> bool:
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0 or not hasattr(model, "patch_embedding"):
        return False
    first = blocks[0]
    return all(hasattr(first, name) for name in ("self_attn", "cross_attn", "ffn", "modulation"))


WAN = FamilySpec(
    name="wan",
    description="Wan 2.1/2.2: self-attention, cross-attention and FFN per block",
    stacks=(BlockStack("blocks", branches=(
        Branch("self_attn", "self_attn", role="self_attention"),
        Branch("cross_attn", "cross_attn", role="cross_attention"),
        Branch("ffn", "ffn", role="mlp"),
    )),),
    detect=_is_wan,
)
