"""Token selection for selective steps: which tokens a deep block recomputes.

Scores are computed per batch row on the branch's current input (the residual stream after the
current step's modulation), so the selection follows what the block sees now.
"""
from __future__ import annotations

import dataclasses

import torch

SCORES = ("norm", "random")


@dataclasses.dataclass(frozen=True)
class TokenSelector:
    """How many and which tokens a selective step recomputes.

    ratio: share of tokens recomputed per deep block (0 = a selective step is a reuse step,
        1 = recompute every token of the token-wise branches). Raising it costs time linearly.
    score: "norm" (L2 norm of the token's branch input, cheap) or "random" (seeded).
    shared_streams: use one selection for every CFG stream (the mean score), as the paper's
        PixArt code does; off selects per stream.
    """

    ratio: float = 0.1
    score: str = "norm"
    shared_streams: bool = False
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"token ratio must be in [0, 1], got {self.ratio}")
        if self.score not in SCORES:
            raise ValueError(f"unknown token score {self.score!r}; choose one of {', '.join(SCORES)}")

    def count(self, tokens: int) -> int:
        return int(self.ratio * tokens)

    def scores(self, tokens: torch.Tensor, step: int, block: int) -> torch.Tensor:
        """[B, N] importance of each token (higher = recompute first)."""
        if self.score == "random":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + block)
            return torch.rand(tokens.shape[:2], generator=gen).to(tokens.device)
        return tokens.float().norm(dim=-1)

    def select(self, tokens: torch.Tensor, step: int, block: int, streams: int = 1) -> torch.Tensor:
        """[B, k] indices of the top-k tokens per batch row, sorted ascending."""
        batch, n = tokens.shape[:2]
        k = self.count(n)
        if k == 0:
            return torch.empty(batch, 0, dtype=torch.long, device=tokens.device)
        score = self.scores(tokens, step, block)
        if self.shared_streams and streams > 1:
            per_stream = score.reshape(streams, batch // streams, n).mean(0)
            score = per_stream.repeat(streams, 1)
        return score.topk(k, dim=1).indices.sort(dim=1).values


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` ([B, k]) of x ([B, N, ...])."""
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:]))


def scatter_tokens(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of x with rows `idx` replaced by `rows`."""
    index = idx.view(*idx.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.scatter(1, index, rows.to(x.dtype))
