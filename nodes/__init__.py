"""The pack's ComfyUI nodes (thin: they parse inputs, clone the MODEL and attach wrappers)."""
from comfy_api.latest import ComfyExtension, io

from .apply_node import ProCacheApply
from .eoc_node import EOCCorrection, EOCPriorExtractor
from .forecaster_node import ProCacheForecaster, ProCacheForecasterTrainer
from .router_node import HarmoniCaRouterLoader, HarmoniCaRouterTrainer
from .schedule_loader import ProCacheScheduleLoader
from .search_node import ProCacheScheduleSearch
from .selector_node import TokenImportanceSelector

NODES: list[type[io.ComfyNode]] = [ProCacheScheduleLoader, ProCacheApply, TokenImportanceSelector,
                                   ProCacheForecaster, ProCacheForecasterTrainer, ProCacheScheduleSearch,
                                   HarmoniCaRouterTrainer, HarmoniCaRouterLoader, EOCPriorExtractor, EOCCorrection]


class ProCacheExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
