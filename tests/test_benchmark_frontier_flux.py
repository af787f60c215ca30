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
