"""Tiny models of the DiT families beyond PixArt/Flux/Wan, built from ComfyUI's own classes.

Each `Family` says how to build the model (supported_models config + unet_config, random weights),
what its latent and conditioning look like, and, for the tests, which modules hold the work a
reuse step skips (`counted`), which module outputs a selective step keeps from the last full step
(`replayed`: the reference for "selective at ratio 1 equals recomputing the chosen modules"), and
which module sees only the selected rows on a selective step (`refreshed`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import comfy_env


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config: Callable            # (version) -> (supported_models class, unet_config)
    inputs: Callable            # (batch, gen) -> (latent, positive, negative)
    counted: Callable           # (diffusion_model) -> modules that do the work reuse steps skip
    replayed: Callable          # (diffusion_model) -> modules whose outputs selective steps keep
    refreshed: Callable         # (diffusion_model) -> modules that see only selected rows
    replayed_inputs: Callable = lambda dm: []   # (module, width): the first `width` input features kept
    new_only: bool = False      # the family exists in ComfyUI 0.8.0 but not in 0.3.64
    spec: str = ""              # the pack's family name when it differs (Z-Image runs as lumina2)
    weight_scale: float = 0.02  # std of the random weights (large enough that every branch matters)
    noise_mask: Callable | None = None      # (latent) -> the sampler's noise mask (image-to-video)

    @property
    def adapter(self) -> str:
        return self.spec or self.name


def is_old(version: str) -> bool:
    return version.startswith("0.3.")


# ---- SD3 / SD3.5 ---------------------------------------------------------------------------------
def _sd3_config(version):
    import comfy.supported_models as sm
    # depth 2 -> hidden 128 (MMDiT fixes head size 64); block 0 has SD3.5 Medium's second attention
    return sm.SD3, {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
                    "adm_in_channels": 32, "pos_embed_scaling_factor": None, "pos_embed_max_size": 8,
                    "num_patches": 64, "qk_norm": "rms", "x_block_self_attn_layers": [0],
                    "context_embedder_config": {"target": "torch.nn.Linear",
                                                "params": {"in_features": 32, "out_features": 128}}}


def _text(gen, batch_seq, width, **extra):
    return [[torch.randn(1, batch_seq, width, generator=gen), dict(extra)]]


def _sd3_inputs(batch, gen):
    pooled = lambda: torch.randn(1, 32, generator=gen)  # noqa: E731
    return (torch.zeros(batch, 16, 16, 16), _text(gen, 6, 32, pooled_output=pooled()),
            _text(gen, 6, 32, pooled_output=pooled()))


def _sd3_blocks(dm):
    return list(dm.joint_blocks)


SD3 = Family(
    name="sd3", config=_sd3_config, inputs=_sd3_inputs,
    counted=lambda dm: [m for b in _sd3_blocks(dm) for m in
                        (b.x_block.attn.qkv, b.x_block.mlp, b.context_block.attn.qkv)],
    replayed=lambda dm: [m for b in _sd3_blocks(dm) for m in
                         (b.x_block.attn.proj, getattr(b.x_block, "attn2", None) and b.x_block.attn2.proj,
                          getattr(b.context_block.attn, "proj", None)) if m is not None],
    refreshed=lambda dm: [b.x_block.mlp.fc1 for b in _sd3_blocks(dm)],
)


# ---- Qwen-Image --------------------------------------------------------------------------------
def _qwen_config(version):
    import comfy.supported_models as sm
    return sm.QwenImage, {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16,
                          "num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                          "joint_attention_dim": 32, "axes_dims_rope": (8, 12, 12)}


def _qwen_inputs(batch, gen):
    return torch.zeros(batch, 16, 1, 16, 16), _text(gen, 6, 32), _text(gen, 6, 32)


def _qwen_edit_inputs(batch, gen):
    """Qwen-Image-Edit with a reference latent whose tokens get timestep 0 (a second modulation)."""
    def cond():
        return [[torch.randn(1, 6, 32, generator=gen),
                 {"reference_latents": [torch.randn(1, 16, 1, 16, 16, generator=gen)],
                  "reference_latents_method": "index_timestep_zero"}]]
    return torch.zeros(batch, 16, 1, 16, 16), cond(), cond()


QWEN = Family(
    name="qwen_image", config=_qwen_config, inputs=_qwen_inputs,
    counted=lambda dm: [m for b in dm.transformer_blocks for m in (b.attn.to_q, b.img_mlp, b.txt_mlp)],
    replayed=lambda dm: [m for b in dm.transformer_blocks for m in (b.attn.to_out[0], b.attn.to_add_out)],
    refreshed=lambda dm: [b.img_mlp.net[0].proj for b in dm.transformer_blocks],
)
QWEN_EDIT = dataclasses.replace(QWEN, name="qwen_image_edit", inputs=_qwen_edit_inputs, new_only=True,
                                spec="qwen_image")


# ---- Lumina 2 / Z-Image --------------------------------------------------------------------------
def _lumina_config(version, z_image=False):
    import comfy.supported_models as sm
    cfg = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "n_layers": 2,
           "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 1, "multiple_of": 16, "ffn_dim_multiplier": 4.0,
           "qk_norm": True, "cap_feat_dim": 32, "axes_dims": [8, 12, 12], "axes_lens": [16, 32, 32]}
    if z_image:       # Z-Image: another modulation input width, time scale, rope theta, token padding
        # (its adaLN input is the 256-wide time embedding, so dim must be at least 256)
        cfg.update({"dim": 256, "axes_dims": [32, 48, 48], "n_kv_heads": 2, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
                    "time_scale": 1000.0, "rope_theta": 256.0, "pad_tokens_multiple": 32})
        return sm.ZImage, cfg
    return sm.Lumina2, cfg


def _lumina_inputs(batch, gen):
    mask = torch.ones(1, 6, dtype=torch.long)   # 0.3.64 reads the text length from the mask only
    return (torch.zeros(batch, 16, 16, 16), _text(gen, 6, 32, attention_mask=mask),
            _text(gen, 6, 32, attention_mask=mask))


def _lumina(name, **config):
    return Family(
        name=name, config=lambda version: _lumina_config(version, **config), inputs=_lumina_inputs,
        counted=lambda dm: [m for b in dm.layers for m in (b.attention.qkv, b.feed_forward.w1)],
        replayed=lambda dm: [b.attention for b in dm.layers],
        refreshed=lambda dm: [b.feed_forward.w1 for b in dm.layers],
        new_only=bool(config), spec="lumina2", weight_scale=0.2)


LUMINA = _lumina("lumina2")
Z_IMAGE = _lumina("z_image", z_image=True)

# ---- Flux-block families: HunyuanVideo, Chroma -------------------------------------------------------
def _known(params_cls, cfg):
    """`cfg` without the fields this ComfyUI's params dataclass does not have (they grow per version)."""
    fields = {f.name for f in dataclasses.fields(params_cls)}
    return {k: v for k, v in cfg.items() if k in fields or k == "image_model"}


