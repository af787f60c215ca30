"""Constraint-aware caching pattern search (CASS): drawing candidate patterns.

A candidate is a partition of the step count T into exactly B segments (a full step followed by
reuse steps), each of length v_min+1 .. v_max+1, written longest first so that reuse intervals
never grow along the denoising order. Drawing follows the method's rule: B-1 sorted uniform cut
points over the slack, rejection of segments that are too long, duplicates collapsed. Unlike the
authors' script it is seeded, so the same seed always gives the same candidates.
"""
from __future__ import annotations

import dataclasses
import random

from .schedule import ScheduleError, pattern_from_segments


@dataclasses.dataclass(frozen=True)
class SearchConstraints:
    """Constraints on the patterns to draw.

    steps: the sampler step count T.
    full_steps: the budget B, the exact number of full steps (the first is always one).
    min_interval / max_interval: bounds on a reuse interval, the number of reuse steps between two
        full steps (0 = back-to-back full steps). Raising max_interval allows longer caching early.
    """

    steps: int
    full_steps: int
    min_interval: int = 1
    max_interval: int = 4

    def __post_init__(self):
        t, b, lo, hi = self.steps, self.full_steps, self.min_interval, self.max_interval
        if t < 1:
            raise ScheduleError(f"steps must be at least 1, got {t}")
        if not 1 <= b <= t:
            raise ScheduleError(f"the budget of full steps must be between 1 and steps={t}, got {b}")
        if lo < 0 or hi < lo:
            raise ScheduleError(f"need 0 <= min_interval <= max_interval, got min_interval={lo}, max_interval={hi}")
        if b * (lo + 1) > t:
            raise ScheduleError(
                f"no pattern fits: {b} full steps each followed by at least {lo} reuse steps need "
                f"{b * (lo + 1)} steps but steps={t}; lower full_steps or min_interval")
        if b * (hi + 1) < t:
            raise ScheduleError(
                f"no pattern fits: {b} full steps each followed by at most {hi} reuse steps cover only "
                f"{b * (hi + 1)} of steps={t}; raise full_steps or max_interval")

    @classmethod
    def for_speedup(cls, steps: int, speedup: float, min_interval: int = 1, max_interval: int = 4):
        """Turn a target speedup into a budget: B = round(T / speedup), at least 1."""
        if speedup < 1.0:
            raise ScheduleError(f"the target speedup must be at least 1.0, got {speedup}")
        return cls(steps, max(1, round(steps / speedup)), min_interval, max_interval)


def draw_candidates(constraints: SearchConstraints, count: int, seed: int = 0,
                    max_attempts: int = 1_000_000) -> list[list[int]]:
    """Up to `count` distinct 0/1 patterns satisfying the constraints, in the order first drawn."""
    c = constraints
    lo, hi = c.min_interval + 1, c.max_interval + 1        # allowed segment lengths
    slack = c.steps - c.full_steps * lo
    rng = random.Random(seed)
    seen: dict[tuple[int, ...], None] = {}
    for _ in range(max_attempts):
        if len(seen) >= count:
            break
        cuts = sorted(rng.randint(0, slack) for _ in range(c.full_steps - 1))
        bounds = [0] + cuts + [slack]
        segments = [lo + b - a for a, b in zip(bounds, bounds[1:])]
        if max(segments) > hi:
            continue
        seen.setdefault(tuple(sorted(segments, reverse=True)), None)
    return [pattern_from_segments(segments) for segments in seen]


def count_partitions(constraints: SearchConstraints, limit: int = 10_000_000) -> int:
    """How many distinct patterns the constraints allow (capped at `limit`)."""
    c = constraints
    lo, hi = c.min_interval + 1, c.max_interval + 1
    # ways[n][k][m]: partitions of n into k parts, each in [lo, m]; iterate largest part first.
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def ways(n: int, k: int, largest: int) -> int:
        if k == 0:
            return 1 if n == 0 else 0
        total = 0
        for part in range(min(largest, n - lo * (k - 1)), lo - 1, -1):
            total += ways(n - part, k - 1, part)
            if total >= limit:
                return limit
        return total

    return ways(c.steps, c.full_steps, hi)
