"""Flux.1 / Flux.2 (ComfyUI `Flux`): double-stream and single-stream blocks.

Flux computes attention between `qkv` and `proj` inside the block, so a branch submodule cannot
skip it; on reuse steps the blocks run the small forwards below, built from the block's own
modulation and norms, and add the cached pre-gate branch outputs. Full steps run Flux's own code.
The single block's `linear2` fuses attention and MLP; its output is cached as one branch, and the
attention half of its input is kept so that selective steps can refresh the MLP half alone.

The attention scores read q and k from the blocks' QK norms (after them Flux only applies the
rotary embedding `pe`, which the block probes take from the block's inputs). Text and image
tokens attend jointly: attention_received ranks every token by the attention it receives from
sampled queries of the joint sequence; cross_entropy is the entropy of each token's attention
over the text keys alone (for image tokens, the image-to-text part of the joint attention).
"""
import torch
from torch import nn

from ..tokens import attention_received, gather_tokens, rotary, text_entropy
from .base import BlockStack, Branch, FamilySpec


def _modulated(x, mod, dims):
    # Flux's apply_mod(x, 1 + scale, shift, dims), without writing into x.
    if dims is None:
        return torch.addcmul(mod.shift, x, 1 + mod.scale)
    out = x.clone()
    for start, end, j in dims:
        out[:, start:end] = out[:, start:end] * (1 + mod.scale[:, j]) + mod.shift[:, j]
    return out


def _gated(x, gate, dims):
    if dims is None:
        return x * gate
    out = x.clone()
    for start, end, j in dims:
        out[:, start:end] *= gate[:, j]
    return out


def _finite(x):
    if x.dtype == torch.float16:     # as Flux's own blocks do
        return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


def double_block_reuse(block, branch, img, txt, vec, pe=None, attn_mask=None,
                       modulation_dims_img=None, modulation_dims_txt=None, transformer_options={}):
    if getattr(block, "modulation", True) and hasattr(block, "img_mod"):
        (im1, im2), (tm1, tm2) = block.img_mod(vec), block.txt_mod(vec)
    else:       # Chroma (0.3.64: its own block without `modulation`) and Flux 2 pass the modulation in
        (im1, im2), (tm1, tm2) = vec
    di, dt = modulation_dims_img, modulation_dims_txt
    img = img + _gated(branch("img_attn", like=img), im1.gate, di)
    img = img + _gated(_mlp(branch, "img_mlp", block.img_mlp, lambda: _modulated(block.img_norm2(img), im2, di), img),
                       im2.gate, di)
    txt = txt + _gated(branch("txt_attn", like=txt), tm1.gate, dt)
    txt = txt + _gated(_mlp(branch, "txt_mlp", block.txt_mlp, lambda: _modulated(block.txt_norm2(txt), tm2, dt), txt),
                       tm2.gate, dt)
    return img, _finite(txt)


def _mlp(branch, name, mlp, tokens, like):
    return branch(name, like=like, tokens=tokens, rows=lambda idx, h, kept: mlp(gather_tokens(h, idx)))


