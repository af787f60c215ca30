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
            category="ProCache/selective",
            description="On selective steps, the deepest blocks recompute their MLP (and cross-attention) "
                        "for the most important tokens and write them into the cache.",
            inputs=[
                io.Float.Input("token_ratio", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of tokens recomputed per deep block. 0 makes selective steps plain "
                                       "reuse; 1 recomputes every token. Cost grows linearly."),
                io.Combo.Input("ratio_schedule", options=list(RATIO_SCHEDULES), default="constant",
                               tooltip="How the ratio varies by step, block and module (the paper's schedule). "
                                       "constant: the same ratio everywhere. toca: the method's DiT schedule, "
                                       "scaling the ratio up late in sampling, in deeper blocks and 2.5x for the "
                                       "MLP (early selective steps may recompute nothing; try ratio 0.07). "
                                       "toca_pixart: the method's PixArt schedule, more tokens early and in the "
                                       "shallower deep blocks, MLP 1.6x, cross-attention 0.6x (try ratio 0.3). "
                                       "Clamped to 0..1."),
                io.Float.Input("deep_fraction", default=0.25, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of blocks, counted from the deepest, that recompute tokens. "
                                       "The paper uses the deepest 25%. 0 turns selective steps into reuse."),
                io.Combo.Input("modules", options=list(MODULE_CHOICES), default="mlp + cross-attention",
                               tooltip="Which token-wise branches selective steps refresh. The MLP always exists "
                                       "(Flux single blocks: the MLP half of the fused output); cross-attention "
                                       "exists in PixArt and Wan. Self-attention is never recomputed on cached "
                                       "steps."),
                io.Combo.Input("score", options=list(SCORES), default="output_norm",
                               tooltip="How tokens are ranked; highest first. "
                                       "attention_received: the attention each token receives from the other "
                                       "tokens (ToCa), measured on full steps in deep blocks only, from "
                                       "attention_queries sampled queries and the block's own q/k (no attention "
                                       "map is formed; about attention_queries/tokens of one attention product, "
                                       "e.g. 64/4096 = 1.6%). "
                                       "cross_entropy: entropy of each image token's attention over the text "
                                       "(diffuse first; PixArt and Wan cross-attention, Flux's image-to-text "
                                       "attention), measured on full steps in deep blocks only, for every token "
                                       "against the text keys: about text tokens/image tokens of one attention "
                                       "product. Models without the needed attention use output_norm (logged once). "
                                       "output_norm: norm of the token's cached branch output (free). "
                                       "input_norm: norm of its current branch input (free). change: how far its "
                                       "branch input moved since the last full step (keeps one input copy per deep "
                                       "branch). random: seeded (free)."),
                io.Float.Input("staleness_weight", default=0.25, min=0.0, max=4.0, step=0.05,
                               tooltip="Bonus for tokens not refreshed for several selective steps, so every "
                                       "token gets its turn: weight x (selective steps since the token was last "
                                       "refreshed) / 4, added to its unit-scaled score. 0 turns it off."),
                io.Float.Input("spatial_bonus", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="Multiply the score of the best token in every spatial_grid x spatial_grid "
                                       "cell of square token grids by 1 + this, spreading refreshes over the "
                                       "image (the method uses 0.6 on DiT, 0.4 on PixArt). 0 turns it off."),
                io.Boolean.Input("same_for_cond_uncond", default=False,
                                 tooltip="Pick the same tokens for every CFG stream (mean score), as the method's "
                                         "PixArt code does. Off lets each stream pick its own."),
                io.Int.Input("spatial_grid", default=2, min=1, max=16, optional=True,
                             tooltip="Cell size of the spatial bonus, in tokens (the method: 2 on DiT, 4 on "
                                     "PixArt). Grids that do not divide the token grid get no bonus."),
                io.Int.Input("attention_queries", default=64, min=1, max=4096, optional=True,
                             tooltip="How many randomly drawn queries the attention_received score averages "
                                     "over. More is closer to the full attention map and costs linearly; "
                                     "only used by attention_received."),
            ],
            outputs=[SELECTOR.Output(display_name="selector", tooltip="Connect to ProCache Apply.")],
        )

    @classmethod
    def execute(cls, token_ratio, ratio_schedule, deep_fraction, modules, score, staleness_weight,
                spatial_bonus, same_for_cond_uncond, spatial_grid=2, attention_queries=64) -> io.NodeOutput:
        tokens = TokenSelector(ratio=token_ratio, ratio_schedule=ratio_schedule, modules=MODULE_CHOICES[modules],
                               score=score, staleness_weight=staleness_weight, spatial_bonus=spatial_bonus,
                               spatial_grid=spatial_grid, shared_streams=same_for_cond_uncond,
                               attention_queries=attention_queries)
        return io.NodeOutput(SelectorConfig(tokens, deep_fraction))
