"""Cosmos Predict2 (ComfyUI `MiniTrainDIT`): self-attention, cross-attention and MLP per block.

The three branches are whole submodules, cached as they are inside Cosmos's own block code. The
MLP works on a [B, T, H, W, C] grid of tokens; the engine flattens it to rows for selective steps.
Cosmos 1.0 (`GeneralDIT`, blocks in a ModuleDict) is not covered and gets model-level reuse.
"""
from torch import nn

from .base import BlockStack, Branch, FamilySpec


def _is_cosmos_predict2(model) -> bool:
    return (isinstance(getattr(model, "blocks", None), nn.ModuleList)
            and all(hasattr(model, n) for n in ("x_embedder", "t_embedder", "t_embedding_norm", "final_layer")))


COSMOS_PREDICT2 = FamilySpec(
    name="cosmos_predict2",
    description="Cosmos Predict2: self-attention, cross-attention and MLP per block",
    stacks=(BlockStack("blocks", branches=(
        Branch("self_attn", "self_attn", role="self_attention"),
        Branch("cross_attn", "cross_attn", role="cross_attention"),
        Branch("mlp", "mlp", role="mlp"),
    )),),
    detect=_is_cosmos_predict2,
)
