"""selective_bench's matching of FLOPs: the schedule without selective steps gets the full steps the
selective steps cost, no more and no fewer."""
import pytest

from benchmarks.selective_bench import extra_full_steps, with_extra_full, without_selective
from procache_core.schedule import Schedule, StepKind

PAPER_20 = [1, 0, 2, 0, 1, 0, 2, 0, 1, 0, 2, 0, 1, 0, 2, 1, 0, 1, 0, 1]


def cost(kinds, selective_cost, reuse_cost):
    """Full-step units, as a run's statistics would report them."""
    return len(kinds) / Schedule(kinds=tuple(kinds)).theoretical_speedup(selective_cost, reuse_cost)


@pytest.mark.parametrize("selective_cost", [0.05, 0.3, 0.6, 1.0])
@pytest.mark.parametrize("reuse_cost", [0.0, 0.02, 0.1])
def test_matched_schedule_costs_what_the_selective_one_did(selective_cost, reuse_cost):
    steps = len(PAPER_20)
    selective_speedup = steps / cost(PAPER_20, selective_cost, reuse_cost)
    reuse_speedup = steps / cost(without_selective(PAPER_20), 0.0, reuse_cost)
    extra = extra_full_steps(PAPER_20, selective_speedup, reuse_speedup)
    matched = with_extra_full(PAPER_20, extra)
    assert StepKind.SELECTIVE not in matched
    assert matched.count(1) == PAPER_20.count(1) + extra
    # within half a full step of the selective schedule's cost: the nearest whole number of full steps
    gap = cost(matched, 0.0, reuse_cost) - cost(PAPER_20, selective_cost, reuse_cost)
    assert abs(gap) <= 0.5 * (1 - reuse_cost) + 1e-9


def test_extra_full_steps_split_the_longest_reuse_runs():
    kinds = [1, 0, 0, 0, 0, 0, 1, 0, 2, 1]
    assert without_selective(kinds) == [1, 0, 0, 0, 0, 0, 1, 0, 0, 1]
    assert with_extra_full(kinds, 1) == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert with_extra_full(kinds, 2) == [1, 0, 1, 1, 0, 0, 1, 0, 0, 1]
    assert with_extra_full(kinds, 99).count(0) == 0      # never more full steps than reuse steps


def test_free_selective_steps_buy_no_full_step():
    steps = len(PAPER_20)
    reuse_speedup = steps / cost(without_selective(PAPER_20), 0.0, 0.0)
    assert extra_full_steps(PAPER_20, reuse_speedup, reuse_speedup) == 0
