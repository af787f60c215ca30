"""The second reference model: a tiny model of ComfyUI's own Flux class trained on digits, and the
harness that samples it through ComfyUI's samplers and judges the result.

    from benchmarks.reference_flux import load_reference_flux, conditionings, sample, to_digits
    patcher = load_reference_flux()                      # ComfyUI ModelPatcher, trained weights
    latent = sample(patcher, labels, steps=20, sampler="euler", cfg=CFG_SCALE, seed=0)
    images = to_digits(patcher, latent)                  # [N, 1, 16, 16] in [-1, 1], for benchmarks/judge.py

Trained by benchmarks/train_reference_flux.py. Unlike the first reference DiT (16 tokens, DDIM, the
pack's own code), it is ComfyUI's comfy.ldm.flux.model.Flux at a small width: 32x32 latents in
patches of 2, so 256 image tokens, sampled by comfy.sample.sample with ComfyUI's Flux model sampling
(flow matching, shift 1.15) and any of its samplers.

The digit <-> latent mapping (fixed, no VAE): a 32x32 digit d in [-1, 1] becomes the 16-channel
latent the model sees (ComfyUI's "model space", after latent_format.process_in) as
    x0[c] = CHANNEL_SIGNS[c] * d        for c = 0..15
and back as the sign-weighted mean over the channels, average-pooled to the judge's 16x16.
comfy.sample.sample takes and returns latents before process_in / after process_out, so
`to_digits` applies process_in first.

Class conditioning: each class (and the null class 10, the CFG negative) owns learned context
tokens [CONTEXT_TOKENS, context_in_dim] and a pooled vector [vec_in_dim], stored beside the
model's weights; `conditionings` turns labels into ComfyUI CONDITIONING lists.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

from .digits import CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "benchmarks", "weights", "reference_flux_digits.safetensors")
LATENT_SIZE = 32          # 32x32 latent, patch 2: 16x16 = 256 image tokens
CONTEXT_TOKENS = 4
NULL_CLASS = CLASSES      # the label dropped labels train as; the CFG negative
CFG_SCALE = 2.0
SCHEDULER = "simple"      # evenly spaced in the model's own timesteps, the spacing training draws from
# x0[c] = sign[c] * digit: a fixed pattern so every channel carries the digit at unit scale
CHANNEL_SIGNS = (1, -1, 1, 1, -1, 1, -1, -1, 1, 1, -1, 1, -1, -1, -1, 1)
CONTEXT_PREFIX = "class_context"     # safetensors keys beside "diffusion_model.*"
POOLED_PREFIX = "class_pooled"

# Small enough to train on one CPU thread in about 20 minutes; 2 double-stream and 3 single-stream
# blocks, so "the deepest 25 % of blocks" is one to two blocks as on the real Flux's 57.
UNET_CONFIG = {"image_model": "flux", "guidance_embed": False, "in_channels": 16, "out_channels": 16,
               "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 96, "mlp_ratio": 4.0, "num_heads": 2,
               "depth": 2, "depth_single_blocks": 3, "axes_dim": [8, 20, 20], "theta": 10000, "patch_size": 2,
               "qkv_bias": True}


# ---- ComfyUI ---------------------------------------------------------------------------------------
def load_comfy(path: str | None = None):
    """Import ComfyUI (COMFYUI_PATH, or `path`) on CPU and the pack into it, as the tests do."""
    if path:
        os.environ["COMFYUI_PATH"] = os.path.abspath(os.path.expanduser(path))
    if not os.environ.get("COMFYUI_PATH"):
        raise RuntimeError("the reference Flux runs inside ComfyUI: set COMFYUI_PATH to a ComfyUI checkout "
                           "(or pass --comfyui PATH)")
    tests = os.path.join(ROOT, "tests")
    for where in (ROOT, tests):
        if where not in sys.path:
            sys.path.insert(0, where)
    import comfy_env
    version = comfy_env.load_comfy()
    comfy_env.load_pack()
    return version


def unet_config(config: dict = UNET_CONFIG) -> dict:
    """`config` with the keys this ComfyUI's FluxParams needs (0.8.0 added txt_ids_dims)."""
    import dataclasses

    from comfy.ldm.flux.model import FluxParams
    out = dict(config)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        out.setdefault("txt_ids_dims", [])
    else:
        out.pop("txt_ids_dims", None)
    return out


