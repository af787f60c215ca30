"""Test-only nodes, loaded only into the ComfyUI server that tests/test_web_panel.py starts.

A real graph needs a model, conditioning and an output node; real text encoders, VAEs and model
files are far too big for a test. These nodes build a tiny PixArt-Sigma transformer from ComfyUI's
own classes with random weights, give conditioning shaped for it, and end the graph on the latent.
They are never part of the pack (the pack's own custom node directory does not import them).
"""
import torch

import comfy.model_patcher
import comfy.supported_models

# The tiny PixArt of tests/comfy_env.py: 3 blocks of width 64, 8 caption tokens of width 32.
TINY_PIXART = {"image_model": "pixart_sigma", "hidden_size": 64, "num_heads": 2, "depth": 3, "patch_size": 2,
               "in_channels": 4, "caption_channels": 32, "model_max_length": 8, "micro_condition": False}


class ProCacheTestTinyPixArt:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed):
        config = comfy.supported_models.PixArtSigma(dict(TINY_PIXART))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({}, "", device=torch.device("cpu"))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.diffusion_model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        cpu = torch.device("cpu")
        return (comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu),)


class ProCacheTestTinyConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, seed):
        gen = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, TINY_PIXART["model_max_length"], TINY_PIXART["caption_channels"], generator=gen), {}]],)


class ProCacheTestLatentSink:
    """An output node, so that ComfyUI executes the graph; it reports the latent's shape."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}
    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def keep(self, samples):
        latent = samples["samples"]
        return {"ui": {"text": [f"{list(latent.shape)} finite={bool(torch.isfinite(latent).all())}"]}}


NODE_CLASS_MAPPINGS = {
    "ProCacheTestTinyPixArt": ProCacheTestTinyPixArt,
    "ProCacheTestTinyConditioning": ProCacheTestTinyConditioning,
    "ProCacheTestLatentSink": ProCacheTestLatentSink,
}