def _flux_blocks(name, config, inputs, **extra):
    return Family(
        name=name, config=config, inputs=inputs, spec="flux",
        counted=lambda dm: ([m for b in dm.double_blocks for m in (b.img_attn.qkv, b.img_mlp, b.txt_attn.qkv)]
                            + [b.linear1 for b in dm.single_blocks]),
        replayed=lambda dm: [m for b in dm.double_blocks for m in (b.img_attn.proj, b.txt_attn.proj)],
        replayed_inputs=lambda dm: [(b.linear2, b.hidden_size) for b in dm.single_blocks],
        refreshed=lambda dm: [b.img_mlp[0] for b in dm.double_blocks] + [b.linear1 for b in dm.single_blocks],
        **extra)


def _hunyuan_video_config(version):
    import comfy.supported_models as sm
    from comfy.ldm.hunyuan_video.model import HunyuanVideoParams
    return sm.HunyuanVideo, _known(HunyuanVideoParams, {
        "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
        "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True,
        "guidance_embed": True, "byt5": False, "meanflow": False, "use_cond_type_embedding": False,
        "vision_in_dim": None, "meanflow_sum": False})


def _hunyuan_video_inputs(batch, gen):
    pooled = lambda: torch.randn(1, 32, generator=gen)  # noqa: E731
    return (torch.zeros(batch, 16, 2, 8, 8), _text(gen, 6, 32, pooled_output=pooled(), guidance=6.0),
            _text(gen, 6, 32, pooled_output=pooled(), guidance=6.0))


