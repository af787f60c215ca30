"""The reference benchmark: judge metrics, the trained reference DiT, the dynamic peer rules, the bench."""
import math
import re

import pytest
import torch

from benchmarks.baselines import DynamicCache, LazyCacheDDIM
from benchmarks.digits import load_digits_tensors, split
from benchmarks.judge import PSNR_CAP, frechet_distance, load_judge, psnr
from benchmarks.reference_bench import checks, run_benchmark
from benchmarks.train_reference import CONFIG, load_reference, train
from procache_core.reference.sampling import sample

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def judge():
    return load_judge()


@pytest.fixture(scope="module")
def model():
    return load_reference()


def test_frechet_distance_of_gaussians():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=gen)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # a shift by s adds |s|^2; a scale by k on every axis adds D (k - 1)^2
    assert frechet_distance(a, a + torch.tensor([1.0, 2.0, 0.0])) == pytest.approx(5.0, rel=1e-6)
    assert frechet_distance(a, 2 * a) == pytest.approx(3.0, rel=0.1)


def test_psnr():
    x = torch.zeros(2, 1, 4, 4)
    y = x.clone()
    y[1] += 0.2                       # MSE 0.04 on a peak-to-peak range of 2: 10 log10(4 / 0.04) = 20 dB
    out = psnr(y, x)
    assert out[0] == PSNR_CAP and out[1] == pytest.approx(20.0, rel=1e-5)


def test_judge_on_real_digits(judge):
    images, labels = load_digits_tensors()
    _, held = split(len(labels))
    assert judge.accuracy(images[held], labels[held]) > 0.95
    noise = torch.rand(len(held), 1, 16, 16) * 2 - 1
    assert judge.fd(images[held]) * 5 < judge.fd(noise)
    scores = judge.evaluate(images[held], labels[held], reference=images[held])
    assert scores["psnr"] == PSNR_CAP and set(scores) == {"accuracy", "fd", "psnr"}


def test_reference_model_draws_the_asked_digits(model, judge):
    assert model.cfg == CONFIG
    labels = torch.arange(30) % 10
    images = sample(model, labels, steps=10, cfg=1.5, seed=3)
    assert judge.accuracy(images, labels) >= 0.8


def test_training_is_seeded():
    a = train(seed=5, iters=3, batch=8, out=None, log_every=0)
    b = train(seed=5, iters=3, batch=8, out=None, log_every=0)
    c = train(seed=6, iters=3, batch=8, out=None, log_every=0)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("rule", ["teacache", "first_block", "easycache"])
def test_dynamic_rules(model, rule):
    labels = torch.arange(4) % 10
    full = sample(model, labels, steps=10, seed=1)
    never = DynamicCache(model, rule, threshold=0.0, steps=10)
    assert torch.allclose(sample(never, labels, steps=10, seed=1), full, atol=1e-5)
    assert never.stats.flops_speedup == pytest.approx(1.0)
    often = DynamicCache(model, rule, threshold=1e3, steps=10)
    cached = sample(often, labels, steps=10, seed=1)
    assert often.stats.flops_speedup > 2.0 and not torch.allclose(cached, full)
    assert torch.isfinite(cached).all()


def test_quick_bench_writes_the_table(tmp_path, model):
    console = []
    rows = run_benchmark(samples=10, step_counts=(10,), out=str(tmp_path), log=console.append,
                         calibration_samples=10)
    methods = [r.method for r in rows]
    for expected in ("full compute", "fewer steps (equal FLOPs)", "FORA N=2", "FORA N=3", "FORA N=4",
                     "TeaCache-style", "First-Block-Cache-style", "EasyCache-style", "ProCache schedule alone",
                     "ProCache schedule + selective"):
        assert expected in methods
    assert any(m.startswith("ToCa-style") for m in methods)
    full = rows[0]
    assert full.flops_speedup == 1.0 and math.isnan(full.psnr) and full.wall_speedup == 1.0
    by = {r.method: r for r in rows}
    assert by["FORA N=2"].flops_speedup == pytest.approx(2.0, rel=0.02)
    assert by["ProCache schedule + selective"].flops_speedup <= by["ProCache schedule alone"].flops_speedup
    assert all(math.isfinite(r.fd) and r.psnr < PSNR_CAP for r in rows[1:])
    assert checks(rows) == []          # the targets are judged at 50 steps only
    table = (tmp_path / "reference_bench.md").read_text()
    assert "| FORA N=3 |" in table and (tmp_path / "reference_bench.png").stat().st_size > 1000
    # The console and the markdown give every row the same FLOPs speedup (fewer steps: 10 / its steps).
    fewer = by["fewer steps (equal FLOPs)"]
    assert fewer.flops_speedup == pytest.approx(10 / int(fewer.setting.removeprefix("DDIM ")))
    printed = {m: float(re.search(r"flops +([\d.]+)x", line)[1]) for line in console for m in methods
               if re.match(rf"\s*10 steps  {re.escape(m)} ", line)}
    written = {m: float(re.search(rf"^\| {re.escape(m)} \|[^|]*\| ([\d.]+)×", table, re.M)[1]) for m in methods}
    assert printed == written == {r.method: round(r.flops_speedup, 2) for r in rows}


def test_the_search_scores_candidates_with_the_forecaster_they_will_run_with(model):
    from benchmarks.search_reference import run_search
    from procache_core.forecast import Taylor
    from procache_core.search import SearchConstraints
    constraints = SearchConstraints(12, 3, 0, 6)
    labels = torch.arange(4) % 10
    plain = run_search(model, constraints, labels, count=3, pool=0, log=lambda _: None)
    taylor = run_search(model, constraints, labels, count=3, pool=0, forecaster=Taylor(1), log=lambda _: None)
    # the same candidates are drawn; Taylor 1 changes what each of them scores
    assert [c.pattern for c in plain.candidates] == [c.pattern for c in taylor.candidates]
    assert all(p.error != t.error for p, t in zip(plain.candidates, taylor.candidates))


def test_lazycache_on_ddim_computes_every_call_at_threshold_zero_and_skips_inside_its_window(model):
    labels = torch.arange(4)
    plain = sample(model, labels, 20, 1.5, 0)
    never = LazyCacheDDIM(model, 0.0)
    assert torch.allclose(sample(never, labels, 20, 1.5, 0), plain, atol=1e-5)
    assert never.stats.flops_speedup == 1.0
    lazy = LazyCacheDDIM(model, 5.0)
    images = sample(lazy, labels, 20, 1.5, 0)
    skipped = lazy.stats.calls - lazy.stats.computed_calls
    # the window (15 % to 95 %) keeps the first steps and the last one computing
    assert 0 < skipped < 20 - 3 and lazy.stats.flops_speedup > 1.5
    assert torch.isfinite(images).all() and not torch.allclose(images, plain, atol=1e-3)
