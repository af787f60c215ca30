"""ProCache for ComfyUI: faster Diffusion Transformers by constraint-aware feature caching."""
from .nodes import ProCacheExtension

WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> ProCacheExtension:
    return ProCacheExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