def _hunyuan_image_config(version):
    import comfy.supported_models as sm
    from comfy.ldm.hunyuan_video.model import HunyuanVideoParams
    # HunyuanImage 2.1: the HunyuanVideo model on 2-D latents (64 channels, 1x1 patches, 2 rope axes)
    return sm.HunyuanImage21, _known(HunyuanVideoParams, {
        "image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "vec_in_dim": None,
        "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
        "depth_single_blocks": 2, "axes_dim": [16, 16], "theta": 256, "patch_size": [1, 1], "qkv_bias": True,
        "guidance_embed": False, "byt5": False, "meanflow": False, "use_cond_type_embedding": False,
        "vision_in_dim": None, "meanflow_sum": False})


def _hunyuan_image_inputs(batch, gen):
    return torch.zeros(batch, 64, 8, 8), _text(gen, 6, 32), _text(gen, 6, 32)


def _chroma_config(version):
    import comfy.supported_models as sm
    from comfy.ldm.chroma.model import ChromaParams
    return sm.Chroma, _known(ChromaParams, {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 32, "hidden_size": 64,
        "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
        "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 64, "hidden_dim": 64,
        "n_layers": 1, "txt_ids_dims": [], "vec_in_dim": None})


def _chroma_inputs(batch, gen):
    pooled = torch.zeros(1, 32)       # Flux's conditioning code asks for it; Chroma does not use it
    return torch.zeros(batch, 16, 16, 16), _text(gen, 6, 32, pooled_output=pooled), _text(gen, 6, 32, pooled_output=pooled)


