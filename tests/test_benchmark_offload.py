"""benchmarks/offload_gpu.py: it measures on a GPU only; here its steps run at tiny sizes on the CPU."""
import pytest
import torch

from benchmarks import offload_gpu
from procache_core import CacheStore


@pytest.fixture(scope="module")
def smoke():
    return {r["model"]: r for r in offload_gpu.main(["--cpu-smoke", "--repeats", "1", "--blocks", "2"])}


def test_every_variant_gives_the_gpu_caches_cached_step(smoke):
    assert len(smoke) == len(offload_gpu.SHAPES)
    for result in smoke.values():
        assert offload_gpu.check(result) == []
        assert result["errors"]["CPU"] == 0.0 and result["errors"]["CPU + prefetch"] == 0.0
        assert 0.0 < result["errors"]["CPU int8 + prefetch"] < offload_gpu.INT8_BOUND
        assert set(result["ms"]) == {"full step", *offload_gpu.VARIANTS} and min(result["ms"].values()) > 0


def test_the_caches_hold_every_branch_of_every_block(smoke):
    shape = offload_gpu.SMOKE["flux-double"]
    per_block = 2 * CacheStore.entry_nbytes((1, shape.tokens, shape.hidden), torch.bfloat16) \
        + 2 * CacheStore.entry_nbytes((1, shape.text, shape.hidden), torch.bfloat16)
    result = smoke[shape.name]
    assert result["cache_gib"] * 2 ** 30 == 2 * per_block
    assert result["int8_cache_gib"] < 0.6 * result["cache_gib"]


def test_check_flags_a_variant_that_differs():
    result = {"model": "m", "errors": {"GPU cache": 0.0, "CPU + prefetch": 1e-3, "CPU": 0.0, "CPU int8 + prefetch": 0.2},
              "pinned_gib": 4.0, "pinned_after_clear_gib": 2.0}
    problems = offload_gpu.check(result)
    assert len(problems) == 3 and "CPU + prefetch" in problems[0] and "pinned" in problems[2]


def test_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--cpu-smoke"):
        offload_gpu.main(["--models", "wan-14b"])
    with pytest.raises(SystemExit):
        offload_gpu.main(["--models", "sdxl", "--cpu-smoke"])
