"""benchmarks/memory.py plans real-size models from a census on meta weights and meta inputs; here,
on tiny models of the same families built by the same code, that census equals the one taken with
real CPU weights and inputs (and ComfyUI's own CPU attention), and its bytes follow the token count."""
import dataclasses
import os
import sys

import pytest
import torch

import comfy_env

pytestmark = [pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH"),
              pytest.mark.usefixtures("one_thread")]

sys.path.insert(0, os.path.join(comfy_env.PACK_ROOT, "benchmarks"))


@pytest.fixture(scope="module")
def bench():
    comfy_env.load_comfy()
    import memory as bench_memory   # benchmarks/memory.py
    return bench_memory


def _tiny(bench, name):
    """(Model with a tiny configuration of `name`'s family, latent size in pixels)."""
    import comfy_families
    version = comfy_env.load_comfy()
    if name in ("FLUX.1-dev", "PixArt-Sigma XL", "Wan 2.1 14B"):
        family = {"FLUX.1-dev": "flux", "PixArt-Sigma XL": "pixart", "Wan 2.1 14B": "wan"}[name]
        _, cfg = comfy_env.tiny_config(family)
        text = {"flux": 6, "pixart": 8, "wan": 5}[family]
        size = {"flux": (128, 128), "pixart": (384, 384), "wan": (64, 64, 9)}[family]
    else:
        family = comfy_families.SD3 if name == "SD3.5 Large" else comfy_families.QWEN
        _, cfg = family.config(version)
        text, size = 6, (128, 128)
    return dataclasses.replace(bench.MODELS[name], unet_config=cfg, text=text), size


def _cpu_tensor(gen):
    return lambda shape, dtype=torch.bfloat16: torch.randn(shape, generator=gen).to(dtype)


def _census_on(bench, model, size, device):
    schedule = bench.library("procache-dit-50-17full", 10)
    diffusion_model = model.build(device)
    if device == "meta":
        with bench.pytorch_attention(), torch.no_grad():
            return bench.take_census(model, diffusion_model, size, schedule)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return bench.take_census(model, diffusion_model, size, schedule, make=_cpu_tensor(gen))


@pytest.mark.parametrize("name", ["FLUX.1-dev", "PixArt-Sigma XL", "Wan 2.1 14B", "SD3.5 Large", "Qwen-Image"])
def test_meta_census_equals_cpu_census(bench, name):
    model, size = _tiny(bench, name)
    meta = _census_on(bench, model, size, "meta")
    cpu = _census_on(bench, model, size, "cpu")
    assert meta.values and meta.model > 0 and meta.residual > 0
    assert any(v is not None for v in meta.carry.values())
    assert dataclasses.asdict(meta) == dataclasses.asdict(cpu)


@pytest.mark.parametrize("name", ["FLUX.1-dev", "Wan 2.1 14B"])
def test_census_bytes_follow_the_image_tokens(bench, name):
    """Image-token branches scale with the latent area: the arithmetic behind the real-size figures."""
    model, size = _tiny(bench, name)
    bigger = (size[0] * 2, size[1] * 2) + size[2:]
    small, large = (_census_on(bench, model, s, "meta") for s in (size, bigger))
    branch = "img_attn" if name.startswith("FLUX") else next(iter(small.values[0]))
    assert large.values[0][branch] == 4 * small.values[0][branch]
    assert large.residual == 4 * small.residual and large.model == 4 * small.model


def test_flux_keeps_attention_outputs_only_where_selective_steps_recompute(bench):
    """The single blocks' kept attention output (read back by selective steps only) is a
    hidden-wide copy, stored in the deep blocks and only when the schedule has selective steps."""
    from procache_core import TokenSelector, parse_pattern
    model, size = _tiny(bench, "FLUX.1-dev")
    diffusion_model = model.build("meta")
    hidden, text = model.unet_config["hidden_size"], model.text
    tokens = (size[0] // 16) * (size[1] // 16) + text            # single blocks run image and text jointly
    first_single = model.unet_config["depth"]
    with bench.pytorch_attention(), torch.no_grad():
        plain = bench.take_census(model, diffusion_model, size, parse_pattern("1,0,1,0,1,1"))
        selective = bench.take_census(model, diffusion_model, size, parse_pattern("1,0,2,0,1,2"))
    assert not plain.extras
    last = plain.num_blocks - 1
    assert last in selective.extras and first_single not in selective.extras
    assert selective.values[last]["fused"] == tokens * hidden * 2      # bf16
    staleness = tokens * 4 if TokenSelector().tracks_staleness else 0
    reference = tokens * hidden * 2 if TokenSelector().needs_reference else 0
    assert selective.extras[last] == tokens * hidden * 2 + staleness + reference


def test_ladder_without_deep_blocks_goes_from_finest_to_coarsest(bench):
    """A schedule without selective steps has no deep blocks: rungs that keep blocks at branch
    level come before the spans that keep none, most blocks first."""
    model, size = _tiny(bench, "FLUX.1-dev")
    diffusion_model = model.build("meta")
    with bench.pytorch_attention(), torch.no_grad():
        census = bench.take_census(model, diffusion_model, size, bench.library("procache-dit-50-17full", 10))
    from procache_core import memory
    kept = [len(r.branch_blocks) for r in memory.ladder(census, [])[1:-1]]
    assert kept == sorted(kept, reverse=True) and kept[0] >= 1 and kept[-1] == 0