def _flux2_config(version):
    import comfy.supported_models as sm
    return sm.Flux2, {"image_model": "flux2", "in_channels": 32, "out_channels": 32, "vec_in_dim": None,
                      "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2,
                      "depth_single_blocks": 2, "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 2,
                      "qkv_bias": False, "guidance_embed": True, "txt_ids_dims": [3], "global_modulation": True,
                      "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0}


def _flux2_inputs(batch, gen):
    return (torch.zeros(batch, 32, 16, 16), _text(gen, 6, 32, pooled_output=None, guidance=4.0),
            _text(gen, 6, 32, pooled_output=None, guidance=4.0))


HUNYUAN_VIDEO = _flux_blocks("hunyuan_video", _hunyuan_video_config, _hunyuan_video_inputs)
CHROMA = _flux_blocks("chroma", _chroma_config, _chroma_inputs)
HUNYUAN_IMAGE = _flux_blocks("hunyuan_image_2.1", _hunyuan_image_config, _hunyuan_image_inputs)
FLUX2 = _flux_blocks("flux2", _flux2_config, _flux2_inputs, new_only=True, weight_scale=0.2)

# ---- HiDream ------------------------------------------------------------------------------------
def _hidream_config(version):
    import comfy.supported_models as sm
    return sm.HiDream, {"image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
                        "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2,
                        "caption_channels": [32, 32], "text_emb_dim": 32, "num_routed_experts": 2,
                        "num_activated_experts": 1, "axes_dims_rope": [8, 12, 12], "max_resolution": [16, 16],
                        "llama_layers": [0, 1, 1, 1]}


def _hidream_inputs(batch, gen):
    def cond():
        return [[torch.randn(1, 6, 32, generator=gen),
                 {"pooled_output": torch.randn(1, 32, generator=gen),
                  "conditioning_llama3": torch.randn(1, 2, 5, 32, generator=gen)}]]
    return torch.zeros(batch, 16, 16, 16), cond(), cond()


HIDREAM = Family(
    name="hidream", config=_hidream_config, inputs=_hidream_inputs,
    counted=lambda dm: ([m for o in dm.double_stream_blocks for m in (o.block.attn1.to_q, o.block.ff_i.shared_experts,
                                                                        o.block.ff_t.w1)]
                        + [m for o in dm.single_stream_blocks for m in (o.block.attn1.to_q, o.block.ff_i.shared_experts)]),
    replayed=lambda dm: ([m for o in dm.double_stream_blocks for m in (o.block.attn1.to_out, o.block.attn1.to_out_t)]
                         + [o.block.attn1 for o in dm.single_stream_blocks]),
    refreshed=lambda dm: [o.block.ff_i.shared_experts.w1 for o in (*dm.double_stream_blocks, *dm.single_stream_blocks)],
)

# ---- LTX-Video ----------------------------------------------------------------------------------
def _ltxv_config(version):
    import comfy.supported_models as sm
    return sm.LTXV, {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
                     "num_attention_heads": 2, "caption_channels": 32, "num_layers": 2}


def _ltxv_inputs(batch, gen):
    mask = torch.ones(1, 6, dtype=torch.long)   # LTXV's forward takes the text mask positionally
    return (torch.zeros(batch, 128, 2, 4, 4), _text(gen, 6, 32, attention_mask=mask),
            _text(gen, 6, 32, attention_mask=mask))


def _ltxv_i2v_inputs(batch, gen):
    latent, pos, neg = _ltxv_inputs(batch, gen)
    latent[:, :, :1] = torch.randn(batch, 128, 1, 4, 4, generator=gen)     # the encoded first frame
    return latent, pos, neg


def _first_frame_kept(latent):
    """LTXVImgToVideo's mask: the first latent frame is kept, so its tokens get their own timestep."""
    mask = torch.ones(latent.shape[0], 1, *latent.shape[2:])
    mask[:, :, :1] = 0.0
    return mask


LTXV = Family(
    name="ltxv", config=_ltxv_config, inputs=_ltxv_inputs,
    counted=lambda dm: [m for b in dm.transformer_blocks for m in (b.attn1.to_q, b.attn2.to_q, b.ff.net[0].proj)],
    replayed=lambda dm: [b.attn1 for b in dm.transformer_blocks],
    refreshed=lambda dm: [b.ff.net[0].proj for b in dm.transformer_blocks],
)
LTXV_I2V = dataclasses.replace(LTXV, name="ltxv_i2v", inputs=_ltxv_i2v_inputs, noise_mask=_first_frame_kept,
                               spec="ltxv")

# ---- AuraFlow -----------------------------------------------------------------------------------
def _auraflow_config(version):
    import comfy.supported_models as sm
    return sm.AuraFlow, {"in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 4,
                         "n_double_layers": 2, "n_heads": 2, "global_conddim": 64, "cond_seq_dim": 32, "max_seq": 64}


def _auraflow_inputs(batch, gen):
    return torch.zeros(batch, 4, 16, 16), _text(gen, 6, 32), _text(gen, 6, 32)


AURAFLOW = Family(
    name="auraflow", config=_auraflow_config, inputs=_auraflow_inputs,
    counted=lambda dm: ([m for b in dm.double_layers for m in (b.attn.w1q, b.attn.w2q, b.mlpX.c_fc1)]
                        + [m for b in dm.single_layers for m in (b.attn.w1q, b.mlp.c_fc1)]),
    replayed=lambda dm: ([m for b in dm.double_layers for m in (b.attn.w1o, b.attn.w2o)]
                         + [b.attn for b in dm.single_layers]),
    refreshed=lambda dm: [b.mlpX.c_fc1 for b in dm.double_layers] + [b.mlp.c_fc1 for b in dm.single_layers],
    weight_scale=0.2,
)

# ---- Cosmos Predict2 ----------------------------------------------------------------------------
def _cosmos_config(version):
    import comfy.supported_models as sm
    return sm.CosmosT2IPredict2, {
        "image_model": "cosmos_predict2", "max_img_h": 16, "max_img_w": 16, "max_frames": 4, "in_channels": 16,
        "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "concat_padding_mask": True,
        "model_channels": 64, "num_blocks": 2, "num_heads": 2, "crossattn_emb_channels": 32, "pos_emb_cls": "rope3d",
        "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "use_adaln_lora": True, "adaln_lora_dim": 16,
        "extra_per_block_abs_pos_emb": False}


def _cosmos_inputs(batch, gen):
    return torch.zeros(batch, 16, 1, 16, 16), _text(gen, 6, 32), _text(gen, 6, 32)


COSMOS = Family(
    name="cosmos_predict2", config=_cosmos_config, inputs=_cosmos_inputs,
    counted=lambda dm: [m for b in dm.blocks for m in (b.self_attn.q_proj, b.cross_attn.q_proj, b.mlp.layer1)],
    replayed=lambda dm: [b.self_attn for b in dm.blocks],
    refreshed=lambda dm: [b.mlp.layer1 for b in dm.blocks],
)

# ---- HunyuanDiT ---------------------------------------------------------------------------------
def _hunyuan_dit_config(version):
    import comfy.supported_models as sm
    return sm.HunyuanDiT, {"image_model": "hydit", "input_size": (16, 16), "patch_size": 2, "in_channels": 4,
                           "hidden_size": 64, "depth": 4, "num_heads": 2, "text_states_dim": 32,
                           "text_states_dim_t5": 32, "text_len": 6, "text_len_t5": 5}


def _hunyuan_dit_inputs(batch, gen):
    def cond():
        return [[torch.randn(1, 6, 32, generator=gen),
                 {"attention_mask": torch.ones(1, 6), "conditioning_mt5xl": torch.randn(1, 5, 32, generator=gen),
                  "attention_mask_mt5xl": torch.ones(1, 5)}]]
    return torch.zeros(batch, 4, 16, 16), cond(), cond()


HUNYUAN_DIT = Family(
    name="hunyuan_dit", config=_hunyuan_dit_config, inputs=_hunyuan_dit_inputs,
    counted=lambda dm: [m for b in dm.blocks for m in (b.attn1.Wqkv, b.attn2.q_proj, b.mlp.fc1)],
    replayed=lambda dm: [m for b in dm.blocks for m in (b.attn1.out_proj, b.attn2.out_proj)],
    refreshed=lambda dm: [b.mlp.fc1 for b in dm.blocks],
)

# ---- Kandinsky 5 --------------------------------------------------------------------------------
def _kandinsky5_config(version):
    import comfy.supported_models as sm
    # the model input is latent (16) + image concat (16) + mask (1) channels, patchified 1x2x2 -> 132
    return sm.Kandinsky5, {"image_model": "kandinsky5", "in_visual_dim": 16, "out_visual_dim": 16, "in_text_dim": 32,
                           "in_text_dim2": 32, "time_dim": 32, "model_dim": 64, "ff_dim": 128, "visual_embed_dim": 132,
                           "patch_size": (1, 2, 2), "num_text_blocks": 1, "num_visual_blocks": 2,
                           "axes_dims": (8, 12, 12)}


def _kandinsky5_inputs(batch, gen):
    pooled = lambda: torch.randn(1, 32, generator=gen)  # noqa: E731
    return (torch.zeros(batch, 16, 2, 8, 8), _text(gen, 6, 32, pooled_output=pooled()),
            _text(gen, 6, 32, pooled_output=pooled()))


KANDINSKY5 = Family(
    name="kandinsky5", config=_kandinsky5_config, inputs=_kandinsky5_inputs, new_only=True,
    counted=lambda dm: [m for b in dm.visual_transformer_blocks for m in
                        (b.self_attention.to_query, b.cross_attention.to_query, b.feed_forward.in_layer)],
    replayed=lambda dm: [b.self_attention for b in dm.visual_transformer_blocks],
    refreshed=lambda dm: [b.feed_forward.in_layer for b in dm.visual_transformer_blocks],
)

# ---- Mochi --------------------------------------------------------------------------------------
def _mochi_config(version):
    import comfy.supported_models as sm
    # ComfyUI's Mochi block asserts a video MLP width of 12288 (3072 x 4); 64 x 192 keeps it tiny elsewhere
    return sm.GenmoMochi, {"image_model": "mochi_preview", "depth": 2, "patch_size": 2, "num_heads": 2,
                           "hidden_size_x": 64, "hidden_size_y": 32, "mlp_ratio_x": 192.0, "mlp_ratio_y": 4.0,
                           "learn_sigma": False, "in_channels": 12, "qk_norm": True, "qkv_bias": False,
                           "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True, "posenc_preserve_area": True,
                           "timestep_mlp_bias": True, "attend_to_padding": False, "timestep_scale": 1000.0,
                           "use_t5": True, "t5_feat_dim": 32, "t5_token_length": 6, "rope_theta": 10000.0}


def _mochi_inputs(batch, gen):
    mask = torch.ones(1, 6, dtype=torch.long)
    return (torch.zeros(batch, 12, 2, 8, 8), _text(gen, 6, 32, attention_mask=mask),
            _text(gen, 6, 32, attention_mask=mask))


MOCHI = Family(
    name="mochi", config=_mochi_config, inputs=_mochi_inputs,
    counted=lambda dm: [m for b in dm.blocks for m in (b.attn.qkv_x, b.mlp_x.w1)],
    replayed=lambda dm: [m for b in dm.blocks for m in (b.attn.proj_x, b.attn.proj_y)],
    refreshed=lambda dm: [b.mlp_x.w1 for b in dm.blocks],
)

# ---- Wan image-to-video ---------------------------------------------------------------------------
# (Wan text-to-video is tested with PixArt and Flux in test_comfy_selective.py.)
_WAN_SMALL = {"image_model": "wan2.1", "dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2, "text_dim": 32,
              "freq_dim": 256, "patch_size": (1, 2, 2), "window_size": (-1, -1), "qk_norm": True,
              "cross_attn_norm": True, "eps": 1e-6}


def _wan21_i2v_config(version):
    import comfy.supported_models as sm
    # 36 input channels: the 16-channel latent, then the 4-channel mask and the 16-channel image latent
    # that WAN21.concat_cond builds; model_type i2v adds the CLIP-vision projection and the
    # cross-attention over image + text context
    return sm.WAN21_I2V, dict(_WAN_SMALL, model_type="i2v", in_dim=36, out_dim=16)


def _wan_i2v_inputs(batch, gen, clip_vision=True):
    """What WanImageToVideo puts on both conditionings: the encoded start image as the first frame of
    a zero concat latent, a mask that marks the first latent frame as given, and (Wan 2.1) a
    CLIP-vision output (clip_fea, projected by the model's img_emb to extra cross-attention context)."""
    import comfy.clip_vision
    image = torch.zeros(1, 16, 3, 8, 8)
    image[:, :, :1] = torch.randn(1, 16, 1, 8, 8, generator=gen)
    mask = torch.ones(1, 1, 3, 8, 8)
    mask[:, :, :1] = 0.0
    values = {"concat_latent_image": image, "concat_mask": mask}
    if clip_vision:
        values["clip_vision_output"] = comfy.clip_vision.Output()
        values["clip_vision_output"].penultimate_hidden_states = torch.randn(1, 5, 1280, generator=gen)
    return torch.zeros(batch, 16, 3, 8, 8), _text(gen, 5, 32, **values), _text(gen, 5, 32, **values)


def _wan22_i2v_config(version):
    import comfy.supported_models as sm
    # Wan 2.2 A14B image-to-video: no CLIP-vision projection, so ComfyUI detects it as a text-to-video
    # Wan with 36 input channels; WAN21.concat_cond adds the same mask + image latent
    return sm.WAN21_T2V, dict(_WAN_SMALL, model_type="t2v", in_dim=36, out_dim=16)


def _wan22_ti2v_config(version):
    import comfy.supported_models as sm
    return sm.WAN22_T2V, dict(_WAN_SMALL, model_type="t2v", in_dim=48, out_dim=48)


def _wan22_ti2v_inputs(batch, gen):
    # Wan22ImageToVideoLatent: the encoded start image is the latent's first frame
    latent = torch.zeros(batch, 48, 3, 8, 8)
    latent[:, :, :1] = torch.randn(batch, 48, 1, 8, 8, generator=gen)
    return latent, _text(gen, 5, 32), _text(gen, 5, 32)


def _wan(name, config, inputs, **extra):
    return Family(
        name=name, config=config, inputs=inputs, spec="wan",
        counted=lambda dm: [m for b in dm.blocks for m in (b.self_attn.q, b.cross_attn.q, b.ffn[0])],
        replayed=lambda dm: [b.self_attn for b in dm.blocks],
        refreshed=lambda dm: [b.ffn[0] for b in dm.blocks],
        **extra)


WAN21_I2V = _wan("wan21_i2v", _wan21_i2v_config, _wan_i2v_inputs)
WAN22_I2V = _wan("wan22_i2v", _wan22_i2v_config, lambda batch, gen: _wan_i2v_inputs(batch, gen, clip_vision=False))
# Wan 2.2 TI2V 5B: the kept first frame gets timestep 0 through the noise mask (per-frame modulation)
WAN22_TI2V = _wan("wan22_ti2v", _wan22_ti2v_config, _wan22_ti2v_inputs, noise_mask=_first_frame_kept)

FAMILIES = {f.name: f for f in (SD3, QWEN, QWEN_EDIT, LUMINA, Z_IMAGE, HUNYUAN_VIDEO, HUNYUAN_IMAGE, CHROMA, HIDREAM, LTXV, LTXV_I2V, AURAFLOW, COSMOS,
                                HUNYUAN_DIT, FLUX2, KANDINSKY5, MOCHI, WAN21_I2V, WAN22_I2V, WAN22_TI2V)}


# ---- building and sampling -----------------------------------------------------------------------
def available(name: str) -> bool:
    return not (FAMILIES[name].new_only and is_old(comfy_env.load_comfy()))


def make_patcher(name: str, seed: int = 0):
    import comfy.model_patcher
    cls, unet_config = FAMILIES[name].config(comfy_env.load_comfy())
    cfg = cls(unet_config)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    comfy_env._fill(model, seed, FAMILIES[name].weight_scale)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def sample(patcher, name: str, steps: int = 4, cfg: float = 2.0, seed: int = 0, batch: int = 1,
           sampler: str = "euler", scheduler: str = "simple", start_step=None, last_step=None,
           latent=None, force_full_denoise=False):
    import comfy.sample
    gen = torch.Generator().manual_seed(seed + 1000)
    lat, pos, neg = FAMILIES[name].inputs(batch, gen)
    if latent is not None:
        lat = latent
    noise = comfy.sample.prepare_noise(lat, seed)
    mask = FAMILIES[name].noise_mask
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, pos, neg, lat,
                               start_step=start_step, last_step=last_step, force_full_denoise=force_full_denoise,
                               noise_mask=None if mask is None else mask(lat), seed=seed, disable_pbar=True)