def build_patcher(config: dict = UNET_CONFIG):
    """A ModelPatcher around an (uninitialised) comfy.model_base.Flux of `config`, float32 on CPU."""
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(unet_config(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


class ClassConditioning(torch.nn.Module):
    """Learned context tokens and pooled vector per class (CLASSES + the null class)."""

    def __init__(self, config: dict = UNET_CONFIG):
        super().__init__()
        self.context = torch.nn.Parameter(torch.randn(CLASSES + 1, CONTEXT_TOKENS, config["context_in_dim"]))
        self.pooled = torch.nn.Parameter(torch.randn(CLASSES + 1, config["vec_in_dim"]))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.context[labels], self.pooled[labels]


# ---- digits <-> latents ----------------------------------------------------------------------------
def _signs(device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(CHANNEL_SIGNS, dtype=dtype, device=device).view(1, -1, 1, 1)


def encode(digits: torch.Tensor) -> torch.Tensor:
    """[N, 1, 32, 32] digits in [-1, 1] -> [N, 16, 32, 32] latents in the model's space."""
    return digits * _signs(digits.device, digits.dtype)


def decode(x0: torch.Tensor) -> torch.Tensor:
    """[N, 16, 32, 32] model-space latents -> [N, 1, 16, 16] digits in [-1, 1] (the judge's size)."""
    digit = (x0.float() * _signs(x0.device)).mean(1, keepdim=True)
    return F.avg_pool2d(digit, 2).clamp(-1, 1)


def to_digits(patcher, latent: torch.Tensor) -> torch.Tensor:
    """What comfy.sample.sample returned (after process_out) -> judge-ready [N, 1, 16, 16] digits."""
    return decode(patcher.model.latent_format.process_in(latent))


# ---- the trained model -----------------------------------------------------------------------------
def read_metadata(path: str = WEIGHTS) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return {key: json.loads(value) for key, value in meta.items()}


def load_reference_flux(path: str = WEIGHTS):
    """ComfyUI ModelPatcher (comfy.model_base.Flux) with the trained weights; the class
    conditioning rides along as `patcher.model.reference_conditioning` (a ClassConditioning): on
    the model, which every clone of the patcher (ProCache Apply, LazyCache) shares."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no reference Flux weights; train them with "
                                "`python -m benchmarks.train_reference_flux`")
    config = read_metadata(path).get("config", UNET_CONFIG)
    state = load_file(path)
    patcher = build_patcher(config)
    model_state = {k[len("diffusion_model."):]: v for k, v in state.items() if k.startswith("diffusion_model.")}
    patcher.model.diffusion_model.load_state_dict(model_state, strict=True)
    patcher.model.eval()
    classes = ClassConditioning(config)
    classes.load_state_dict({"context": state[CONTEXT_PREFIX], "pooled": state[POOLED_PREFIX]})
    patcher.model.reference_conditioning = classes.eval().requires_grad_(False)
    return patcher


def conditionings(patcher, labels: torch.Tensor) -> tuple[list, list]:
    """(positive, negative) ComfyUI CONDITIONING for a batch of labels: the class, and the null class."""
    classes = patcher.model.reference_conditioning
    with torch.no_grad():
        context, pooled = classes(labels.long())
        null_context, null_pooled = classes(torch.full_like(labels.long(), NULL_CLASS))
    return [[context, {"pooled_output": pooled}]], [[null_context, {"pooled_output": null_pooled}]]


def sample(patcher, labels: torch.Tensor, steps: int, sampler: str = "euler", cfg: float = CFG_SCALE,
           seed: int = 0, scheduler: str = SCHEDULER) -> torch.Tensor:
    """comfy.sample.sample of one latent per label (noise from `seed`, as KSampler draws it: the
    same seed gives the same noise to every patcher); returns the latent after process_out."""
    import comfy.sample

    latent = torch.zeros(len(labels), 16, LATENT_SIZE, LATENT_SIZE)
    positive, negative = conditionings(patcher, labels)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               seed=seed, disable_pbar=True)
