"""PixArt-α / Σ (ComfyUI `PixArtMS`): self-attention, cross-attention (ungated) and MLP branches.

All three branches are submodules, so reuse hands their cached outputs back inside PixArt's own
block code; the block still recomputes its modulation from `scale_shift_table` and the step's t0.
"""
from .base import BlockStack, Branch, FamilySpec


def _is_pixart(model) -> bool:
    blocks = getattr(model, "blocks", None)
    return (hasattr(model, "t_block") and hasattr(model, "y_embedder") and blocks is not None
            and len(blocks) > 0 and hasattr(blocks[0], "scale_shift_table") and hasattr(blocks[0], "cross_attn"))


PIXART = FamilySpec(
    name="pixart",
    description="PixArt-α/Σ: self-attention, cross-attention and MLP per block",
    stacks=(BlockStack("blocks", branches=(
        Branch("attn", "attn", role="self_attention"),
        Branch("cross_attn", "cross_attn", role="cross_attention"),
        Branch("mlp", "mlp", role="mlp"),
    )),),
    detect=_is_pixart,
)
