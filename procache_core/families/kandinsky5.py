"""Kandinsky 5 (ComfyUI `Kandinsky5`): visual blocks with self-attention, cross-attention, FFN.

The three branches are whole submodules, cached as they are inside Kandinsky's own block code,
which still recomputes the per-step modulation and gates. The text encoder blocks in front are
small and always run.
"""
from .base import BlockStack, Branch, FamilySpec


def _is_kandinsky5(model) -> bool:
    return all(hasattr(model, n) for n in ("visual_transformer_blocks", "text_transformer_blocks", "visual_embeddings"))


KANDINSKY5 = FamilySpec(
    name="kandinsky5",
    description="Kandinsky 5: self-attention, cross-attention and feed-forward per visual block",
    stacks=(BlockStack("visual_transformer_blocks", branches=(
        Branch("self_attention", "self_attention", role="self_attention"),
        Branch("cross_attention", "cross_attention", role="cross_attention"),
        Branch("feed_forward", "feed_forward", role="mlp"),
    )),),
    detect=_is_kandinsky5,
)
