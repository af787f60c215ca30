"""The cache plan on the reference DiT: budgets, the ladder, and plan == measured peak."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from procache_core import Schedule, SchedulePolicy, TokenSelector
from procache_core.forecast import Online, Taylor
from procache_core.memory import (GIB, BRANCH_LEVEL, MODEL_LEVEL, Budget, BudgetError, Census, Rung, choose, ladder,
                                  planned_bytes)
from procache_core.reference.dit import DiT, DiTConfig
from procache_core.reference.sampling import sample

pytestmark = pytest.mark.usefixtures("one_thread")

PATTERN = (1, 0, 2, 0, 1, 2, 0, 1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    dit = DiT(DiTConfig()).eval()
    with torch.no_grad():               # non-zero gates: blocks that change their input
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return dit


def test_budget_text_is_read_or_refused_with_what_to_write():
    assert Budget.parse("auto") == Budget("auto")
    assert Budget.parse(" 4 GiB ").limit(None, 1, 1) == 4 * GIB
    assert Budget.parse("512 MiB").limit(None, 1, 1) == 512 << 20
    assert Budget.parse("8 residuals").limit(None, 100, 2) == 1600
    assert Budget.parse("minimal").limit(10 ** 12, 100, 2) == 0
    assert Budget.parse("unlimited").limit(10 ** 12, 100, 2) is None
    assert Budget.parse("auto").limit(1000, 100, 2) == 150
    for bad in ("lots", "-1 GiB", "4 TB", "1e999"):
        with pytest.raises(BudgetError, match="auto, minimal, unlimited|out of range"):
            Budget.parse(bad)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_budget_text_is_a_budget_or_the_packs_own_error(text):
    try:
        budget = Budget.parse(text)
    except BudgetError as e:
        assert repr(text) in str(e)
    else:
        assert budget.kind in ("auto", "unlimited", "minimal", "bytes", "residuals")


def _census(blocks=8, values=2, value=100, carry=60, model=10, stacks=None):
    return Census(streams=2, values={b: {f"v{i}": value for i in range(values)} for b in range(blocks)},
                  extras={b: 5 for b in range(blocks - 2, blocks)}, corrections={}, carry={b: carry for b in range(blocks)},
                  stacks=stacks or [(0, blocks)], model=model, residual=30)


def test_ladder_runs_from_branch_level_to_the_model_level_residual_keeping_shallow_blocks_longest():
    census = _census()
    rungs = ladder(census, deep_blocks=[6, 7])
    assert rungs[0] == BRANCH_LEVEL and rungs[-1] == MODEL_LEVEL
    sizes = [planned_bytes(census, r) for r in rungs]
    assert sizes[0] == 8 * 2 * 100 + 2 * 5 and sizes[-1] == 10
    mixed = [r for r in rungs if r.kind == "mixed"]
    # the blocks kept at branch level are always the first ones, fewer and fewer
    assert mixed and all(r.branch_blocks == frozenset(range(len(r.branch_blocks))) for r in mixed)
    kept = [len(r.branch_blocks) for r in mixed]
    assert kept == sorted(kept, reverse=True) and kept[0] == 6
    deep_first = [r for r in ladder(census, deep_blocks=[6, 7], keep_first="deep") if r.kind == "mixed"]
    assert all({6, 7} <= r.branch_blocks for r in deep_first if len(r.branch_blocks) >= 2)
    assert any(r.branch_blocks == {6, 7} for r in deep_first)
    # every block is cached exactly one way in every rung
    for r in rungs[1:-1]:
        covered = sorted(list(r.branch_blocks) + [b for f, l in r.spans for b in range(f, l + 1)])
        assert covered == list(range(8))


def test_spans_never_cross_block_lists_and_blocks_without_a_residual_keep_branches():
    census = _census(blocks=6, stacks=[(0, 3), (3, 6)])
    census.carry[4] = None          # a block whose outputs do not continue its inputs
    for rung in ladder(census):
        for first, last in rung.spans:
            assert (last < 3) or (first >= 3)
            assert not first <= 4 <= last
        assert rung.model_level or 4 in rung.branch_blocks or not rung.spans


def test_choose_takes_the_finest_rung_that_fits_and_history_multiplies_values():
    census = _census()
    plan = choose(census, None, "cpu")
    assert plan.rung == BRANCH_LEVEL and plan.bytes == 1610
    plan = choose(census, 500, "cpu", deep_blocks=[6, 7])
    assert plan.bytes <= 500
    rungs = ladder(census, [6, 7])
    assert all(planned_bytes(census, r) > 500 for r in rungs[:rungs.index(plan.rung)])
    assert choose(census, None, "cpu", phases=((2, False), (3, False))).bytes == 3 * 1600 + 10
    tight = choose(census, 1, "cpu")
    assert tight.rung == MODEL_LEVEL and "exceeds the budget" in tight.text()


@pytest.mark.parametrize("precision", ["model dtype", "8-bit when needed", "fp8"])
@pytest.mark.parametrize("forecaster", [None, Taylor(1), Taylor(2), Online(2), Taylor(1).with_frequency_split(0.5)])
@pytest.mark.parametrize("budget", ["unlimited", "12 residuals", "6 residuals", "3 residuals", "1 residuals", "minimal"])
def test_plan_equals_the_measured_peak_of_the_cache_store(model, budget, forecaster, precision):
    if precision != "model dtype" and budget not in ("unlimited", "6 residuals", "1 residuals"):
        pytest.skip("8-bit rungs: three budgets are enough")
    selector = TokenSelector(ratio=0.25, score="attention_received", staleness_weight=0.25, spatial_grid=2)
    policy = SchedulePolicy(Schedule(kinds=PATTERN), deep_fraction=0.25)
    _, run = sample(model, torch.tensor([1, 7]), steps=len(PATTERN), policy=policy, selector=selector,
                    forecaster=forecaster, budget=Budget.parse(budget), return_run=True, precision=precision)
    plan = run.stats.plan
    assert plan["bytes"] == run.stats.cache_bytes_peak, plan["text"]
    assert (run.rung.quantize is not None) == ("8-bit" in plan["text"])
    if precision == "fp8":
        assert run.rung.quantize == "fp8"
    if budget.endswith("residuals") and plan["rung"] != "model":
        assert plan["bytes"] <= int(budget.split()[0]) * run.census.residual * run.census.streams
    if plan["rung"] == "branch" or run.rung.branch_blocks & {6, 7}:
        assert sum(run.selected_tokens) > 0      # selective steps work in the deep blocks that keep branches


def test_a_budget_changes_only_what_is_cached_not_an_all_full_run(model):
    labels = torch.tensor([3])
    plain = sample(model, labels, steps=4)
    for budget in ("2 residuals", "minimal"):
        out = sample(model, labels, steps=4, policy=SchedulePolicy(Schedule(kinds=(1, 1, 1, 1))),
                     budget=Budget.parse(budget))
        assert torch.equal(out, plain)


def test_coarsen_walks_down_the_ladder_to_the_model_level_residual(model):
    policy = SchedulePolicy(Schedule(kinds=PATTERN))
    _, run = sample(model, torch.tensor([2]), steps=len(PATTERN), policy=policy, budget=Budget.parse("unlimited"),
                    return_run=True)
    seen = [run.rung]
    while (plan := run.coarsen("test")) is not None and not run.rung.model_level:
        assert plan.rung != seen[-1] and "test" in plan.text()
        seen.append(run.rung)
    assert run.rung == MODEL_LEVEL and run.coarsen("again") is None
    assert seen == ladder(run.census, run.deep_blocks(run.census))[:len(seen)]


def test_rung_descriptions_say_what_is_kept():
    assert BRANCH_LEVEL.describe(40) == "branch level in all 40 blocks"
    mixed = Rung(branch_blocks=frozenset({38, 39}), spans=((0, 1), (2, 3)))
    assert mixed.describe(40) == "branch level in 2 of 40 blocks, 2-block residual spans elsewhere"
    assert MODEL_LEVEL.describe(40) == "one model-level residual"


def test_eight_bit_when_needed_keeps_branch_level_where_full_precision_does_not_fit(model):
    policy = SchedulePolicy(Schedule(kinds=PATTERN), deep_fraction=0.25)
    labels = torch.tensor([4, 5])
    plans = {}
    for precision in ("model dtype", "8-bit when needed"):
        _, run = sample(model, labels, steps=len(PATTERN), policy=policy, budget=Budget.parse("8 residuals"),
                        return_run=True, precision=precision)
        plans[precision] = run.plan
    assert plans["model dtype"].rung.kind != "branch"
    assert plans["8-bit when needed"].rung.kind == "branch" and plans["8-bit when needed"].rung.quantize == "int8"
    assert plans["8-bit when needed"].bytes < plans["model dtype"].bytes * 2


def test_the_console_line_states_the_plan_and_the_peak(model):
    policy = SchedulePolicy(Schedule(kinds=PATTERN))
    _, run = sample(model, torch.tensor([6]), steps=len(PATTERN), policy=policy, budget=Budget.parse("2 residuals"),
                    return_run=True)
    line = run.stats.line()
    assert "cache: " in line and run.plan.rung.describe(8) in line and "peak" in line


def test_with_the_cache_in_host_memory_each_block_copies_the_next_blocks_values_ahead(model, monkeypatch):
    # The GPU path (pinned copies on a side stream) needs CUDA; here the engine's side is checked:
    # while block i reuses, the values block i + 1 reads are handed to CacheStore.prefetch.
    from procache_core import engine
    from procache_core.cache import CacheStore
    asked = []
    monkeypatch.setattr(engine.Run, "prefetches", lambda self, device: True)
    monkeypatch.setattr(CacheStore, "prefetch", lambda self, streams, key, device: asked.append(key) or False)
    for budget, expect in (("unlimited", lambda k: isinstance(k[0], int)), ("2 residuals", lambda k: k[0] == "span")):
        asked.clear()
        _, run = sample(model, torch.tensor([1]), steps=4, policy=SchedulePolicy(Schedule(kinds=(1, 0, 0, 1))),
                        budget=Budget.parse(budget), return_run=True)
        assert asked and all(expect(k) for k in asked), budget
        blocks = {k[0] if isinstance(k[0], int) else k[1] for k in asked}
        assert 0 not in blocks and blocks <= set(range(1, 8))       # never the block already running
        assert len(asked) == len(set(asked)) * 2                    # once per key and reuse step
