"""Writes the pack's workflows: UI format (example_workflows/*.json, what the ComfyUI frontend opens
and its template browser lists) and API format (workflows/api/*.json, for scripts).

The UI files live only in example_workflows/: ComfyUI lists the top-level JSON files of a pack's
`workflows/` folder as templates too, so a copy there would show every template twice.

    COMFYUI_PATH=~/comfy/ComfyUI python3 workflows/build.py

It also writes docs/nodes.md, the node reference, from the same definitions.

Each graph is written once, by input name; the real node definitions of the ComfyUI at
COMFYUI_PATH put the widget values in the order the frontend expects. The schedule travels as
text in the Schedule Loader ("typed pattern"), so a shared workflow reproduces the run.
"""
from __future__ import annotations

import json
import os
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from procache_core import Schedule, parse_pattern, uniform  # noqa: E402

FRONTEND_ONLY = {"Note", "MarkdownNote"}
EXAMPLE_ROUTER = "router_bench_T20_paper_credit_beta5e-08.safetensors"     # drawn on the router template's card
HF = "https://huggingface.co"
# Apply's defaults, written out so a shared workflow keeps them if the defaults change. Every shipped
# workflow plans within 4 GiB of cache at 24 GiB free with the auto budget (benchmarks/memory.py);
# the run's plan is in its report.
APPLY_DEFAULTS = {"memory_budget": "auto", "cache_precision": "8-bit when needed", "check_model_level": False,
                  "forecast": "taylor 1"}


def library(name: str) -> Schedule:
    with open(os.path.join(ROOT, "schedules", f"{name}.json"), encoding="utf-8") as f:
        return Schedule.from_json(f.read(), where=name)


def schedule_text(schedule: Schedule) -> str:
    return schedule.to_json(indent=None)


class Graph:
    """A workflow written by input name: nodes, links by (node, output slot) and widget values."""

    def __init__(self, title: str):
        self.title = title
        self.nodes: list[dict] = []

    def add(self, type_: str, pos, title: str | None = None, size=None, models=None, **inputs) -> int:
        node_id = len(self.nodes) + 1
        self.nodes.append({"id": node_id, "type": type_, "pos": list(pos), "title": title, "size": size,
                           "models": models or [], "inputs": inputs})
        return node_id

    def note(self, text: str, pos, size=(420, 330), title: str = "Models this workflow expects") -> int:
        return self.add("MarkdownNote", pos, title=title, size=size, text=text)


def out(node_id: int, slot: int = 0) -> tuple:
    return ("link", node_id, slot)


def is_link(value) -> bool:
    return isinstance(value, tuple) and value and value[0] == "link"


def model_file(name: str, directory: str, url: str) -> dict:
    """A node's entry in the frontend's missing-models list; its schema requires the download address."""
    return {"name": name, "directory": directory, "url": url}


# ---- the ProCache chain every workflow shares ---------------------------------------------------------
def procache_chain(g: Graph, model_link, schedule: Schedule, x: int, y: int, steps: int,
                   force_last_full: bool = False, cache_on_cpu: bool = False, eoc=None) -> int:
    """Loader + Apply; `eoc(loader_id)` may add nodes and return the link for Apply's `eoc` input."""
    loader = g.add("ProCacheScheduleLoader", (x, y + 200), size=(340, 260), source="typed pattern",
                   pattern=schedule_text(schedule), interval=3, steps=steps, selective=False)
    # an EOC correction replaces the forecast: say so in the widget too
    extra = {"eoc": eoc(loader), "forecast": "none"} if eoc is not None else {}
    return g.add("ProCacheApply", (x + 370, y), size=(300, 230), model=model_link, schedule=out(loader),
                 start_percent=0.0, end_percent=1.0, force_last_full=force_last_full, cache_on_cpu=cache_on_cpu,
                 **{**APPLY_DEFAULTS, **extra})


def image_tail(g: Graph, latent_link, vae_link, x: int, y: int, prefix: str) -> None:
    decode = g.add("VAEDecode", (x, y), samples=latent_link, vae=vae_link)
    g.add("SaveImage", (x + 230, y), size=(420, 460), images=out(decode), filename_prefix=prefix)


def video_tail(g: Graph, latent_link, vae_link, x: int, y: int, fps: int, prefix: str) -> None:
    decode = g.add("VAEDecode", (x, y), samples=latent_link, vae=vae_link)
    video = g.add("CreateVideo", (x, y + 120), images=out(decode), fps=fps)
    g.add("SaveVideo", (x + 230, y), size=(420, 460), video=out(video), filename_prefix=prefix,
          format="auto", codec="auto")


