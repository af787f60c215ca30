"""LTX-Video (ComfyUI `LTXVModel`): self-attention, cross-attention and feed-forward per block.

The three branches are whole submodules, so reuse hands their cached outputs back inside LTXV's
own block code, which still applies the per-token modulation (image-to-video conditioning gives
each token its own timestep) and the in-place residual adds around them.

LTX-2 audio-video (`LTXAVModel`, ComfyUI 0.8.0) adds audio and cross-modal attention to every block;
it is not covered here and gets model-level reuse.
"""
from .base import BlockStack, Branch, FamilySpec


def _is_ltxv(model) -> bool:
    return (all(hasattr(model, n) for n in ("transformer_blocks", "adaln_single", "patchify_proj", "caption_projection"))
            and not hasattr(model, "audio_in_channels"))


LTXV = FamilySpec(
    name="ltxv",
    description="LTX-Video: self-attention, cross-attention and feed-forward per block",
    stacks=(BlockStack("transformer_blocks", branches=(
        Branch("attn1", "attn1", role="self_attention"),
        Branch("attn2", "attn2", role="cross_attention"),
        Branch("ff", "ff", role="mlp"),
    )),),
    detect=_is_ltxv,
)
