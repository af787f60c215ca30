"""Model families with branch-level caching; anything else gets model-level reuse."""
from __future__ import annotations

from torch import nn

from .auraflow import AURAFLOW
from .base import BlockStack, Branch, FamilySpec
from .cosmos import COSMOS_PREDICT2
from .flux import FLUX
from .hidream import HIDREAM
from .hunyuan_dit import HUNYUAN_DIT
from .kandinsky5 import KANDINSKY5
from .lumina import LUMINA
from .ltxv import LTXV
from .mochi import MOCHI
from .pixart import PIXART
from .qwen import QWEN_IMAGE
from .reference import REFERENCE
from .sd3 import SD3
from .wan import WAN

FAMILIES: tuple[FamilySpec, ...] = (REFERENCE, PIXART, FLUX, WAN, SD3, QWEN_IMAGE, LUMINA, HIDREAM, LTXV, AURAFLOW, COSMOS_PREDICT2, HUNYUAN_DIT, KANDINSKY5, MOCHI)


def is_unet(model: nn.Module) -> bool:
    """SD1.5 / SDXL style UNets: the pack caches transformer blocks, which they do not have."""
    return all(hasattr(model, name) for name in ("input_blocks", "middle_block", "output_blocks"))


def find_family(model: nn.Module) -> tuple[FamilySpec | None, str]:
    """The family for `model` and a sentence for the user saying which mode it gets and why."""
    name = type(model).__name__
    for family in FAMILIES:
        try:
            detected = family.detect(model)
        except Exception:        # a detector must never take the user's graph down
            detected = False
        if not detected:
            continue
        problems = family.problems(model)
        if problems:
            return None, (f"{name}: looks like {family.name} but its blocks changed ({problems[0]}); "
                          "using model-level reuse")
        return family, f"{name}: branch-level caching ({family.description})"
    return None, f"{name}: no branch-level adapter; using model-level reuse of the output residual"


__all__ = ["FAMILIES", "find_family", "is_unet", "FamilySpec", "BlockStack", "Branch"]
