"""Frequency-aware reuse: a cached step forecasts only the low spatial frequencies of a unit and
reuses its high frequencies as they were at the last full step.

The observation is FreqCa's (arXiv 2510.08669): over the image token grid, the low frequencies of a
cached feature drift smoothly from step to step and extrapolate well, while the high ones change
erratically, so extrapolating them adds more error than it removes. With F the forecaster's plain
forecast and h the unit's latest full value, the split forecast is

    low(F) + (h - low(h)) = h + low(F - h)

`low` being linear. Nothing is stored for it: the high part of h is recovered from the latest value
the forecaster keeps anyway, at reuse time, so the cache (and its plan) are those of the forecaster.

`low` is a 2-D low-pass over each frame's token grid: an FFT, keeping the frequencies up to
cutoff x Nyquist on both axes. The grid comes from the latent the model is called with
([B, C, H, W], video [B, C, T, H, W]) and the model's patch size (`token_grid`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

# The spatial patch sizes of ComfyUI's DiT families (2 for Flux, SD3, PixArt, Wan, Qwen, ...; LTXV 1);
# a model that names its own `patch_size` is matched on that alone.
PATCH_SIZES = (1, 2)


@dataclasses.dataclass(frozen=True)
class TokenGrid:
    """Where a value's tokens lie: `frames` x `height` x `width` grid positions.

    channels_first: the value is laid out like the latent, [B, C, (T,) H, W] (the model-level
    residual); otherwise its tokens are rows, [B, N, C] with N = frames * height * width in
    frame-major, row-major order (as every family's patchify flattens them), or Cosmos'
    [B, T, H, W, C].
    """

    frames: int
    height: int
    width: int
    channels_first: bool = False


def patch_sizes(model) -> tuple[int, ...]:
    """The spatial patch sizes the model's image tokens may have (its own `patch_size` where it names one)."""
    patch = getattr(model, "patch_size", None)
    if isinstance(patch, (tuple, list)) and patch:
        patch = patch[-1]           # Wan, Mochi: (frames, height, width)
    if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0:
        return (patch,)
    return PATCH_SIZES


def token_grid(shape: Sequence[int], latent_dims: Sequence[int],
               patches: Sequence[int] = PATCH_SIZES) -> TokenGrid | None:
    """The grid of a value of `shape` in a model call on a latent of spatial dims `latent_dims`
    ((H, W) or (T, H, W)); None where its tokens are not exactly the image's: text tokens, joint
    text + image sequences, reference latents appended to the image tokens."""
    if len(latent_dims) < 2:
        return None
    frames, (height, width) = math.prod(latent_dims[:-2]), latent_dims[-2:]
    if len(shape) >= 4 and tuple(shape[2:]) == tuple(latent_dims):
        return TokenGrid(frames, height, width, channels_first=True)
    if len(shape) < 3:
        return None
    tokens = math.prod(shape[1:-1])
    for patch in patches:
        # ComfyUI's patchify pads the latent up to a multiple of the patch
        rows, columns = -(-height // patch), -(-width // patch)
        if frames * rows * columns == tokens:
            return TokenGrid(frames, rows, columns)
    return None


def low_pass(value: torch.Tensor, grid: TokenGrid, cutoff: float) -> torch.Tensor:
    """The part of `value` whose spatial frequencies over each frame's grid are at most
    cutoff x Nyquist on both axes (0: each frame's mean per channel; 1: everything)."""
    if grid.channels_first:
        planes, dims = value.float(), (-2, -1)
    else:
        planes, dims = value.reshape(value.shape[0], grid.frames, grid.height, grid.width, -1).float(), (2, 3)
    # float32: torch's FFT takes no bfloat16, and half precision on CUDA only at power-of-two sizes
    spectrum = torch.fft.rfft2(planes, dim=dims)
    limit = cutoff * 0.5 + 1e-9         # cycles per token; Nyquist is 0.5
    keep_rows = torch.fft.fftfreq(grid.height, device=value.device).abs() <= limit
    keep_columns = torch.fft.rfftfreq(grid.width, device=value.device) <= limit
    mask = keep_rows[:, None] & keep_columns[None, :]
    if not grid.channels_first:
        mask = mask[..., None]
    low = torch.fft.irfft2(spectrum * mask, s=(grid.height, grid.width), dim=dims)
    return low.reshape(value.shape).to(value.dtype)


def split_forecast(forecast: torch.Tensor, latest: torch.Tensor, grid: TokenGrid, cutoff: float) -> torch.Tensor:
    """The low frequencies of `forecast` with the high frequencies of `latest`: latest + low(forecast - latest)."""
    latest = latest.to(forecast.device)
    return latest + low_pass(forecast - latest, grid, cutoff)
