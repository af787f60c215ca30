"""Qwen-Image (ComfyUI `QwenImageTransformer2DModel`): image and text streams with joint attention.

The joint attention module returns both streams at once, so its two output projections are the
cached attention branches and the block runs the forward below on reuse steps. With reference
latents in "index_timestep_zero" mode (ComfyUI 0.8.0) the image stream carries two modulations,
one for the generated tokens and one for the reference tokens; the block's own `_modulate` and
`_apply_gate` handle that split, so they are used whenever the block has them.
"""
import torch

from ..tokens import gather_tokens
from .base import BlockStack, Branch, FamilySpec


def _gate(mod, zero_index):
    gate = mod.chunk(3, dim=-1)[2]
    if zero_index is None:
        return gate.unsqueeze(1)
    half = gate.shape[0] // 2
    return gate[:half].unsqueeze(1), gate[half:].unsqueeze(1)


def _add_gated(block, y, x, gate, zero_index):
    if zero_index is None:
        return torch.addcmul(y, gate, x)
    return block._apply_gate(x, y, gate, zero_index)


def _modulated(block, x, mod, zero_index):
    return block._modulate(x, mod, *(() if zero_index is None else (zero_index,)))[0]


def block_reuse(block, branch, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, temb=None,
                image_rotary_emb=None, timestep_zero_index=None, transformer_options={}):
    zi = timestep_zero_index
    img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
    if zi is not None:
        temb = temb.chunk(2, dim=0)[0]
    txt_mod1, txt_mod2 = block.txt_mod(temb).chunk(2, dim=-1)

    img = _add_gated(block, hidden_states, branch("img_attn", like=hidden_states), _gate(img_mod1, zi), zi)
    txt = encoder_hidden_states + _gate(txt_mod1, None) * branch("txt_attn", like=encoder_hidden_states)

    img_mlp = branch("img_mlp", like=img, tokens=lambda: _modulated(block, block.img_norm2(img), img_mod2, zi),
                     rows=lambda idx, t, kept: block.img_mlp(gather_tokens(t, idx)))
    img = _add_gated(block, img, img_mlp, _gate(img_mod2, zi), zi)
    txt_mlp = branch("txt_mlp", like=txt, tokens=lambda: _modulated(block, block.txt_norm2(txt), txt_mod2, None),
                     rows=lambda idx, t, kept: block.txt_mlp(gather_tokens(t, idx)))
    txt = torch.addcmul(txt, _gate(txt_mod2, None), txt_mlp)
    return txt, img


def _is_qwen(model) -> bool:
    blocks = getattr(model, "transformer_blocks", None)
    if not blocks or not hasattr(model, "time_text_embed"):
        return False
    first = blocks[0]
    return all(hasattr(first, n) for n in ("img_mod", "txt_mod", "attn", "img_mlp", "txt_mlp", "_modulate"))


QWEN_IMAGE = FamilySpec(
    name="qwen_image",
    description="Qwen-Image: image/text joint attention and MLP per block",
    stacks=(BlockStack("transformer_blocks", reuse_forward=block_reuse, branches=(
        Branch("img_attn", "attn.to_out.0", role="self_attention", cost_paths=("attn",)),
        Branch("txt_attn", "attn.to_add_out", role="self_attention", cost_paths=()),
        Branch("img_mlp", "img_mlp", role="mlp"),
        Branch("txt_mlp", "txt_mlp", role="mlp"),
    )),),
    detect=_is_qwen,
)
