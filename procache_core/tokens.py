"""Token selection for selective steps: which tokens a deep block recomputes.

On a selective step each deep block ranks its tokens and recomputes the refreshable branches
(MLP, cross-attention) for the top ones only. The ranking is made per batch row. No score makes a
full step much slower: the two attention scores are measured at full steps, in deep blocks only,
from the query/key projections the block computes anyway (read with forward hooks, never
recomputed), without ever forming the tokens x tokens attention map:

    score               what it reads                                   extra cost (deep blocks, full steps)
    ------------------  ----------------------------------------------  ------------------------------------
    attention_received  attention each token receives as a key, from    q·k for `attention_queries` (64)
                        a seeded random subset of queries (ToCa's s1)   sampled queries x all keys: 64/N of
                                                                        the block's attention product
    cross_entropy       entropy of each image token's attention over    q·k for all tokens x text tokens:
                        the text tokens (ToCa's s2; Flux: the image-    L/N of the attention product (L text
                        to-text part of its joint attention)            tokens), one [B, N, L] buffer
    output_norm         L2 norm of the token's cached branch output     none (the cache is there)
                        (the paper's ‖v_i‖)
    input_norm          L2 norm of the token's current branch input     none
    change              how far the branch input moved since the last   one stored input per deep branch
                        full step (relative L2)                         (memory), a subtraction
    random              seeded random tokens                            none

A family exposes the attention inputs through probes (families/base.py); for a model without the
needed module (no cross-attention, or compressed keys) the attention scores fall back to
output_norm, with one log message.

Two bonuses from ToCa/ProCache are added on top: staleness (tokens not refreshed for a while rank
higher) and a spatial bonus (the best token of every g x g cell of a square token grid is boosted,
so refreshes spread over the image).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

ATTENTION_SCORES = ("attention_received", "cross_entropy")
SCORES = ATTENTION_SCORES + ("output_norm", "input_norm", "change", "random")
FALLBACK_SCORE = "output_norm"

log = logging.getLogger("procache")
_fallbacks_logged: set = set()
MODULES = ("mlp", "cross_attention")
RATIO_SCHEDULES = ("constant", "toca", "toca_pixart")


@dataclasses.dataclass(frozen=True)
class SelectionContext:
    """What a deep branch knows on a selective step."""

    tokens: torch.Tensor                   # [B, N, C] the branch's current input
    cached: torch.Tensor                   # [B, N, C'] the branch's cached output
    reference: torch.Tensor | None         # [B, N, C] the branch input at the last full step
    staleness: torch.Tensor | None         # [B, N] selective steps since each token was refreshed
    step: int
    steps: int
    block: int
    blocks: int
    role: str                              # "mlp" or "cross_attention"
    streams: int = 1
    importance: torch.Tensor | None = None  # [B, N] attention score measured at the last full step
    family: str = ""


@dataclasses.dataclass(frozen=True)
class TokenSelector:
    """How many and which tokens a selective step recomputes.

    ratio: base share of tokens recomputed per deep block. 0 makes selective steps plain reuse,
        1 recomputes every token of the refreshed branches. Cost grows linearly with it.
    ratio_schedule: "constant" uses `ratio` everywhere; "toca" scales it by step, depth and module
        as the method's DiT code does (more tokens late in sampling, in deeper blocks and in the MLP);
        "toca_pixart" as its PixArt code does (more tokens early, in the shallower deep blocks, and
        in the MLP: 1.6 x, cross-attention 0.6 x). Both clamped to [0, 1].
    modules: which token-wise branches selective steps refresh ("mlp", "cross_attention").
        Self-attention is never refreshed on cached steps.
    score: see the module docstring.
    attention_queries: how many randomly drawn queries the attention_received score averages
        over (seeded per step and block); more is closer to the full map and costs linearly.
    staleness_weight: weight of the staleness bonus (0 turns it off); the bonus is
        weight * (selective steps since refresh) / staleness_norm.
    spatial_grid / spatial_bonus: on square token grids, the top token of each grid x grid cell
        is multiplied by (1 + bonus); 0 turns it off.
    shared_streams: one selection for every CFG stream (the mean score), as the method's PixArt
        code does; off selects per stream.
    """

    ratio: float = 0.1
    ratio_schedule: str = "constant"
    modules: tuple[str, ...] = MODULES
    score: str = "output_norm"
    attention_queries: int = 64
    staleness_weight: float = 0.25
    staleness_norm: float = 4.0
    spatial_grid: int = 2
    spatial_bonus: float = 0.0
    shared_streams: bool = False
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"token ratio must be in [0, 1], got {self.ratio}")
        if self.score not in SCORES:
            raise ValueError(f"unknown token score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.ratio_schedule not in RATIO_SCHEDULES:
            raise ValueError(f"unknown ratio schedule {self.ratio_schedule!r}; choose {' or '.join(RATIO_SCHEDULES)}")
        unknown = set(self.modules) - set(MODULES)
        if unknown:
            raise ValueError(f"unknown modules {sorted(unknown)}; selective steps refresh {', '.join(MODULES)}")
        if self.staleness_norm <= 0:
            raise ValueError("staleness_norm must be positive")
        if self.attention_queries < 1:
            raise ValueError("attention_queries must be at least 1")

    @property
    def needs_reference(self) -> bool:
        return self.score == "change"

    @property
    def tracks_staleness(self) -> bool:
        return self.staleness_weight > 0

    def query_subset(self, n: int, step: int, block: int, device=None) -> torch.Tensor:
        """Sorted indices of the queries attention_received averages over (all when n is small)."""
        if n <= self.attention_queries:
            return torch.arange(n, device=device)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + block * 7 + 1)
        return torch.randperm(n, generator=gen)[:self.attention_queries].sort().values.to(device)

    def ratio_at(self, step: int, steps: int, block: int, blocks: int, role: str) -> float:
        if self.ratio_schedule == "constant":
            return self.ratio
        if self.ratio_schedule == "toca_pixart":
            # The method's PixArt schedule; its step counter runs up, scaled here to any step count.
            step_factor = 1.9 - 1.8 * step / max(steps, 1)
            layer_factor = 1.6 - 1.2 * block / max(blocks - 1, 1)
            module_factor = 1.6 if role == "mlp" else 0.6
            return min(1.0, max(0.0, self.ratio * step_factor * layer_factor * module_factor))
        # The method's DiT schedule, for any step count: its step counter runs down from T-1, so
        # the factor grows along denoising; deeper blocks and the MLP get more tokens.
        steps_left = steps - 1 - step
        step_factor = 3.0 - 4.0 * steps_left / max(steps, 1)
        layer_factor = 0.8 + 0.4 * block / max(blocks - 1, 1)
        module_factor = 2.5 if role == "mlp" else 1.0
        return min(1.0, max(0.0, self.ratio * step_factor * layer_factor * module_factor))

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        """[B, N] importance of each token (higher = recompute first)."""
        if self.score == "random":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step * 1009 + ctx.block * 7 + len(ctx.role))
            base = torch.rand(ctx.tokens.shape[:2], generator=gen).to(ctx.tokens.device)
        elif self.score == "input_norm":
            base = ctx.tokens.float().norm(dim=-1)
        elif self.score == "change" and ctx.reference is not None and ctx.reference.shape == ctx.tokens.shape:
            moved = (ctx.tokens.float() - ctx.reference.float()).norm(dim=-1)
            base = moved / (ctx.reference.float().norm(dim=-1) + 1e-6)
        elif self.score in ATTENTION_SCORES and ctx.importance is not None \
                and ctx.importance.shape == ctx.tokens.shape[:2]:
            base = ctx.importance.float().to(ctx.tokens.device)
        else:            # output_norm, `change` before any reference, attention scores without a probe
            if self.score in ATTENTION_SCORES:
                _log_fallback(ctx.family, self.score, ctx.role)
            base = ctx.cached.float().norm(dim=-1)
        base = base / (base.norm(dim=-1, keepdim=True) + 1e-12)     # comparable scale per row
        if self.tracks_staleness and ctx.staleness is not None:
            base = base + self.staleness_weight * ctx.staleness.float() / self.staleness_norm
        if self.spatial_bonus > 0:
            base = spatial_bonus(base, self.spatial_grid, self.spatial_bonus)
        return base

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        """[B, k] indices of the top-k tokens per batch row, sorted ascending."""
        batch, n = ctx.tokens.shape[:2]
        k = int(self.ratio_at(ctx.step, ctx.steps, ctx.block, ctx.blocks, ctx.role) * n)
        if k == 0:
            return torch.empty(batch, 0, dtype=torch.long, device=ctx.tokens.device)
        score = self.scores(ctx)
        if self.shared_streams and ctx.streams > 1 and batch % ctx.streams == 0:
            score = score.reshape(ctx.streams, batch // ctx.streams, n).mean(0).repeat(ctx.streams, 1)
        return score.topk(k, dim=1).indices.sort(dim=1).values


def _log_fallback(family: str, score: str, role: str) -> None:
    if (family, score, role) in _fallbacks_logged:
        return
    _fallbacks_logged.add((family, score, role))
    needs = "cross-attention to text tokens" if score == "cross_entropy" else "a readable self-attention"
    log.info("ProCache: the %s score needs %s, which the %s branches of %s do not expose; "
             "ranking their tokens by %s instead", score, needs, role, family or "this model", FALLBACK_SCORE)


# ---- attention scores, from q/k read at full steps --------------------------------------------
def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def attention_received(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, Nk] mean attention each key receives from the queries q.

    q: [B, H, Nq, D] (a subset of the queries), k: [B, H, Nk, D]. The softmax runs over all keys,
    so this is the key-axis mean of Nq rows of the real attention map; nothing of size Nk x Nk
    is formed. Per head to bound memory at B x Nq x Nk.
    """
    q, k = q.float(), k.float()
    scale = q.shape[-1] ** -0.5
    total = q.new_zeros(q.shape[0], k.shape[2])
    for h in range(q.shape[1]):
        total += torch.softmax(q[:, h] @ k[:, h].transpose(-1, -2) * scale, dim=-1).sum(1)
    return total / (q.shape[1] * q.shape[2])


