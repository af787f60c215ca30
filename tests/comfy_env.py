"""Loads a real ComfyUI (from COMFYUI_PATH) in-process, and the pack into it, for the integration
tests; builds tiny models from ComfyUI's own classes with random weights."""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_MODULE = "procache_comfyui"
_loaded = {}


def comfy_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    return path if path and os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")) else None


def load_comfy():
    """Import ComfyUI on CPU, in the order host.md prescribes; returns its version string."""
    if "version" in _loaded:
        return _loaded["version"]
    root = comfy_path()
    if root is None:
        raise RuntimeError("COMFYUI_PATH does not point at a ComfyUI checkout")
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args
    args.cpu = True                 # must precede any import of comfy.model_management
    args.disable_api_nodes = True if hasattr(args, "disable_api_nodes") else None
    import utils.extra_config       # noqa: F401  (must precede `import nodes`, which shadows `utils`)
    import comfy.model_management   # noqa: F401
    import comfyui_version
    _loaded["version"] = comfyui_version.__version__
    return _loaded["version"]


def load_pack():
    """The pack imported as ComfyUI imports a custom node directory (a package, relative imports)."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    load_comfy()
    spec = importlib.util.spec_from_file_location(PACK_MODULE, os.path.join(PACK_ROOT, "__init__.py"),
                                                  submodule_search_locations=[PACK_ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


# ---- tiny models --------------------------------------------------------------------------
def _fill(model, seed: int, gate_scale: float = 0.02):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * gate_scale)
        for b in model.diffusion_model.buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen) * gate_scale)


def make_patcher(family: str, seed: int = 0, size: str = "tiny"):
    import comfy.model_patcher
    import comfy.supported_models
    cls, unet_config = tiny_config(family, size)
    cfg = cls(unet_config)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    _fill(model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def tiny_config(family: str, size: str = "tiny"):
    import comfy.supported_models as sm
    version = load_comfy()
    if family == "flux":
        hidden, heads = (64, 2) if size == "tiny" else (256, 4)
        axes = [8, 12, 12] if size == "tiny" else [16, 24, 24]
        cfg = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "out_channels": 16,
               "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads,
               "depth": 2 if size == "tiny" else 4, "depth_single_blocks": 2 if size == "tiny" else 8,
               "axes_dim": axes, "theta": 10000, "patch_size": 2, "qkv_bias": True}
        if not version.startswith("0.3."):
            cfg["txt_ids_dims"] = []
        return sm.Flux, cfg
    if family == "pixart":
        return sm.PixArtSigma, {"image_model": "pixart_sigma", "hidden_size": 64, "num_heads": 2, "depth": 3,
                                "patch_size": 2, "in_channels": 4, "caption_channels": 32, "model_max_length": 8,
                                "micro_condition": False}
    if family == "wan":
        return sm.WAN21_T2V, {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "ffn_dim": 256,
                              "num_heads": 1, "num_layers": 2, "in_dim": 16, "out_dim": 16, "text_dim": 4096,
                              "freq_dim": 256, "patch_size": (1, 2, 2), "window_size": (-1, -1), "qk_norm": True,
                              "cross_attn_norm": True, "eps": 1e-6}
    raise ValueError(family)


def latent_and_conds(family: str, batch: int = 1, seed: int = 0, hw: int | None = None):
    """(latent, positive, negative) shaped for the tiny model of `family`."""
    gen = torch.Generator().manual_seed(seed + 1000)
    if family == "flux":
        hw = hw or 16
        latent = torch.zeros(batch, 16, hw, hw)
        pos = [[torch.randn(1, 6, 32, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen), "guidance": 3.5}]]
        neg = [[torch.randn(1, 6, 32, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen), "guidance": 3.5}]]
    elif family == "pixart":
        hw = hw or 48
        latent = torch.zeros(batch, 4, hw, hw)
        pos = [[torch.randn(1, 8, 32, generator=gen), {}]]
        neg = [[torch.randn(1, 8, 32, generator=gen), {}]]
    elif family == "wan":
        hw = hw or 8
        latent = torch.zeros(batch, 16, 3, hw, hw)
        pos = [[torch.randn(1, 5, 4096, generator=gen), {}]]
        neg = [[torch.randn(1, 5, 4096, generator=gen), {}]]
    else:
        raise ValueError(family)
    return latent, pos, neg


def sample(patcher, family: str, steps: int = 6, cfg: float = 2.0, sampler: str = "euler", scheduler: str = "simple",
           batch: int = 1, seed: int = 0, hw: int | None = None, denoise: float = 1.0,
           start_step=None, last_step=None, latent=None, force_full_denoise=False):
    import comfy.sample
    lat, pos, neg = latent_and_conds(family, batch, seed, hw)
    if latent is not None:
        lat = latent
    noise = comfy.sample.prepare_noise(lat, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, pos, neg, lat, denoise=denoise,
                               start_step=start_step, last_step=last_step, force_full_denoise=force_full_denoise,
                               seed=seed, disable_pbar=True)