# ---- the workflows --------------------------------------------------------------------------------
PIXART_SIGMA_FILES = (
    "- `models/diffusion_models/PixArt-Sigma-XL-2-1024-MS.pth` — the transformer from "
    f"[PixArt-alpha/PixArt-Sigma]({HF}/PixArt-alpha/PixArt-Sigma) (the `.pth` file, or a `.safetensors` "
    "conversion of it)\n"
    f"- `models/text_encoders/t5xxl_fp16.safetensors` — T5-XXL ([comfyanonymous/flux_text_encoders]"
    f"({HF}/comfyanonymous/flux_text_encoders)), loaded with type `pixart`\n"
    "- `models/vae/sdxl_vae.safetensors` — PixArt-Σ uses the SDXL VAE "
    f"([stabilityai/sdxl-vae]({HF}/stabilityai/sdxl-vae))")


def pixart_sigma_inputs(g: Graph):
    """PixArt-Σ's loaders, prompts and latent: (unet, vae, positive, negative, latent) node ids."""
    unet = g.add("UNETLoader", (0, 0), size=(320, 82), unet_name="PixArt-Sigma-XL-2-1024-MS.pth", weight_dtype="default",
                 models=[model_file("PixArt-Sigma-XL-2-1024-MS.pth", "diffusion_models",
                                    f"{HF}/PixArt-alpha/PixArt-Sigma/resolve/main/PixArt-Sigma-XL-2-1024-MS.pth")])
    clip = g.add("CLIPLoader", (0, 130), size=(320, 106), clip_name="t5xxl_fp16.safetensors", type="pixart", device="default",
                 models=[model_file("t5xxl_fp16.safetensors", "text_encoders",
                                    f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors")])
    vae = g.add("VAELoader", (0, 290), size=(320, 58), vae_name="sdxl_vae.safetensors",
                models=[model_file("sdxl_vae.safetensors", "vae", f"{HF}/stabilityai/sdxl-vae/resolve/main/sdxl_vae.safetensors")])
    pos = g.add("CLIPTextEncode", (0, 400), size=(400, 160), title="Positive prompt", clip=out(clip),
                text="a red fox curled up asleep in fresh snow at dawn, soft golden light, detailed fur, 35mm photo")
    neg = g.add("CLIPTextEncode", (0, 600), size=(400, 120), title="Negative prompt", clip=out(clip),
                text="blurry, low quality, watermark")
    latent = g.add("EmptyLatentImage", (0, 760), width=1024, height=1024, batch_size=1)
    return unet, vae, pos, neg, latent


def pixart_sigma(with_eoc: bool = False) -> Graph:
    g = Graph("PixArt-Σ text to image with ProCache" + (" and EOC" if with_eoc else ""))
    g.note("**PixArt-Σ XL 1024 + ProCache** (branch-level caching: self-attention, cross-attention, MLP)\n\n"
           + PIXART_SIGMA_FILES + "\n\n"
           "Schedule: the paper's PixArt-α pattern (20 steps, 7 full, 2.9x fewer block evaluations). "
           "Keep KSampler steps and the loader's `steps` equal." + (
               "\n\n**EOC**: the extractor samples this graph at full compute on 4 other seeds (4 extra runs, "
               "once: its result is kept in the workflow) and the correction adds the prior's change to each "
               "reused branch output. Keep its sampler, scheduler, steps and cfg equal to the KSampler's."
               if with_eoc else ""), (-480, 0), size=(420, 420) if with_eoc else (420, 330))
    unet, vae, pos, neg, latent = pixart_sigma_inputs(g)
    steps, cfg, sampler_name, scheduler = 20, 4.5, "dpmpp_2m", "sgm_uniform"

    def eoc(loader):
        prior = g.add("ProCacheEOCPriorExtractor", (460, 520), size=(340, 420), model=out(unet), positive=out(pos),
                      negative=out(neg), latent_image=out(latent), seed=1000, samples=4, sampler_name=sampler_name,
                      scheduler=scheduler, steps=steps, cfg=cfg, pooling="channel", schedule=out(loader),
                      save_name="", prior="")
        return out(g.add("ProCacheEOCCorrection", (830, 520), size=(300, 200), prior=out(prior),
                         saved_prior="none (connect a prior)", gamma=0.5, threshold=0.0, min_gain=0.0,
                         end_percent=0.5))
    apply = procache_chain(g, out(unet), library("procache-pixart-20-7full"), 460, 0, steps,
                           eoc=eoc if with_eoc else None)
    sampler = g.add("KSampler", (1160, 0), size=(320, 262), model=out(apply), positive=out(pos), negative=out(neg),
                    latent_image=out(latent), seed=42, control_after_generate="fixed", steps=steps, cfg=cfg,
                    sampler_name=sampler_name, scheduler=scheduler, denoise=1.0)
    image_tail(g, out(sampler), out(vae), 1520, 0, "procache/pixart_sigma" + ("_eoc" if with_eoc else ""))
    return g


def pixart_sigma_router() -> Graph:
    g = Graph("PixArt-Σ text to image with a HarmoniCa router")
    g.note("**PixArt-Σ XL 1024 + a HarmoniCa router** (which attention and MLP units compute at each step, "
           "learned on this model, prompt and sampler)\n\n" + PIXART_SIGMA_FILES + "\n\n"
           "**The first run trains the router** (2000 iterations, about three model calls each, no images), then "
           "the router text is kept in the trainer's `router` widget and later runs use it at once. Keep the "
           "trainer's sampler, scheduler, steps and cfg equal to the KSampler's. `beta` is the speed knob: "
           "raise it to reuse more units. `refresh_credit` is on (see docs/harmonica.md).",
           (-480, 0), size=(420, 460))
    unet, vae, pos, neg, latent = pixart_sigma_inputs(g)
    steps, cfg, sampler_name, scheduler = 20, 4.5, "dpmpp_2m", "sgm_uniform"
    router = g.add("ProCacheHarmoniCaRouterTrainer", (460, 200), size=(360, 620), model=out(unet), positive=out(pos),
                   negative=out(neg), latent_image=out(latent), seed=1000, sampler_name=sampler_name,
                   scheduler=scheduler, steps=steps, cfg=cfg, iterations=2000, beta=7e-8, learning_rate=0.1,
                   tau=0.1, lambda_period=300, lambda_mode="paper", resume=True, save_name="", router="",
                   max_reuse=0, refresh_credit=True)
    apply = g.add("ProCacheApply", (850, 0), size=(300, 230), model=out(unet), schedule=out(router),
                  start_percent=0.0, end_percent=1.0, force_last_full=False, cache_on_cpu=False, **APPLY_DEFAULTS)
    sampler = g.add("KSampler", (1160, 0), size=(320, 262), model=out(apply), positive=out(pos), negative=out(neg),
                    latent_image=out(latent), seed=42, control_after_generate="fixed", steps=steps, cfg=cfg,
                    sampler_name=sampler_name, scheduler=scheduler, denoise=1.0)
    image_tail(g, out(sampler), out(vae), 1520, 0, "procache/pixart_sigma_router")
    return g


def pixart_alpha() -> Graph:
    g = Graph("PixArt-α text to image with ProCache")
    g.note("**PixArt-α XL 1024 + ProCache** (branch-level caching: self-attention, cross-attention, MLP)\n\n"
           "- `models/diffusion_models/PixArt-XL-2-1024-MS.pth` — the transformer from "
           f"[PixArt-alpha/PixArt-alpha]({HF}/PixArt-alpha/PixArt-alpha)\n"
           f"- `models/text_encoders/t5xxl_fp16.safetensors` — T5-XXL ([comfyanonymous/flux_text_encoders]"
           f"({HF}/comfyanonymous/flux_text_encoders)), loaded with type `pixart`\n"
           "- `models/vae/vae-ft-mse-840000-ema-pruned.safetensors` — the SD 1.x VAE "
           f"([stabilityai/sd-vae-ft-mse-original]({HF}/stabilityai/sd-vae-ft-mse-original))\n\n"
           "PixArt-α 1024 is micro-conditioned on the image size: **PixArtAlpha text encode** passes width and "
           "height. Schedule: the paper's PixArt-α pattern (20 steps, 7 full).", (-480, 0))
    unet = g.add("UNETLoader", (0, 0), size=(320, 82), unet_name="PixArt-XL-2-1024-MS.pth", weight_dtype="default",
                 models=[model_file("PixArt-XL-2-1024-MS.pth", "diffusion_models",
                                    f"{HF}/PixArt-alpha/PixArt-alpha/resolve/main/PixArt-XL-2-1024-MS.pth")])
    clip = g.add("CLIPLoader", (0, 130), size=(320, 106), clip_name="t5xxl_fp16.safetensors", type="pixart", device="default",
                 models=[model_file("t5xxl_fp16.safetensors", "text_encoders",
                                    f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors")])
    vae = g.add("VAELoader", (0, 290), size=(320, 58), vae_name="vae-ft-mse-840000-ema-pruned.safetensors",
                models=[model_file("vae-ft-mse-840000-ema-pruned.safetensors", "vae",
                                   f"{HF}/stabilityai/sd-vae-ft-mse-original/resolve/main/vae-ft-mse-840000-ema-pruned.safetensors")])
    pos = g.add("CLIPTextEncodePixArtAlpha", (0, 400), size=(400, 200), title="Positive prompt", clip=out(clip),
                width=1024, height=1024,
                text="an astronaut riding a horse across a desert of glass dunes, cinematic lighting")
    neg = g.add("CLIPTextEncodePixArtAlpha", (0, 640), size=(400, 160), title="Negative prompt", clip=out(clip),
                width=1024, height=1024, text="")
    latent = g.add("EmptyLatentImage", (0, 840), width=1024, height=1024, batch_size=1)
    steps = 20
    apply = procache_chain(g, out(unet), library("procache-pixart-20-7full"), 460, 0, steps)
    sampler = g.add("KSampler", (1160, 0), size=(320, 262), model=out(apply), positive=out(pos), negative=out(neg),
                    latent_image=out(latent), seed=42, control_after_generate="fixed", steps=steps, cfg=4.5,
                    sampler_name="dpmpp_2m", scheduler="sgm_uniform", denoise=1.0)
    image_tail(g, out(sampler), out(vae), 1520, 0, "procache/pixart_alpha")
    return g


FLUX_FILES = {
    "clip_l": model_file("clip_l.safetensors", "text_encoders",
                         f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "t5": model_file("t5xxl_fp16.safetensors", "text_encoders",
                     f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    "ae": model_file("ae.safetensors", "vae",
                     f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"),
}


def flux(variant: str) -> Graph:
    dev = variant == "dev"
    unet_name = f"flux1-{variant}.safetensors"
    repo = f"Comfy-Org/flux1-{variant}"
    g = Graph(f"FLUX.1 [{variant}] text to image with ProCache")
    if dev:
        steps, schedule = 28, library("procache-flux-50-9full").resampled(28)
        advice = ("Schedule: the paper's FLUX.1-dev pattern (50 steps, 9 full), resampled to 28 steps by the "
                  "pack (5 full). For the paper's exact setting set both step counts to 50 and paste the "
                  "bundled `procache-flux-50-9full` pattern, or pick it in the loader's `source`.")
    else:
        steps = 4
        schedule = parse_pattern("1,0,1,1", name="flux-schnell-4")
        advice = ("FLUX.1 [schnell] is distilled to 4 steps: there is little to cache. This schedule reuses "
                  "one step of four (1.33x); anything more costs visible detail.")
    g.note(f"**FLUX.1 [{variant}] + ProCache** (branch-level caching of double and single blocks)\n\n"
           f"- `models/diffusion_models/{unet_name}` — [{repo}]({HF}/{repo})\n"
           "- `models/text_encoders/clip_l.safetensors` and `t5xxl_fp16.safetensors` (or "
           f"`t5xxl_fp8_e4m3fn_scaled.safetensors`) — [comfyanonymous/flux_text_encoders]"
           f"({HF}/comfyanonymous/flux_text_encoders)\n"
           "- `models/vae/ae.safetensors` — the FLUX.1 autoencoder\n\n" + advice, (-480, 0))
    unet = g.add("UNETLoader", (0, 0), size=(320, 82), unet_name=unet_name, weight_dtype="default",
                 models=[model_file(unet_name, "diffusion_models", f"{HF}/{repo}/resolve/main/{unet_name}")])
    clip = g.add("DualCLIPLoader", (0, 130), size=(320, 130), clip_name1="clip_l.safetensors",
                 clip_name2="t5xxl_fp16.safetensors", type="flux", device="default",
                 models=[FLUX_FILES["clip_l"], FLUX_FILES["t5"]])
    vae = g.add("VAELoader", (0, 310), size=(320, 58), vae_name="ae.safetensors", models=[FLUX_FILES["ae"]])
    text = g.add("CLIPTextEncode", (0, 420), size=(400, 160), title="Prompt", clip=out(clip),
                 text="a lighthouse on a basalt cliff during a thunderstorm, waves breaking, long exposure photograph")
    if dev:
        positive = g.add("FluxGuidance", (0, 620), conditioning=out(text), guidance=3.5)
    else:
        positive = text
    negative = g.add("ConditioningZeroOut", (0, 720), conditioning=out(text))
    latent = g.add("EmptySD3LatentImage", (0, 800), width=1024, height=1024, batch_size=1)
    apply = procache_chain(g, out(unet), schedule, 460, 0, steps)
    sampler = g.add("KSampler", (1160, 0), size=(320, 262), model=out(apply), positive=out(positive),
                    negative=out(negative), latent_image=out(latent), seed=42, control_after_generate="fixed",
                    steps=steps, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    image_tail(g, out(sampler), out(vae), 1520, 0, f"procache/flux_{variant}")
    return g


WAN21 = f"{HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
WAN22 = f"{HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
UMT5 = model_file("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders",
                  f"{WAN21}/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors")
WAN_VAE = model_file("wan_2.1_vae.safetensors", "vae", f"{WAN21}/vae/wan_2.1_vae.safetensors")
WAN_NEGATIVE = "static, blurry, low quality, jpeg artifacts, deformed, extra fingers, watermark, subtitles"
WAN_PROMPT = "a paper boat drifting down a rain-soaked city gutter, close-up tracking shot, reflections of neon signs"


def wan_text_and_vae(g: Graph):
    clip = g.add("CLIPLoader", (0, 130), size=(320, 106), clip_name=UMT5["name"], type="wan", device="default",
                 models=[UMT5])
    vae = g.add("VAELoader", (0, 290), size=(320, 58), vae_name=WAN_VAE["name"], models=[WAN_VAE])
    pos = g.add("CLIPTextEncode", (0, 400), size=(400, 160), title="Positive prompt", clip=out(clip), text=WAN_PROMPT)
    neg = g.add("CLIPTextEncode", (0, 600), size=(400, 120), title="Negative prompt", clip=out(clip), text=WAN_NEGATIVE)
    return vae, pos, neg


def wan21() -> Graph:
    g = Graph("Wan 2.1 text to video with ProCache")
    name = "wan2.1_t2v_1.3B_fp16.safetensors"
    steps = 30
    g.note("**Wan 2.1 T2V 1.3B + ProCache** (branch-level caching: self-attention, cross-attention, FFN)\n\n"
           f"- `models/diffusion_models/{name}` (or the 14B `wan2.1_t2v_14B_fp16.safetensors`, same graph) — "
           f"[Comfy-Org/Wan_2.1_ComfyUI_repackaged]({HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged)\n"
           f"- `models/text_encoders/{UMT5['name']}`\n"
           f"- `models/vae/{WAN_VAE['name']}`\n\n"
           "Schedule: the paper's DiT pattern (50 steps, 17 full) resampled to 30 steps (10 full). "
           "`cache_on_cpu` keeps the cache in RAM if VRAM is short at 720p.", (-480, 0))
    unet = g.add("UNETLoader", (0, 0), size=(320, 82), unet_name=name, weight_dtype="default",
                 models=[model_file(name, "diffusion_models", f"{WAN21}/diffusion_models/{name}")])
    vae, pos, neg = wan_text_and_vae(g)
    shift = g.add("ModelSamplingSD3", (0, 760), model=out(unet), shift=8.0)
    latent = g.add("EmptyHunyuanLatentVideo", (0, 860), width=832, height=480, length=33, batch_size=1)
    apply = procache_chain(g, out(shift), library("procache-dit-50-17full").resampled(steps), 460, 0, steps)
    sampler = g.add("KSampler", (1160, 0), size=(320, 262), model=out(apply), positive=out(pos), negative=out(neg),
                    latent_image=out(latent), seed=42, control_after_generate="fixed", steps=steps, cfg=6.0,
                    sampler_name="uni_pc", scheduler="simple", denoise=1.0)
    video_tail(g, out(sampler), out(vae), 1520, 0, 16, "procache/wan21")
    return g


def wan22() -> Graph:
    g = Graph("Wan 2.2 14B text to video (two experts) with ProCache")
    high, low = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
    steps, switch = 20, 10
    g.note("**Wan 2.2 T2V A14B + ProCache** (branch-level caching; two experts)\n\n"
           f"- `models/diffusion_models/{high}` and `{low}` — "
           f"[Comfy-Org/Wan_2.2_ComfyUI_Repackaged]({HF}/Comfy-Org/Wan_2.2_ComfyUI_Repackaged)\n"
           f"- `models/text_encoders/{UMT5['name']}`\n"
           f"- `models/vae/{WAN_VAE['name']}`\n\n"
           f"One schedule for the whole {steps}-step run feeds both Apply nodes: the high-noise sampler "
           f"(steps 0-{switch}) takes the first slice of it, the low-noise sampler (steps {switch}-{steps}) the "
           "rest. Each expert keeps its own cache; the first step of each slice is computed in full.", (-480, 0))
    unet_high = g.add("UNETLoader", (0, 0), size=(320, 82), unet_name=high, weight_dtype="default", title="High-noise expert",
                      models=[model_file(high, "diffusion_models", f"{WAN22}/diffusion_models/{high}")])
    vae, pos, neg = wan_text_and_vae(g)
    unet_low = g.add("UNETLoader", (0, 1000), size=(320, 82), unet_name=low, weight_dtype="default", title="Low-noise expert",
                     models=[model_file(low, "diffusion_models", f"{WAN22}/diffusion_models/{low}")])
    shift_high = g.add("ModelSamplingSD3", (0, 760), model=out(unet_high), shift=8.0)
    shift_low = g.add("ModelSamplingSD3", (0, 1120), model=out(unet_low), shift=8.0)
    latent = g.add("EmptyHunyuanLatentVideo", (0, 860), width=640, height=640, length=81, batch_size=1)
    schedule = library("procache-dit-50-17full").resampled(steps)
    loader = g.add("ProCacheScheduleLoader", (460, 200), size=(340, 260), source="typed pattern",
                   pattern=schedule_text(schedule), interval=3, steps=steps, selective=False)
    apply_high = g.add("ProCacheApply", (830, 0), size=(300, 230), title="ProCache Apply (high noise)",
                       model=out(shift_high), schedule=out(loader), start_percent=0.0, end_percent=1.0,
                       force_last_full=False, cache_on_cpu=False, **APPLY_DEFAULTS)
    apply_low = g.add("ProCacheApply", (830, 500), size=(300, 230), title="ProCache Apply (low noise)",
                      model=out(shift_low), schedule=out(loader), start_percent=0.0, end_percent=1.0,
                      force_last_full=False, cache_on_cpu=False, **APPLY_DEFAULTS)
    first = g.add("KSamplerAdvanced", (1160, 0), size=(320, 334), title="KSampler (high noise)",
                  model=out(apply_high), positive=out(pos), negative=out(neg), latent_image=out(latent),
                  add_noise="enable", noise_seed=42, control_after_generate="fixed", steps=steps, cfg=3.5,
                  sampler_name="euler", scheduler="simple", start_at_step=0, end_at_step=switch,
                  return_with_leftover_noise="enable")
    second = g.add("KSamplerAdvanced", (1160, 400), size=(320, 334), title="KSampler (low noise)",
                   model=out(apply_low), positive=out(pos), negative=out(neg), latent_image=out(first),
                   add_noise="disable", noise_seed=0, control_after_generate="fixed", steps=steps, cfg=3.5,
                   sampler_name="euler", scheduler="simple", start_at_step=switch, end_at_step=10000,
                   return_with_leftover_noise="disable")
    video_tail(g, out(second), out(vae), 1520, 0, 16, "procache/wan22")
    return g


def sd35() -> Graph:
    g = Graph("SD3.5 Large text to image with ProCache")
    name = "sd3.5_large_fp8_scaled.safetensors"
    steps = 28
    g.note("**Stable Diffusion 3.5 Large + ProCache** (branch-level caching of the joint blocks)\n\n"
           f"- `models/checkpoints/{name}` — [Comfy-Org/stable-diffusion-3.5-fp8]"
           f"({HF}/Comfy-Org/stable-diffusion-3.5-fp8); the text encoders and VAE are inside it\n\n"
           "SD3.5 support is new: this schedule is conservative, a full step every second step (2x) and the "
           "last step full. For more speed try the bundled `procache-dit-50-17full` with `steps` 28.", (-480, 0))
    ckpt = g.add("CheckpointLoaderSimple", (0, 0), size=(320, 98), ckpt_name=name,
                 models=[model_file(name, "checkpoints", f"{HF}/Comfy-Org/stable-diffusion-3.5-fp8/resolve/main/{name}")])
    pos = g.add("CLIPTextEncode", (0, 400), size=(400, 160), title="Positive prompt", clip=out(ckpt, 1),
                text="a glass bottle holding a tiny pink galaxy, on a wooden kitchen table, morning light")
    neg = g.add("CLIPTextEncode", (0, 600), size=(400, 120), title="Negative prompt", clip=out(ckpt, 1), text="")
    latent = g.add("EmptySD3LatentImage", (0, 760), width=1024, height=1024, batch_size=1)
    apply = procache_chain(g, out(ckpt), uniform(steps, 2), 460, 0, steps, force_last_full=True)
    sampler = g.add("KSampler", (1160, 0), size=(320, 262), model=out(apply), positive=out(pos), negative=out(neg),
                    latent_image=out(latent), seed=42, control_after_generate="fixed", steps=steps, cfg=4.5,
                    sampler_name="euler", scheduler="sgm_uniform", denoise=1.0)
    image_tail(g, out(sampler), out(ckpt, 2), 1520, 0, "procache/sd35")
    return g


def qwen_image() -> Graph:
    g = Graph("Qwen-Image text to image with ProCache")
    base = f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
    unet_name, te, vae_name = ("qwen_image_fp8_e4m3fn.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                               "qwen_image_vae.safetensors")
    steps = 20
    g.note("**Qwen-Image + ProCache**\n\n"
           f"- `models/diffusion_models/{unet_name}`\n- `models/text_encoders/{te}`\n- `models/vae/{vae_name}`\n\n"
           f"All three from [Comfy-Org/Qwen-Image_ComfyUI]({HF}/Comfy-Org/Qwen-Image_ComfyUI).\n\n"
           "Branch-level caching of the joint attention and MLPs. Qwen-Image support is new: this schedule is "
           "conservative, a full step every second step (2x) and the last step full.", (-480, 0))
    unet = g.add("UNETLoader", (0, 0), size=(320, 82), unet_name=unet_name, weight_dtype="default",
                 models=[model_file(unet_name, "diffusion_models", f"{base}/diffusion_models/{unet_name}")])
    clip = g.add("CLIPLoader", (0, 130), size=(320, 106), clip_name=te, type="qwen_image", device="default",
                 models=[model_file(te, "text_encoders", f"{base}/text_encoders/{te}")])
    vae = g.add("VAELoader", (0, 290), size=(320, 58), vae_name=vae_name,
                models=[model_file(vae_name, "vae", f"{base}/vae/{vae_name}")])
    pos = g.add("CLIPTextEncode", (0, 400), size=(400, 160), title="Positive prompt", clip=out(clip),
                text='a hand-painted shop sign reading "ProCache Noodles" above a steaming street stall at night')
    neg = g.add("CLIPTextEncode", (0, 600), size=(400, 120), title="Negative prompt", clip=out(clip), text="")
    shift = g.add("ModelSamplingAuraFlow", (0, 760), model=out(unet), shift=3.1)
    latent = g.add("EmptySD3LatentImage", (0, 860), width=1328, height=1328, batch_size=1)
    apply = procache_chain(g, out(shift), uniform(steps, 2), 460, 0, steps, force_last_full=True)
    sampler = g.add("KSampler", (1160, 0), size=(320, 262), model=out(apply), positive=out(pos), negative=out(neg),
                    latent_image=out(latent), seed=42, control_after_generate="fixed", steps=steps, cfg=2.5,
                    sampler_name="euler", scheduler="simple", denoise=1.0)
    image_tail(g, out(sampler), out(vae), 1520, 0, "procache/qwen_image")
    return g


WORKFLOWS = {
    "procache_pixart_sigma_t2i": pixart_sigma,
    "procache_pixart_sigma_eoc_t2i": lambda: pixart_sigma(with_eoc=True),
    "procache_pixart_sigma_router_t2i": pixart_sigma_router,
    "procache_pixart_alpha_t2i": pixart_alpha,
    "procache_flux_dev_t2i": lambda: flux("dev"),
    "procache_flux_schnell_t2i": lambda: flux("schnell"),
    "procache_wan21_t2v": wan21,
    "procache_wan22_t2v": wan22,
    "procache_sd35_t2i": sd35,
    "procache_qwen_image_t2i": qwen_image,
}


# ---- writing both formats ---------------------------------------------------------------------------------


def to_ui(g: Graph, infos: dict, stem: str) -> dict:
    from test_workflows import widget_inputs, is_widget
    links, nodes = [], []
    incoming: dict[int, list] = {}
    for node in g.nodes:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = infos[node["type"]]
        order = [name for section in ("required", "optional") for name in info["input_order"].get(section, [])]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in order:
            value = node["inputs"].get(name)
            if is_link(value):
                links.append([len(links) + 1, value[1], value[2], node["id"], name, specs[name][0]])
        incoming[node["id"]] = order
    link_ids_by_source: dict[tuple, list] = {}
    for link in links:
        link_ids_by_source.setdefault((link[1], link[2]), []).append(link[0])
    for order, node in enumerate(g.nodes):
        entry = {"id": node["id"], "type": node["type"], "pos": node["pos"],
                 "size": list(node["size"] or (320, 130)), "flags": {}, "order": order, "mode": 0,
                 "inputs": [], "outputs": [], "properties": {}}
        if node["type"] in FRONTEND_ONLY:
            entry["widgets_values"] = [node["inputs"]["text"]]
            entry["color"], entry["bgcolor"] = "#432", "#653"
        else:
            info = infos[node["type"]]
            specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
            values = []
            for name, spec, control in widget_inputs(info):
                if control:
                    values.append(node["inputs"].get("control_after_generate", "fixed"))
                    continue
                value = node["inputs"].get(name)
                if is_link(value):
                    raise ValueError(f"{node['type']}.{name}: widget inputs are not linked in these workflows")
                if value is None:
                    raise ValueError(f"{g.title}: {node['type']} needs a value for {name}")
                values.append(value)
            for name in incoming[node["id"]]:
                value = node["inputs"].get(name)
                if is_link(value):
                    link = next(l for l in links if l[3] == node["id"] and l[4] == name)
                    entry["inputs"].append({"name": name, "type": specs[name][0], "link": link[0]})
                elif is_widget(specs[name]):
                    entry["inputs"].append({"name": name, "type": widget_type(specs[name]),
                                            "widget": {"name": name}, "link": None})
            for slot, (type_, name) in enumerate(zip(info["output"], info["output_name"])):
                entry["outputs"].append({"name": name, "type": type_ if isinstance(type_, str) else "COMBO",
                                         "slot_index": slot, "links": link_ids_by_source.get((node["id"], slot), [])})
            entry["properties"]["Node name for S&R"] = node["type"]
            if node["type"].startswith("ProCache"):
                entry["properties"]["cnr_id"] = "procache"
            else:
                entry["properties"]["cnr_id"] = "comfy-core"
            if node["models"]:
                entry["properties"]["models"] = node["models"]
            entry["widgets_values"] = values
        if node["title"]:
            entry["title"] = node["title"]
        nodes.append(entry)
    # UI links name the target slot by index among the node's inputs
    for link in links:
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == link[4])
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"procache/workflows/{stem}")), "revision": 0, "last_node_id": len(g.nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [560, 80]},
                                                                  "procache": {"title": g.title}},
            "version": 0.4}


def widget_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def to_api(g: Graph, infos: dict) -> dict:
    prompt = {}
    for node in g.nodes:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = infos[node["type"]]
        order = [name for section in ("required", "optional") for name in info["input_order"].get(section, [])]
        inputs = {}
        for name in order:
            if name not in node["inputs"]:
                continue
            value = node["inputs"][name]
            inputs[name] = [str(value[1]), value[2]] if is_link(value) else value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node["title"] or info.get("display_name") or node["type"]}}
    return prompt


def main() -> None:
    from test_workflows import node_infos
    infos = node_infos()
    ui_dir, api_dir = os.path.join(ROOT, "example_workflows"), os.path.join(ROOT, "workflows", "api")
    os.makedirs(api_dir, exist_ok=True)
    os.makedirs(ui_dir, exist_ok=True)
    for stem, make in WORKFLOWS.items():
        g = make()
        for path, doc in ((os.path.join(ui_dir, f"{stem}.json"), to_ui(g, infos, stem)),
                          (os.path.join(api_dir, f"{stem}.json"), to_api(g, infos))):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, ensure_ascii=False)
                f.write("\n")
        write_thumbnail(os.path.join(ui_dir, f"{stem}.jpg"), g)
        print("wrote", stem)
    write_node_reference()



def write_thumbnail(path: str, g: Graph) -> None:
    """The template browser's card: the workflow's title and its schedule as a strip of steps."""
    from PIL import Image, ImageDraw, ImageFont
    loader = next((n for n in g.nodes if n["type"] == "ProCacheScheduleLoader"), None)
    size, colors = 512, {1: (86, 180, 233), 2: (230, 159, 0), 0: (70, 76, 92)}
    img = Image.new("RGB", (size, size), (24, 26, 33))
    draw = ImageDraw.Draw(img)

    def font(points: int, bold: bool = False):
        try:
            return ImageFont.truetype(f"DejaVuSans{'-Bold' if bold else ''}.ttf", points)
        except OSError:
            return ImageFont.load_default()

    title = g.title.replace(" with ProCache", "")
    words, lines = title.split(), [""]
    for word in words:                      # wrap the title to the card
        if draw.textlength(f"{lines[-1]} {word}", font=font(34, True)) > size - 60:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}".strip()
    for i, line in enumerate(lines):
        draw.text((30, 40 + 44 * i), line, font=font(34, True), fill=(230, 230, 235))
    if loader is None:      # a router trained on the user's model: draw one trained on the reference DiT
        from procache_core.router import Router
        mask = Router.load(os.path.join(ROOT, "benchmarks", "results", EXAMPLE_ROUTER)).mask()
        steps, units = mask.shape
        cell, row = (size - 60) / steps, 100 / units
        for i in range(steps):
            for u in range(units):
                draw.rectangle([30 + i * cell + 1, 300 + u * row, 30 + (i + 1) * cell - 1, 300 + (u + 1) * row - 1],
                               fill=colors[1] if mask[i, u] else colors[0])
        draw.text((30, 420), f"{steps} steps x {units} units, learned per model", font=font(20), fill=(150, 155, 170))
    else:
        schedule = parse_pattern(loader["inputs"]["pattern"])
        apply = next(n for n in g.nodes if n["type"] == "ProCacheApply")["inputs"]
        schedule = schedule.windowed(apply["start_percent"], apply["end_percent"], apply["force_last_full"])
        cell = (size - 60) / schedule.steps
        for i, kind in enumerate(schedule.kinds):
            draw.rounded_rectangle([30 + i * cell + 1, 300, 30 + (i + 1) * cell - 1, 400], radius=3,
                                   fill=colors[int(kind)])
        counts = (schedule.count(1), schedule.count(2), schedule.count(0))
        draw.text((30, 420), f"{schedule.steps} steps: {counts[0]} full, {counts[1]} selective, {counts[2]} reuse",
                  font=font(20), fill=(150, 155, 170))
    draw.text((30, 455), "ProCache", font=font(22, True), fill=(86, 180, 233))
    img.save(path, quality=90)


def node_reference(infos: dict) -> str:
    """docs/nodes.md: every pack node with its inputs and outputs, from the live definitions."""
    from procache_comfyui.nodes import NODES
    from test_workflows import all_specs, spec_options, spec_type
    lines = ["# Node reference", "",
             "Generated from the nodes' own definitions (`python3 workflows/build.py`); the same text is "
             "in the tooltips.", ""]
    for cls in NODES:
        info = infos[cls.GET_SCHEMA().node_id]
        lines += [f"## {info['display_name']}", "",
                  f"id `{info['name']}` · category `{info['category']}`", "", info["description"], "",
                  "| input | type | default | what it does |", "|---|---|---|---|"]
        optional = set(info["input"].get("optional", {}))
        for name, spec in all_specs(info).items():
            options = spec_options(spec)
            kind = spec_type(spec)
            if kind == "COMBO":
                choices = spec[0] if isinstance(spec[0], (list, tuple)) else options.get("options", [])
                kind = "one of " + ", ".join(f"`{c}`" for c in choices[:8]) + (" …" if len(choices) > 8 else "")
            default = options.get("default", "")
            default = f"`{default}`" if default != "" else ("optional" if name in optional else "")
            tooltip = (options.get("tooltip") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{name}`{' (optional)' if name in optional else ''} | {kind} | {default} | {tooltip} |")
        lines += ["", "| output | type | what it is |", "|---|---|---|"]
        tooltips = info.get("output_tooltips") or [""] * len(info["output"])
        for name, kind, tooltip in zip(info["output_name"], info["output"], tooltips):
            lines.append(f"| `{name}` | {kind} | {tooltip or ''} |")
        lines.append("")
    return "\n".join(lines)


def write_node_reference() -> None:
    from test_workflows import node_infos
    path = os.path.join(ROOT, "docs", "nodes.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(node_reference(node_infos()))
    print("wrote", path)


if __name__ == "__main__":
    main()
