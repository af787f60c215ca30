"""Frequency-aware reuse: low spatial frequencies forecast, high ones reused (procache_core/frequency.py)."""
import math

import pytest
import torch

from procache_core.cache import CacheStore
from procache_core.forecast import ForecastError, ForecastState, Online, Taylor, combine
from procache_core.frequency import TokenGrid, low_pass, patch_sizes, token_grid
from procache_core.memory import Budget
from test_core_forecast import _model, _run

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 4
LATENT = torch.zeros(2, 1, 2 * SIDE, 2 * SIDE)       # [B, C, H, W] at patch 2: a 4 x 4 token grid
ROWS, COLUMNS = torch.meshgrid(torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
SMOOTH = torch.cos(2 * math.pi * COLUMNS / SIDE).reshape(1, -1, 1)      # one cycle across: half of Nyquist
CHECKER = ((-1.0) ** (ROWS + COLUMNS)).reshape(1, -1, 1)                # Nyquist on both axes
SIGMAS = [1.0, 0.8, 0.6, 0.4, 0.2]


def test_low_pass_keeps_the_smooth_part_and_drops_the_checkerboard():
    grid = TokenGrid(1, SIDE, SIDE)
    value = SMOOTH + CHECKER
    torch.testing.assert_close(low_pass(value, grid, 0.5), SMOOTH, rtol=0, atol=1e-5)
    torch.testing.assert_close(low_pass(value, grid, 1.0), value, rtol=0, atol=1e-5)
    torch.testing.assert_close(low_pass(value, grid, 0.0), torch.zeros_like(value), rtol=0, atol=1e-5)  # mean 0
    # channels first, several frames: each frame's plane on its own
    planes = torch.stack([(SMOOTH + CHECKER).reshape(SIDE, SIDE), 3 * CHECKER.reshape(SIDE, SIDE)])[None, None]
    low = low_pass(planes, TokenGrid(2, SIDE, SIDE, channels_first=True), 0.5)
    torch.testing.assert_close(low[0, 0, 0], SMOOTH.reshape(SIDE, SIDE), rtol=0, atol=1e-5)
    torch.testing.assert_close(low[0, 0, 1], torch.zeros(SIDE, SIDE), rtol=0, atol=1e-5)
    assert low_pass(value.half(), grid, 0.5).dtype == torch.float16


def test_token_grid_comes_from_the_latent_and_refuses_other_token_counts():
    assert token_grid((2, 16, 8), (8, 8)) == TokenGrid(1, 4, 4)                 # image tokens, patch 2
    assert token_grid((2, 12, 8), (7, 5)) == TokenGrid(1, 4, 3)                 # patchify pads odd sizes
    assert token_grid((2, 3 * 16, 8), (3, 8, 8)) == TokenGrid(3, 4, 4)          # video frames
    assert token_grid((2, 3, 4, 4, 8), (3, 8, 8)) == TokenGrid(3, 4, 4)         # Cosmos' [B, T, H, W, C]
    assert token_grid((2, 4, 8, 8), (8, 8)) == TokenGrid(1, 8, 8, channels_first=True)  # model-level residual
    assert token_grid((2, 16 + 7, 8), (8, 8)) is None                           # joint text + image
    assert token_grid((2, 7, 8), (8, 8)) is None                                # text tokens
    assert token_grid((2, 16, 8), (8, 8), patches=(4,)) is None                 # not this model's patch

    class Wan(torch.nn.Module):
        patch_size = (1, 2, 2)
    assert patch_sizes(Wan()) == (2,) and patch_sizes(torch.nn.Identity()) == (1, 2)


def _store_and_forecast(forecaster, values, target_step=4, key=(0, "mlp")):
    state, cache, streams = ForecastState(forecaster.with_safeguards(False, True), SIGMAS), CacheStore(), ("c",)
    state.note_model_input(torch.nn.Identity(), LATENT[:1])
    for step, value in values.items():
        state.store(cache, streams, key, step, SIGMAS[step], value)
    split = state.value(cache, streams, key, target_step, "mlp", SIGMAS[target_step])
    plain = combine(cache, streams, key, state.plan(key, target_step, "mlp", SIGMAS[target_step]))
    return split, plain, state


@pytest.mark.parametrize("base", [Taylor(1), Taylor(2), Online(2)])
def test_low_frequency_content_is_forecast_as_the_base_forecaster_does(base):
    gen = torch.Generator().manual_seed(0)
    values = {step: SMOOTH * torch.randn(1, 1, 3, generator=gen) + torch.randn(1, 1, 3, generator=gen)
              for step in (0, 1, 3)}
    split, plain, _ = _store_and_forecast(base.with_frequency_split(0.5), values)
    torch.testing.assert_close(split, plain, rtol=0, atol=1e-5)
    assert (plain - values[3]).abs().max() > 0.1        # the base forecaster did move it


@pytest.mark.parametrize("base", [Taylor(1), Online(2)])
def test_high_frequency_content_is_reused_as_it_is(base):
    values = {step: CHECKER * (1.0 + step) for step in (0, 1, 3)}       # a trend the base would follow
    split, plain, _ = _store_and_forecast(base.with_frequency_split(0.5), values)
    torch.testing.assert_close(split, values[3], rtol=0, atol=1e-5)
    assert (plain - values[3]).abs().max() > 0.5


def test_a_linear_low_frequency_trend_with_high_frequency_noise_is_reproduced_exactly():
    gen = torch.Generator().manual_seed(1)
    noise = CHECKER * torch.randn(1, 1, 3, generator=gen)

    def low(step):
        return SMOOTH * (2.0 - 3.0 * SIGMAS[step]) + 0.5 * SIGMAS[step]
    # constant noise: Taylor 1 alone is exact too, and the split keeps it so
    split, _, _ = _store_and_forecast(Taylor(1).with_frequency_split(0.5), {s: low(s) + noise for s in (0, 1, 3)})
    torch.testing.assert_close(split, low(4) + noise, rtol=0, atol=1e-5)
    # noise that jumped between the full steps (and stays at its latest value): only the split is exact
    jumped = {0: low(0) - noise, 1: low(1) + 2 * noise, 3: low(3) + noise}
    split, plain, _ = _store_and_forecast(Taylor(1).with_frequency_split(0.5), jumped)
    torch.testing.assert_close(split, low(4) + noise, rtol=0, atol=1e-5)
    assert (plain - (low(4) + noise)).abs().max() > 0.1


def test_units_without_an_image_grid_are_forecast_whole_and_the_report_says_so():
    text = {step: torch.full((1, 7, 3), 1.0 + step) for step in (0, 1, 3)}          # 7 text tokens
    split, plain, state = _store_and_forecast(Taylor(1).with_frequency_split(0.5), text, key=(0, "txt_mlp"))
    torch.testing.assert_close(split, plain, rtol=0, atol=0)
    assert "frequency split: 1 units have no image token grid" in state.report()[0]


def test_cutoff_settings():
    assert Taylor(1).with_frequency_split(1.0).frequency_cutoff is None          # 1: no split
    assert Taylor(1).with_frequency_split(0.25).label() == "Taylor order 1, frequencies up to 0.25 x Nyquist " \
                                                           "(the rest reused)"
    assert Taylor(1).frequency_cutoff is None      # the built-in forecaster is left as it was
    for bad in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ForecastError, match="frequency cutoff must be a number from 0 to 1"):
            Taylor(1).with_frequency_split(bad)


