"""The reference Flux frontier (benchmarks/frontier_flux.py): every row of a column computes the same
block work, and model-level rows hold less cache than branch-level ones."""
import json

import pytest

import comfy_env

pytestmark = [pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH"),
              pytest.mark.usefixtures("one_thread")]


def test_tiny_flux_frontier_matches_flops_across_rows(tmp_path):
    from benchmarks.frontier import full_steps
    from benchmarks.frontier_flux import FAST_ROW, METHODS, main
    from benchmarks.judge import PSNR_CAP

    rows_file = tmp_path / "frontier_flux.json"
    main(["--samples", "2", "--steps", "10", "--samplers", "euler", "--targets", "2", "5", "--rows", str(rows_file)])
    rows = json.loads(rows_file.read_text())["rows"]
    assert [r["method"] for r in rows if r["target"] == 1] == ["full compute"]
    for target in (2, 5):
        at = [r for r in rows if r["target"] == target]
        # no fast schedule is shipped for 10 steps
        assert sorted(r["method"] for r in at) == sorted(m for m in METHODS if m != FAST_ROW)
        speedups = [r["flops_speedup"] for r in at]
        assert max(speedups) <= 1.05 * min(speedups), (target, speedups)
        assert min(speedups) == pytest.approx(10 / full_steps(10, target), rel=0.05)
        assert all(r["psnr"] < PSNR_CAP for r in at)       # every shortcut changes the image
    memory = {r["method"]: r["cache_bytes_per_image"] for r in rows if r["target"] == 2}
    assert 0 < memory["ProCache model-level residual + Taylor 1"] < memory["ProCache Taylor 1"]
    assert "| ProCache Taylor 1 |" in (tmp_path / "frontier_flux.md").read_text()
    assert (tmp_path / "frontier_flux.png").stat().st_size > 0
    # the calibration row says what it chose, and ran it: its figures are one of the two it chose from
    for target in (2, 5):
        at = {r["method"]: r for r in rows if r["target"] == target}
        chosen = at["ProCache Taylor 1, granularity chosen on calibration images"]
        source = at["ProCache model-level residual + Taylor 1" if chosen["setting"].startswith("model level")
                    else "ProCache Taylor 1"]
        assert chosen["setting"].startswith(("model level (calibration", "branch level (calibration"))
        assert chosen["psnr"] == pytest.approx(source["psnr"]) and chosen["fd"] == pytest.approx(source["fd"])
        # the searched row ran a pattern of the column's budget, and says which and at what granularity
        searched = at["ProCache Schedule Search + Taylor 1 (calibration images)"]
        pattern, origin = searched["setting"].split(" (")[0], searched["setting"].split(" (")[1].split(";")[0]
        assert len(pattern) == 10 and pattern[0] == "1" and pattern.count("1") == full_steps(10, target)
        assert origin in ("drawn", "even intervals", "library generic")
        if origin == "library generic":      # the same run as the generic rows beside it
            source = at["ProCache model-level residual + Taylor 1" if "; model level" in searched["setting"]
                        else "ProCache Taylor 1"]
            assert searched["psnr"] == pytest.approx(source["psnr"])


@pytest.mark.parametrize("state", ["spectrum", "freqca"])
def test_model_level_peer_forecasts_skip_the_stack_on_a_clone_and_are_exact_when_every_step_computes(state):
    """The Spectrum-style and FreqCa-style rows on ComfyUI's Flux class: with every step computed they
    are full compute, bit for bit; otherwise the blocks run on the computed steps only, the forecast
    changes the result, and the base model carries no patch afterwards."""
    comfy_env.load_pack()
    import comfy.samplers
    import torch
    from benchmarks.comfy_bench import BlockCounter
    from benchmarks.comfy_model_forecasters import FluxStackForecast, FreqCaState, SpectrumState
    make_state = {"spectrum": SpectrumState, "freqca": FreqCaState}[state]
    steps = 8
    base = comfy_env.make_patcher("flux")
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "simple", steps).tolist()
    full = comfy_env.sample(base, "flux", steps=steps, cfg=2.0)

    every = FluxStackForecast(make_state, range(steps), sigmas)
    assert torch.equal(comfy_env.sample(every.patch(base), "flux", steps=steps, cfg=2.0), full)

    some = FluxStackForecast(make_state, [0, 2, 5], sigmas)
    counter = BlockCounter(base)
    try:
        forecast = comfy_env.sample(some.patch(base), "flux", steps=steps, cfg=2.0)
    finally:
        counter.remove()
    dm = base.model.diffusion_model
    blocks = len(dm.double_blocks) + len(dm.single_blocks)
    assert counter.calls % blocks == 0 and counter.calls // blocks in (3, 6)    # 3 steps: one call, or one per CFG half
    assert torch.isfinite(forecast).all() and not torch.equal(forecast, full)
    assert some.cache_bytes > 0
    assert "patches_replace" not in base.model_options.get("transformer_options", {})
