"""The rung check: the run's granularity measured against one model-level residual on the run itself."""
import pytest
import torch

from benchmarks.judge import psnr
from benchmarks.reference_bench import CFG_SCALE, PROCACHE_SELECTOR, SCHEDULES, load_schedule
from benchmarks.train_reference import load_reference
from procache_core import SchedulePolicy
from procache_core.forecast import Taylor
from procache_core.memory import Budget
from procache_core.reference.sampling import sample
from procache_core.rung_check import MARGIN, RungCheck

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference():
    return load_reference()


def _run(model, budget, forecaster=None, check=False, steps=50, labels=None):
    labels = torch.arange(8) if labels is None else labels
    policy = SchedulePolicy(load_schedule(SCHEDULES[50]), deep_fraction=0.25)
    return sample(model, labels, steps, CFG_SCALE, 0, policy=policy, selector=PROCACHE_SELECTOR, return_run=True,
                  budget=Budget.parse(budget), forecaster=forecaster, rung_check=check)


def test_check_decides_by_decayed_errors_with_a_margin():
    x = torch.zeros(1, 2, 4, 4)
    check = RungCheck(steps=2)
    out = torch.ones(1, 2, 4, 4)
    check.record(("c",), 0, 1.0, x, out, None)          # nothing stored yet: nothing scored
    assert not check.scored and check.has_previous(("c",))
    # the model-level guess is x + the last residual (all ones): exact at step 1
    check.record(("c",), 1, 0.8, x, out, out * 1.1)
    assert check.scored == [1] and check.rung_error == pytest.approx(0.1) and check.model_error == 0.0
    assert not check.switches_before(2)                 # one scored step is not enough
    check.record(("c",), 2, 0.6, x, out * 1.2, out * 1.2)   # the rung exact, the model level 1/6 off
    assert check.rung_error == pytest.approx(0.05) and check.model_error == pytest.approx(1 / 6, rel=1e-5)
    assert not check.model_level_wins() and not check.switches_before(3)
    check.record(("c",), 3, 0.4, x, out * 1.2, out * 2.0)   # the rung far off, the model level exact
    assert check.rung_error == pytest.approx(0.025 + 2 / 3, rel=1e-5)
    assert check.model_level_wins() and check.model_error < MARGIN * check.rung_error
    assert not check.switches_before(3) and check.switches_before(4)   # after the step's last stream
    assert "model-level residual landed clearly closer" in check.text("spans")


def test_when_the_rung_stays_the_check_changes_nothing(reference):
    plain, run = _run(reference, "unlimited")
    checked, checked_run = _run(reference, "unlimited", check=True)
    assert torch.equal(plain, checked)          # the cached pass has no side effect on the run
    assert checked_run.stats.flops_speedup == run.stats.flops_speedup
    note = next(n for n in checked_run.stats.notes if n.startswith("rung check"))
    assert "branch level in all 8 blocks stays" in note and "over 16 full steps" in note
    assert not checked_run.rung.model_level


def test_a_clearly_closer_model_level_residual_takes_over_and_lands_closer(reference):
    # one 8-block span with Taylor 1 on the reference DiT: the model-level residual is about 5x closer
    full, _ = sample(reference, torch.arange(8), 50, CFG_SCALE, 0), None
    spans, run = _run(reference, "2 residuals", Taylor(1))
    checked, checked_run = _run(reference, "2 residuals", Taylor(1), check=True)
    assert not run.rung.model_level and checked_run.rung.model_level
    assert checked_run.stats.plan["rung"] == "model"
    assert any("model-level residual landed clearly closer" in n for n in checked_run.stats.notes)
    assert checked_run.cache.nbytes == 0        # freed at the end, like every run's cache
    # the work after the switch is counted in the same units (selective steps now only reuse)
    assert run.stats.flops_speedup <= checked_run.stats.flops_speedup < run.stats.flops_speedup * 1.1
    assert psnr(checked, full).mean() > psnr(spans, full).mean() + 1.0