def text_entropy(q: torch.Tensor, k_text: torch.Tensor) -> torch.Tensor:
    """[B, N] entropy of each query's head-mean attention over the text keys (high = diffuse).

    q: [B, H, N, D] image (or all) queries; k_text: [B, H, L, D] text keys. As ToCa does, the
    heads are averaged into one map first; per head to bound memory at B x N x L.
    """
    q, k_text = q.float(), k_text.float()
    scale = q.shape[-1] ** -0.5
    probs = q.new_zeros(q.shape[0], q.shape[2], k_text.shape[2])
    for h in range(q.shape[1]):
        probs += torch.softmax(q[:, h] @ k_text[:, h].transpose(-1, -2) * scale, dim=-1)
    probs /= q.shape[1]
    return -(probs * torch.log(probs + 1e-7)).sum(-1)


def rotary(x: torch.Tensor, freqs: torch.Tensor | None, rows: torch.Tensor | slice | None = None,
           dim: int = 2) -> torch.Tensor:
    """Rotary position embedding in ComfyUI's layout (Flux `pe`, Wan `freqs`): pairs of channels
    are rotated by the 2x2 matrices freqs[..., :, :]. None leaves x unchanged. With `rows`, x holds
    only those tokens (token axis `dim` of x and freqs), so only they are rotated."""
    if freqs is None:
        return x
    if rows is not None and freqs.shape[dim] > 1:
        freqs = freqs[(slice(None),) * dim + (rows,)]
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * pairs[..., 0]
    return out.addcmul_(freqs[..., 1], pairs[..., 1]).reshape(*x.shape)


def spatial_bonus(score: torch.Tensor, grid: int, bonus: float) -> torch.Tensor:
    """Boost the best token of each grid x grid cell; only for square token layouts."""
    batch, n = score.shape
    side = math.isqrt(n)
    if side * side != n or side % grid:
        return score
    cells = score.view(batch, side // grid, grid, side // grid, grid).permute(0, 1, 3, 2, 4)
    cells = cells.reshape(batch, -1, grid * grid)
    best = cells.argmax(dim=-1, keepdim=True)
    boosted = cells.scatter(-1, best, cells.gather(-1, best) * (1 + bonus))
    boosted = boosted.view(batch, side // grid, side // grid, grid, grid).permute(0, 1, 3, 2, 4)
    return boosted.reshape(batch, n)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` ([B, k]) of x ([B, N, ...])."""
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:]))


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of x with rows `idx` replaced by `rows`."""
    index = idx.view(*idx.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.scatter(1, index, rows.to(x.dtype))
