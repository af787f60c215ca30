"""SD3 / SD3.5 (ComfyUI `MMDiT`): joint blocks of an image (`x_block`) and a text (`context_block`) stream.

Both streams attend jointly between `qkv` and `proj`, so on reuse steps the joint block runs the
small forward below: it recomputes each stream's adaLN modulation and adds the cached pre-gate
attention and MLP outputs. SD3.5 Medium's second image self-attention (`attn2`, first blocks only)
is one more cached branch; the last block's text stream is `pre_only` (no output) and has none.
"""
import torch

from ..tokens import gather_tokens
from .base import BlockStack, Branch, FamilySpec


def _modulate(x, shift, scale):
    if shift is None:
        return x * (1 + scale.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _stream(block, branch, prefix, h, c):
    """DismantledBlock.post_attention with cached branch outputs; `h` is the stream's input."""
    mods = block.adaLN_modulation(c)
    if block.x_block_self_attn:
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp, _, _, gate_msa2 = mods.chunk(9, dim=1)
        attn = gate_msa.unsqueeze(1) * branch(f"{prefix}_attn", like=h)
        attn2 = gate_msa2.unsqueeze(1) * branch(f"{prefix}_attn2", like=h)
        h = torch.stack([h, attn, attn2], dim=0).sum(dim=0)
    else:
        if block.scale_mod_only:
            _, gate_msa, scale_mlp, gate_mlp = mods.chunk(4, dim=1)
            shift_mlp = None
        else:
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)
        h = h + gate_msa.unsqueeze(1) * branch(f"{prefix}_attn", like=h)
    mlp = branch(f"{prefix}_mlp", like=h, tokens=lambda: _modulate(block.norm2(h), shift_mlp, scale_mlp),
                 rows=lambda idx, tokens, kept: block.mlp(gather_tokens(tokens, idx)))
    return h + gate_mlp.unsqueeze(1) * mlp


def joint_block_reuse(block, branch, context, x, c, use_checkpoint=True, transformer_options={}):
    text = block.context_block
    context = None if text.pre_only else _stream(text, branch, "ctx", context, c)
    return context, _stream(block.x_block, branch, "x", x, c)


def _is_sd3(model) -> bool:
    blocks = getattr(model, "joint_blocks", None)
    if not blocks:
        return False
    first = blocks[0]
    return (hasattr(first, "context_block") and hasattr(first, "x_block")
            and all(hasattr(first.x_block, n) for n in ("adaLN_modulation", "attn", "mlp", "norm2")))


SD3 = FamilySpec(
    name="sd3",
    description="SD3/SD3.5: joint blocks (image/text attention and MLP)",
    stacks=(BlockStack("joint_blocks", reuse_forward=joint_block_reuse, branches=(
        Branch("x_attn", "x_block.attn.proj", role="self_attention", cost_paths=("x_block.attn",)),
        Branch("x_attn2", "x_block.attn2.proj", role="self_attention", cost_paths=("x_block.attn2",), optional=True),
        Branch("x_mlp", "x_block.mlp", role="mlp"),
        Branch("ctx_attn", "context_block.attn.proj", role="self_attention", cost_paths=("context_block.attn",),
               optional=True),
        Branch("ctx_mlp", "context_block.mlp", role="mlp", optional=True),
    )),),
    detect=_is_sd3,
)
