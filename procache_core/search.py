"""Constraint-aware caching pattern search (CASS): drawing candidate patterns.

A candidate is a partition of the step count T into exactly B segments (a full step followed by
reuse steps), each of length v_min+1 .. v_max+1, written longest first so that reuse intervals
never grow along the denoising order. Drawing follows the method's rule: B-1 sorted uniform cut
points over the slack, rejection of segments that are too long, duplicates collapsed. Unlike the
authors' script it is seeded, so the same seed always gives the same candidates.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time

from .schedule import ScheduleError, full_step_segments, inject_selective, pattern_from_segments


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
        budget = max(1, round(steps / speedup))
        try:
            return cls(steps, budget, min_interval, max_interval)
        except ScheduleError as e:
            raise ScheduleError(f"target speedup {speedup:g}x at {steps} steps means {budget} full steps: {e}") from None


def auto_max_interval(steps: int, full_steps: int) -> int:
    """The longest reuse interval a search allows when the user leaves it to the pack: twice the mean
    interval, at least 4. Room for uneven spacings at any speedup (a fixed 4 admits only even spacing
    at 20 steps and 5x, and no pattern at all at 6x), without the one-full-step-then-reuse-everything
    extremes."""
    mean_interval = math.ceil(steps / max(1, full_steps)) - 1
    return max(4, 2 * mean_interval)


def draw_candidates(constraints: SearchConstraints, count: int, seed: int = 0,
                    max_attempts: int = 1_000_000) -> list[list[int]]:
    """Up to `count` distinct 0/1 patterns satisfying the constraints, in the order first drawn."""
    c = constraints
    if count >= count_partitions(c, limit=count + 1):
        return all_partitions(c)          # the whole space is asked for: list it, do not hunt for it
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


def all_partitions(constraints: SearchConstraints) -> list[list[int]]:
    """Every pattern the constraints allow, longest first segments first (use on small spaces)."""
    c = constraints
    lo, hi = c.min_interval + 1, c.max_interval + 1
    out: list[list[int]] = []

    def walk(left: int, parts: int, largest: int, prefix: list[int]):
        if parts == 0:
            if left == 0:
                out.append(pattern_from_segments(prefix))
            return
        for part in range(min(largest, left - lo * (parts - 1)), lo - 1, -1):
            if part * parts < left:
                break                      # the remaining parts cannot reach the total any more
            walk(left - part, parts - 1, part, prefix + [part])

    walk(c.steps, c.full_steps, hi, [])
    return out


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

    try:
        return ways(c.steps, c.full_steps, hi)
    except RecursionError:          # budgets of ~1000 full steps: too deep to count, call it plenty
        return limit


# ---- patterns built by rule ------------------------------------------------------------------
def even_pattern(constraints: SearchConstraints) -> list[int]:
    """Uniform intervals at the budget: B segments whose lengths differ by at most one, longer first
    (FORA's every-N-steps when B divides T evenly). Always satisfies feasible constraints."""
    c = constraints
    base, extra = divmod(c.steps, c.full_steps)
    return pattern_from_segments([base + 1] * extra + [base] * (c.full_steps - extra))


def generic_pattern(steps: int, speedup: float, spread: float = 0.35) -> list[int]:
    """A model-agnostic pattern for a step count and speedup, by the constraint rule.

    B = round(T / speedup) full steps; segment lengths fall linearly from (1 + spread) to
    (1 - spread) times the mean segment, rounded by largest remainder and kept non-increasing:
    long reuse intervals early, where features change slowly, short ones late.
    """
    budget = SearchConstraints.for_speedup(steps, speedup, 0, steps).full_steps
    mean = steps / budget
    if budget == 1:
        exact = [float(steps)]
    else:
        exact = [mean * (1 + spread - 2 * spread * i / (budget - 1)) for i in range(budget)]
    lengths = [max(1, math.floor(e)) for e in exact]
    while sum(lengths) > steps:
        lengths[max(range(budget), key=lambda i: (lengths[i], i))] -= 1
    order = sorted(range(budget), key=lambda i: (math.floor(exact[i]) - exact[i], i))
    for i in range(steps - sum(lengths)):
        lengths[order[i % budget]] += 1
    return pattern_from_segments(sorted(lengths, reverse=True))


def admits(constraints: SearchConstraints, pattern) -> bool:
    """Whether a 0/1 pattern is one the constraints could draw: T steps, B full ones starting with a
    full step, every reuse interval within bounds and none longer than the one before it."""
    c = constraints
    if len(pattern) != c.steps or not pattern or pattern[0] != 1 or sum(1 for k in pattern if k == 1) != c.full_steps:
        return False
    intervals = [length - 1 for length, _ in full_step_segments(pattern)]
    return (all(c.min_interval <= i <= c.max_interval for i in intervals)
            and all(a >= b for a, b in zip(intervals, intervals[1:])))


# ---- the search --------------------------------------------------------------------------------
def output_error(outputs, reference) -> float:
    """Relative MSE of final outputs against the full-compute outputs, averaged over seeds:
    sum (out - ref)^2 / sum ref^2 per seed. `outputs`/`reference` are tensors or lists of them."""
    outs = list(outputs) if isinstance(outputs, (list, tuple)) else list(outputs.unbind(0))
    refs = list(reference) if isinstance(reference, (list, tuple)) else list(reference.unbind(0))
    if len(outs) != len(refs):
        raise ValueError(f"{len(outs)} outputs for {len(refs)} reference outputs")
    errors = []
    for out, ref in zip(outs, refs):
        out, ref = out.detach().double(), ref.detach().double()
        errors.append(float((out - ref).square().sum() / ref.square().sum().clamp(min=1e-30)))
    return sum(errors) / len(errors)


# One model-level residual replaces branch level only when its measured error is at most this share
# of branch level's: a tie keeps branch level (selective steps and the finer rungs need it), and a
# few seeds' errors differ by chance.
MODEL_LEVEL_SHARE = 0.8


def prefer_model_level(branch_error: float, model_error: float) -> bool:
    """Whether a schedule's measured model-level error (one residual for the whole block stack) is
    clearly below its branch-level error, both against the same full-compute outputs. On the trained
    reference Flux with Taylor 1 at 5x it is (about 11 dB closer); on the reference DiT it is not."""
    return math.isfinite(model_error) and model_error <= MODEL_LEVEL_SHARE * branch_error


@dataclasses.dataclass
class Candidate:
    pattern: tuple[int, ...]
    origin: str = "drawn"            # "drawn", "uniform" (even intervals), "generic" (generic_pattern) or
                                     # "winner+selective"
    predicted: float | None = None   # pre-rank score (lower is better), when a profile was used
    error: float | None = None       # measured: relative MSE of the final outputs vs full compute
    seconds: float | None = None     # wall time of its runs

    @property
    def full_steps(self) -> int:
        return sum(1 for k in self.pattern if k == 1)

    @property
    def text(self) -> str:
        return "".join(str(k) for k in self.pattern)


@dataclasses.dataclass
class SearchResult:
    constraints: SearchConstraints
    best: Candidate                  # the winner as run (0/1 pattern)
    final: Candidate                 # what to use: the winner, or its injected version
    candidates: list[Candidate]      # every candidate that was run, in run order
    pool: list[Candidate]            # every candidate that was pre-ranked (empty without a profile)
    uniform: Candidate | None        # the even-interval comparator, when it was run
    full_seconds: float              # wall time of the full-compute runs
    seed: int
    generic: Candidate | None = None  # the library's generic pattern as a comparator, when it was run

    def speedup(self, candidate: Candidate) -> float:
        """Measured wall-clock speedup of a candidate over full compute, same seeds."""
        if not candidate.seconds or not self.full_seconds:
            return math.nan
        return self.full_seconds / candidate.seconds


def search(constraints: SearchConstraints, run, reference, count: int = 5, seed: int = 0,
           profile=None, pool: int = 0, selective: bool = False, compare_uniform: bool = True,
           compare_generic: bool = True, full_seconds: float = 0.0, progress=None,
           max_attempts: int = 1_000_000) -> SearchResult:
    """CASS with measured scoring: draw, (pre-rank,) run, score against full compute, keep the best.

    run(pattern) -> the final outputs for the search seeds (tensor [N, ...] or list), with
        `pattern` a list of step digits; `reference` the full-compute outputs of the same seeds.
    count: K, candidates that are run. pool: with a `profile` (profiling.FeatureProfile), draw
        this many, rank them by predicted error and run only the best `count`.
    selective: inject selective steps into the winner (scored plain, as the method's readme does)
        and run it once more so its error is measured too.
    compare_uniform: also run the even-interval pattern at the same budget (FORA-like); it may win.
    compare_generic: also run the library's generic pattern at the same budget (what Apply runs on a
        generic-<steps>-<x>x schedule) where the constraints admit it, so the search never returns a
        schedule that scored worse on its own seeds than the library default.
    progress(done, total, candidate): called after each run; raise from it (or from `run`) to cancel.
    Same constraints, seed and deterministic `run` -> same result.
    """
    if count < 1:
        raise ScheduleError(f"the number of candidates to run must be at least 1, got {count}")
    ranked: list[Candidate] = []
    if profile is not None and pool > count:
        drawn = draw_candidates(constraints, pool, seed, max_attempts)
        ranked = [Candidate(pattern, predicted=score) for score, pattern in profile.rank(drawn)]
        chosen = ranked[:count]
    else:
        chosen = [Candidate(tuple(p)) for p in draw_candidates(constraints, count, seed, max_attempts)]
        if profile is not None:
            for c in chosen:
                c.predicted = profile.predict(c.pattern)
    to_run = list(chosen)

    def predicted(pattern) -> float | None:
        return profile.predict(pattern) if profile is not None and profile.ready else None

    def comparator(pattern: tuple[int, ...], origin: str) -> Candidate:
        """The candidate running `pattern`: a drawn one that already does, or a new one."""
        found = next((c for c in to_run if c.pattern == pattern), None)
        if found is None:
            found = Candidate(pattern, origin=origin, predicted=predicted(pattern))
            to_run.append(found)
        return found

    uniform = None
    if compare_uniform:
        uniform = comparator(tuple(even_pattern(constraints)), "uniform")
        uniform.origin = "uniform"          # also when a drawn candidate was the even one
    generic = None
    if compare_generic:
        pattern = tuple(generic_pattern(constraints.steps, constraints.steps / constraints.full_steps))
        if admits(constraints, pattern):
            generic = comparator(pattern, "generic")
    total = len(to_run) + (1 if selective else 0)
    for i, candidate in enumerate(to_run):
        start = time.perf_counter()
        candidate.error = output_error(run(list(candidate.pattern)), reference)
        candidate.seconds = time.perf_counter() - start
        if progress is not None:
            progress(i + 1, total, candidate)
    best = min(to_run, key=lambda c: (c.error, c.pattern))
    final = best
    if selective:
        injected = tuple(inject_selective(best.pattern))
        final = Candidate(injected, origin="winner+selective", predicted=predicted(injected))
        start = time.perf_counter()
        final.error = output_error(run(list(injected)), reference)
        final.seconds = time.perf_counter() - start
        if progress is not None:
            progress(total, total, final)
    return SearchResult(constraints, best, final, to_run, ranked, uniform, full_seconds, seed, generic)
