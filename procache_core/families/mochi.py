"""Mochi (ComfyUI `AsymmDiTJoint`): asymmetric joint blocks, a wide video stream and a narrow text
stream attending jointly.

The joint attention returns both streams at once, so its two output projections are the cached
attention branches and the block runs the forward below on reuse steps, with Mochi's RMS-normed,
tanh-gated residuals. The last block does not update the text stream (no text MLP).
"""
import torch
import torch.nn.functional as F

from ..tokens import gather_tokens
from .base import BlockStack, Branch, FamilySpec


def _rms_norm(x, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def _modulated(x, scale):
    return _rms_norm(x) * (1 + scale.unsqueeze(1))


def _gated_residual(x, branch_out, gate):
    return x + _rms_norm(branch_out) * torch.tanh(gate).unsqueeze(1)


def _stream(branch, prefix, h, mod, mlp):
    _, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
    h = _gated_residual(h, branch(f"{prefix}_attn", like=h), gate_msa)
    out = branch(f"{prefix}_mlp", like=h, tokens=lambda: _modulated(h, scale_mlp),
                 rows=lambda idx, t, kept: mlp(gather_tokens(t, idx)))
    return _gated_residual(h, out, gate_mlp)


def block_reuse(block, branch, x, c, y, transformer_options={}, **attn_kwargs):
    c = F.silu(c)
    x = _stream(branch, "x", x, block.mod_x(c), block.mlp_x)
    if block.update_y:
        y = _stream(branch, "y", y, block.mod_y(c), block.mlp_y)
    return x, y


def _is_mochi(model) -> bool:
    return all(hasattr(model, n) for n in ("blocks", "x_embedder", "t_embedder", "t5_y_embedder", "t5_yproj"))


MOCHI = FamilySpec(
    name="mochi",
    description="Mochi: asymmetric joint blocks (video/text attention and MLP)",
    stacks=(BlockStack("blocks", reuse_forward=block_reuse, branches=(
        Branch("x_attn", "attn.proj_x", role="self_attention", cost_paths=("attn",)),
        Branch("y_attn", "attn.proj_y", role="self_attention"),
        Branch("x_mlp", "mlp_x", role="mlp"),
        Branch("y_mlp", "mlp_y", role="mlp", optional=True),
    )),),
    detect=_is_mochi,
)