# ---- in the engine, on the reference DiT ------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return _model()


def test_the_split_changes_a_forecasting_run_and_cutoff_one_is_plain_taylor(model):
    pattern = "1101000100"
    taylor, _ = _run(model, pattern, forecaster=Taylor(1))
    split, run = _run(model, pattern, forecaster=Taylor(1).with_frequency_split(0.5))
    unsplit, _ = _run(model, pattern, forecaster=Taylor(1).with_frequency_split(1.0))
    reuse, _ = _run(model, pattern)
    assert torch.equal(unsplit, taylor)
    assert (split - taylor).abs().max() > 1e-4 and (split - reuse).abs().max() > 1e-4
    assert run.forecast.latent_dims == (16, 16) and run.forecast.unsplit == set()   # every unit split
    assert not model._forward_pre_hooks                                           # nothing left behind


@pytest.mark.parametrize("budget", ["unlimited", "6 residuals", "minimal"])
def test_plan_equals_peak_with_the_split_at_every_granularity(model, budget):
    forecaster = Taylor(1).with_frequency_split(0.5)
    _, run = _run(model, "1101000100", forecaster=forecaster, budget=Budget.parse(budget))
    _, plain = _run(model, "1101000100", forecaster=Taylor(1), budget=Budget.parse(budget))
    assert run.stats.plan["bytes"] == run.stats.cache_bytes_peak == plain.stats.cache_bytes_peak
    assert run.forecast.unsplit == set()        # branches, span residuals and the model-level residual
