"""Token Importance Selector: how selective steps pick the tokens deep blocks recompute."""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..procache_core import TokenSelector
from ..procache_core.tokens import RATIO_SCHEDULES, SCORES

SELECTOR = io.Custom("PROCACHE_SELECTOR")

MODULE_CHOICES = {
    "mlp + cross-attention": ("mlp", "cross_attention"),
    "mlp only": ("mlp",),
    "cross-attention only": ("cross_attention",),
}


@dataclasses.dataclass(frozen=True)
class SelectorConfig:
    tokens: TokenSelector
    deep_fraction: float


class TokenImportanceSelector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProCacheTokenImportanceSelector",
            display_name="Token Importance Selector",
            category="ProCache",
            description="On selective steps, the deepest blocks recompute their MLP (and cross-attention) "
                        "for the most important tokens and write them into the cache.",
            inputs=[
                io.Float.Input("token_ratio", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of tokens recomputed per deep block. 0 makes selective steps plain "
                                       "reuse; 1 recomputes every token. Cost grows linearly."),
                io.Combo.Input("ratio_schedule", options=list(RATIO_SCHEDULES), default="constant",
                               tooltip="constant: the same ratio everywhere. toca: the method's schedule, scaling "
                                       "the ratio up late in sampling, in deeper blocks and for the MLP (early "
                                       "selective steps may recompute nothing)."),
                io.Float.Input("deep_fraction", default=0.25, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of blocks, counted from the deepest, that recompute tokens. "
                                       "The paper uses the deepest 25%. 0 turns selective steps into reuse."),
                io.Combo.Input("modules", options=list(MODULE_CHOICES), default="mlp + cross-attention",
                               tooltip="Which token-wise branches selective steps refresh. Cross-attention exists "
                                       "in PixArt and Wan. Self-attention is never recomputed on cached steps."),
                io.Combo.Input("score", options=list(SCORES), default="output_norm",
                               tooltip="output_norm: norm of the token's cached branch output (free). "
                                       "input_norm: norm of its current branch input (free). change: how far its "
                                       "branch input moved since the last full step (keeps one input copy per deep "
                                       "branch). random: seeded (free)."),
                io.Float.Input("staleness_weight", default=0.25, min=0.0, max=4.0, step=0.05,
                               tooltip="Bonus for tokens not refreshed for several selective steps, so every "
                                       "token gets its turn. 0 turns it off."),
                io.Float.Input("spatial_bonus", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Boost the best token in every 2x2 cell of square token grids, spreading "
                                       "refreshes over the image. 0 turns it off."),
                io.Boolean.Input("same_for_cond_uncond", default=False,
                                 tooltip="Pick the same tokens for every CFG stream (mean score). Off lets each "
                                         "stream pick its own."),
            ],
            outputs=[SELECTOR.Output(display_name="selector", tooltip="Connect to ProCache Apply.")],
        )

    @classmethod
    def execute(cls, token_ratio, ratio_schedule, deep_fraction, modules, score, staleness_weight,
                spatial_bonus, same_for_cond_uncond) -> io.NodeOutput:
        tokens = TokenSelector(ratio=token_ratio, ratio_schedule=ratio_schedule, modules=MODULE_CHOICES[modules],
                               score=score, staleness_weight=staleness_weight, spatial_bonus=spatial_bonus,
                               shared_streams=same_for_cond_uncond)
        return io.NodeOutput(SelectorConfig(tokens, deep_fraction))
