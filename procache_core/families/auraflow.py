"""AuraFlow (ComfyUI `aura.mmdit.MMDiT`): joint text/image blocks, then single-stream blocks.

The joint attention returns both streams at once, so its two output projections are the cached
attention branches and the joint block runs the forward below on reuse steps. AuraFlow normalises
the stream after the attention residual and adds the MLP to the block's input, not to that
normalised stream; the forward keeps that order. Single-stream blocks cache their attention and
MLP submodules as they are.
"""
from ..tokens import gather_tokens
from .base import BlockStack, Branch, FamilySpec


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _stream(branch, prefix, h, mods, norm2, mlp):
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.chunk(6, dim=1)
    normed = norm2(h + gate_msa.unsqueeze(1) * branch(f"{prefix}_attn", like=h))
    out = branch(f"{prefix}_mlp", like=h, tokens=lambda: _modulate(normed, shift_mlp, scale_mlp),
                 rows=lambda idx, t, kept: mlp(gather_tokens(t, idx)))
    return h + gate_mlp.unsqueeze(1) * out


def joint_block_reuse(block, branch, c, x, global_cond, transformer_options={}, **kwargs):
    c = _stream(branch, "c", c, block.modC(global_cond), block.normC2, block.mlpC)
    x = _stream(branch, "x", x, block.modX(global_cond), block.normX2, block.mlpX)
    return c, x


def _is_auraflow(model) -> bool:
    return all(hasattr(model, n) for n in ("double_layers", "single_layers", "register_tokens", "cond_seq_linear"))


AURAFLOW = FamilySpec(
    name="auraflow",
    description="AuraFlow: joint blocks (text/image attention and MLP), single-stream blocks",
    stacks=(
        BlockStack("double_layers", reuse_forward=joint_block_reuse, branches=(
            Branch("c_attn", "attn.w1o", role="self_attention", cost_paths=("attn",)),
            Branch("x_attn", "attn.w2o", role="self_attention"),
            Branch("c_mlp", "mlpC", role="mlp"),
            Branch("x_mlp", "mlpX", role="mlp"),
        )),
        BlockStack("single_layers", branches=(
            Branch("attn", "attn", role="self_attention"),
            Branch("mlp", "mlp", role="mlp"),
        )),
    ),
    detect=_is_auraflow,
)