def single_block_reuse(block, branch, x, vec, pe=None, attn_mask=None, modulation_dims=None, transformer_options={}):
    mod = block.modulation(vec)[0] if getattr(block, "modulation", None) else vec

    def mlp_rows(idx, h, kept):
        # linear2 mixes attention and MLP; refresh only the MLP half for the chosen tokens and
        # pair it with their cached attention output (kept from the last full step).
        hidden = block.linear1(gather_tokens(h, idx))
        mlp_width = getattr(block, "mlp_hidden_dim_first", block.mlp_hidden_dim)
        mlp = hidden[..., 3 * block.hidden_size:3 * block.hidden_size + mlp_width]
        if getattr(block, "yak_mlp", False):
            mlp = block.mlp_act(mlp[..., mlp_width // 2:]) * mlp[..., :mlp_width // 2]
        else:
            mlp = block.mlp_act(mlp)
        attn = gather_tokens(kept("attn_out"), idx)
        return block.linear2(torch.cat((attn, mlp), dim=-1))

    fused = branch("fused", like=x, tokens=lambda: _modulated(block.pre_norm(x), mod, modulation_dims), rows=mlp_rows)
    return _finite(x + _gated(fused, mod.gate, modulation_dims))


def _keep_attention_output(block, args):
    # a copy: the slice alone would keep linear2's whole input (attention + MLP, 5x wider) alive
    return {"attn_out": args[0][..., :block.hidden_size].contiguous()}


def _arg(args, kwargs, name, position):
    return kwargs[name] if name in kwargs else (args[position] if len(args) > position else None)


def _text_slice(notes, total):
    n_text, text_last = notes["text"]
    return slice(total - n_text, total) if text_last else slice(0, n_text)


def _joint_score(score, q, k, pe, text, ctx):
    """[B, N] score of every token of a joint sequence; q, k: [B, H, N, D] before the rotary
    embedding, which is applied to the rows the score reads only."""
    if score == "attention_received":
        sampled = ctx.queries(q.shape[2], q.device)
        return attention_received(rotary(q[:, :, sampled], pe, sampled), rotary(k, pe))
    return text_entropy(rotary(q, pe), rotary(k[:, :, text], pe, text))


def _double_probe(score):
    def probe(block, args, kwargs, ctx):
        txt = _arg(args, kwargs, "txt", 1)
        text_last = bool(getattr(block, "flipped_img_txt", False))      # the joint order of this model
        if txt is not None:
            ctx.notes["text"] = (txt.shape[1], text_last)        # for the single blocks after the doubles
        norms = getattr(block.img_attn, "norm", None), getattr(block.txt_attn, "norm", None)
        if not ctx.deep or txt is None or not all(isinstance(n, nn.Module) for n in norms):
            return []
        pe, seen = _arg(args, kwargs, "pe", 3), {}

        def on_img(module, inputs, qk):
            seen["img"] = qk

        def on_txt(module, inputs, txt_qk):
            if "img" not in seen:
                return
            parts = (seen.pop("img"), txt_qk) if text_last else (txt_qk, seen.pop("img"))
            q = torch.cat((parts[0][0], parts[1][0]), dim=2)
            k = torch.cat((parts[0][1], parts[1][1]), dim=2)
            text = _text_slice(ctx.notes, q.shape[2])
            joint = _joint_score(score, q, k, pe, text, ctx)
            image = torch.ones(joint.shape[1], dtype=torch.bool, device=joint.device)
            image[text] = False
            ctx.store({"img_mlp": joint[:, image], "txt_mlp": joint[:, text]})
        return [(norms[0], on_img), (norms[1], on_txt)]
    return probe


def _single_probe(score):
    def probe(block, args, kwargs, ctx):
        norm = getattr(block, "norm", None)      # the QK norm; its output is (q, k)
        if not ctx.deep or not isinstance(norm, nn.Module) or (score == "cross_entropy" and "text" not in ctx.notes):
            return []
        pe = _arg(args, kwargs, "pe", 2)

        def hook(module, inputs, qk):
            q, k = qk
            text = _text_slice(ctx.notes, q.shape[2]) if score == "cross_entropy" else None
            ctx.store({"fused": _joint_score(score, q, k, pe, text, ctx)})
        return [(norm, hook)]
    return probe


def _probes(make):
    return tuple((score, make(score)) for score in ("attention_received", "cross_entropy"))


def _is_flux(model) -> bool:
    doubles, singles = getattr(model, "double_blocks", None), getattr(model, "single_blocks", None)
    if not doubles or not singles:
        return False
    d, s = doubles[0], singles[0]
    return (all(hasattr(d, n) for n in ("img_attn", "img_mlp", "txt_attn", "txt_mlp", "img_norm2", "txt_norm2"))
            and all(hasattr(s, n) for n in ("linear1", "linear2", "pre_norm")))


FLUX = FamilySpec(
    name="flux",
    description="Flux: double blocks (image/text attention and MLP), single blocks (fused output)",
    stacks=(
        BlockStack("double_blocks", reuse_forward=double_block_reuse, probes=_probes(_double_probe), branches=(
            Branch("img_attn", "img_attn.proj", role="self_attention", cost_paths=("img_attn",)),
            Branch("img_mlp", "img_mlp", role="mlp"),
            Branch("txt_attn", "txt_attn.proj", role="self_attention", cost_paths=("txt_attn",)),
            Branch("txt_mlp", "txt_mlp", role="mlp"),
        )),
        BlockStack("single_blocks", reuse_forward=single_block_reuse, probes=_probes(_single_probe), branches=(
            Branch("fused", "linear2", role="fused", cost_paths=("linear1", "linear2"),
                   keep_inputs=_keep_attention_output),
        )),
    ),
    detect=_is_flux,
)
