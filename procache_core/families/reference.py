"""The pack's reference DiT (procache_core.reference.dit): attention and MLP branches."""
from .base import BlockStack, Branch, FamilySpec

REFERENCE = FamilySpec(
    name="reference-dit",
    description="reference DiT: self-attention and MLP, adaLN-Zero gates",
    stacks=(BlockStack("blocks", branches=(
        Branch("attn", "attn", role="self_attention"),
        Branch("mlp", "mlp", role="mlp"),
    )),),
    detect=lambda m: type(m).__name__ == "DiT" and hasattr(m, "blocks") and hasattr(m, "final_layer"),
)
