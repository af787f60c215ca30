"""ProCache for ComfyUI: faster Diffusion Transformers by constraint-aware feature caching."""
import importlib.util

WEB_DIRECTORY = "./web"

# ComfyUI imports this package from custom_nodes/. Test runners also import it (the repository
# root is a package); there is no host then, and only procache_core is meant to be used.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import ProCacheExtension

    async def comfy_entrypoint() -> ProCacheExtension:
        return ProCacheExtension()

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
