"""Token Importance Selector: how selective steps pick the tokens deep blocks recompute."""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..procache_core import TokenSelector
from ..procache_core.tokens import SCORES

SELECTOR = io.Custom("PROCACHE_SELECTOR")


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
                io.Float.Input("deep_fraction", default=0.25, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of blocks, counted from the deepest, that recompute tokens. "
                                       "The paper uses the deepest 25%."),
                io.Combo.Input("score", options=list(SCORES), default="norm",
                               tooltip="norm: L2 norm of the token's branch input (free). "
                                       "random: seeded random tokens (free)."),
                io.Boolean.Input("same_for_cond_uncond", default=False,
                                 tooltip="Pick the same tokens for every CFG stream (mean score)."),
            ],
            outputs=[SELECTOR.Output(display_name="selector", tooltip="Connect to ProCache Apply.")],
        )

    @classmethod
    def execute(cls, token_ratio, deep_fraction, score, same_for_cond_uncond) -> io.NodeOutput:
        tokens = TokenSelector(ratio=token_ratio, score=score, shared_streams=same_for_cond_uncond)
        return io.NodeOutput(SelectorConfig(tokens, deep_fraction))
