"""HiDream-I1 / E1 (ComfyUI `HiDreamImageTransformer2DModel`): dual-stream then single-stream blocks,
each wrapped in a `HiDreamImageBlock` whose `block` is the real one.

The dual-stream attention returns both streams at once, so its two output projections are the
cached attention branches and the block runs the forward below on reuse steps. The single-stream
attention returns one tensor and is cached as a whole submodule. The image feed-forward is a
mixture of experts routed per token, so refreshing a subset of its tokens is exact.
"""
from ..tokens import gather_tokens
from .base import BlockStack, Branch, FamilySpec


def _mlp(branch, name, ff, tokens, like):
    return branch(name, like=like, tokens=tokens, rows=lambda idx, t, kept: ff(gather_tokens(t, idx)))


def double_block_reuse(outer, branch, image_tokens, image_tokens_masks=None, text_tokens=None, adaln_input=None,
                       rope=None, transformer_options={}):
    block, wtype = outer.block, image_tokens.dtype
    (_, _, gate_msa_i, shift_mlp_i, scale_mlp_i, gate_mlp_i,
     _, _, gate_msa_t, shift_mlp_t, scale_mlp_t, gate_mlp_t) = block.adaLN_modulation(adaln_input)[:, None].chunk(12, dim=-1)
    img = gate_msa_i * branch("img_attn", like=image_tokens) + image_tokens
    txt = gate_msa_t * branch("txt_attn", like=text_tokens) + text_tokens
    img_ff = _mlp(branch, "img_ff", block.ff_i,
                  lambda: block.norm3_i(img).to(dtype=wtype) * (1 + scale_mlp_i) + shift_mlp_i, img)
    txt_ff = _mlp(branch, "txt_ff", block.ff_t,
                  lambda: block.norm3_t(txt).to(dtype=wtype) * (1 + scale_mlp_t) + shift_mlp_t, txt)
    return gate_mlp_i * img_ff + img, gate_mlp_t * txt_ff + txt


def _is_hidream(model) -> bool:
    return all(hasattr(model, n) for n in ("double_stream_blocks", "single_stream_blocks", "caption_projection",
                                           "p_embedder"))


HIDREAM = FamilySpec(
    name="hidream",
    description="HiDream: dual-stream (image/text attention, MoE and text feed-forward) and single-stream blocks",
    stacks=(
        BlockStack("double_stream_blocks", reuse_forward=double_block_reuse, branches=(
            Branch("img_attn", "block.attn1.to_out", role="self_attention", cost_paths=("block.attn1",)),
            Branch("txt_attn", "block.attn1.to_out_t", role="self_attention"),
            Branch("img_ff", "block.ff_i", role="mlp"),
            Branch("txt_ff", "block.ff_t", role="mlp"),
        )),
        BlockStack("single_stream_blocks", branches=(
            Branch("attn", "block.attn1", role="self_attention"),
            Branch("ff", "block.ff_i", role="mlp"),
        )),
    ),
    detect=_is_hidream,
)
