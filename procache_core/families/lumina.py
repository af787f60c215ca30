"""Lumina 2 / Z-Image / NewBie (ComfyUI `NextDiT`): single-stream joint blocks over text + image tokens.

The attention is a whole submodule (`attention`, from projection to output) and so is the
SwiGLU `feed_forward`; both are cached as they are, and Lumina's own block code still applies the
tanh gates, the post-norms and the fp16 clamp on reuse steps. The refiner blocks that prepare the
text and image tokens before the main `layers` are small and always run.
"""
from .base import BlockStack, Branch, FamilySpec


def _is_lumina(model) -> bool:
    # recognised by the model's own parts; whether the blocks still fit is FamilySpec.problems' job
    return all(hasattr(model, n) for n in ("layers", "noise_refiner", "context_refiner", "cap_embedder"))


LUMINA = FamilySpec(
    name="lumina2",
    description="Lumina 2 / Z-Image: joint attention and feed-forward per block",
    stacks=(BlockStack("layers", branches=(
        Branch("attention", "attention", role="self_attention"),
        Branch("feed_forward", "feed_forward", role="mlp"),
    )),),
    detect=_is_lumina,
)
