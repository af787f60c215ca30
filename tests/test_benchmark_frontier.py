"""The frontier benchmark: matched FLOPs across rows, exact forecasters where they should be."""

import pytest
import torch

from benchmarks.frontier import METHODS, full_steps, markdown, run_frontier, uniform_steps
from benchmarks.judge import PSNR_CAP
from benchmarks.model_forecasters import ChebyshevRidge
from benchmarks.train_reference import load_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def test_chebyshev_ridge_is_exact_on_a_polynomial_trajectory():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, 5, generator=gen) for _ in range(3))
    fit = ChebyshevRidge(degree=2, ridge=0.0)
    for x in (1.0, 0.6, 0.2, -0.1):
        fit.observe(x, a + b * x + c * x * x)
    # past the last observation, as a skipped step is
    assert torch.allclose(fit.predict(-0.5), a - 0.5 * b + 0.25 * c, atol=1e-5)
    # memory stays the sums: 3 tensors of 15 floats and the 3x3 Gram matrix, however many points
    assert fit.nbytes == 3 * 15 * 4 + 9 * 8


def test_chebyshev_ridge_never_fits_more_degrees_than_points():
    fit = ChebyshevRidge(degree=3, ridge=0.0)
    fit.observe(0.9, torch.full((2,), 4.0))
    assert torch.allclose(fit.predict(-0.7), torch.full((2,), 4.0))     # one point: a constant


def test_uniform_steps_hit_the_budget():
    for steps in (20, 50):
        for target in (2, 3, 4, 5, 6):
            computed = full_steps(steps, target)
            chosen = uniform_steps(steps, computed)
            assert len(chosen) == computed and chosen[0] == 0 and chosen[-1] < steps


def test_quick_frontier_matches_flops_across_rows(tmp_path):
    rows = run_frontier(4, step_counts=(20,), samplers=("euler",), targets=(3, 5), out=str(tmp_path),
                        model=load_reference(), log=lambda *_: None)
    full = [r for r in rows if r.method == "full compute"]
    assert len(full) == 1 and full[0].psnr == PSNR_CAP
    for target in (3, 5):
        at = [r for r in rows if r.target == target]
        assert sorted(r.method for r in at) == sorted(METHODS[1:])
        speedups = [r.flops_speedup for r in at]
        assert max(speedups) <= 1.05 * min(speedups), (target, speedups)
        assert speedups[0] == pytest.approx(20 / full_steps(20, target), rel=0.05)
        assert all(r.psnr < PSNR_CAP for r in at)                     # every shortcut changes the image
    memory = {r.method: r.cache_bytes_per_image for r in rows if r.target == 3}
    # model-level caches hold one to three final-feature tensors; branch level holds one per branch
    assert 0 < memory["FreqCa-style (pack re-impl.)"] < memory["ProCache reuse"]
    assert memory["fewer steps"] == 0
    report = (tmp_path / "frontier.md").read_text()
    assert "Spectrum-style (pack re-impl.)" in report and (tmp_path / "frontier.png").stat().st_size > 0
    assert "| FLOPs speedup | | 2.86× | 5.00× |" in markdown(rows, "x", 4, 1.0, "y")
