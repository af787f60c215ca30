"""Euler, DPM-Solver++(2M) and DPM-Solver++ SDE with k-diffusion's calling convention, for benchmarks without ComfyUI.

`sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None)` as in
`comfy.k_diffusion.sampling`, so `benchmarks.forecast_sampler_bench.sample` runs either set:
`model(x, sigma)` returns the denoised image, `x` starts at noise of level `sigmas[0]`, and the
callback gets `{"i": step}` after each step. Written from the published update rules (Karras et
al. 2022 for Euler, Lu et al. 2022 for DPM-Solver++(2M) and its stochastic variant). The ODE
samplers are deterministic with one model call per step; the SDE sampler makes two calls per step
and draws its noise from a Brownian path seeded by `extra_args["seed"]` (torchsde, which ComfyUI
also requires), so runs with the same seed and steps get the same noise, cached or not.
"""
from __future__ import annotations

import math

import torch


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, x.new_full((x.shape[0],), sigma), **(extra_args or {}))
        x = x + (x - denoised) / sigma * (sigma_next - sigma)      # one step along dx/dsigma
        if callback is not None:
            callback({"i": i, "x": x, "denoised": denoised})
    return x


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    previous = None         # the denoised image of the step before, for the second-order correction
    h_previous = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, x.new_full((x.shape[0],), sigma), **(extra_args or {}))
        if sigma_next == 0:
            x = denoised                          # the last step lands on the denoised image
        else:
            h = math.log(sigma) - math.log(sigma_next)     # step in log signal-to-noise
            estimate = denoised
            if previous is not None:
                r = h_previous / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
            x = (sigma_next / sigma) * x - math.expm1(-h) * estimate
            h_previous = h
        previous = denoised
        if callback is not None:
            callback({"i": i, "x": x, "denoised": denoised})
    return x


class BrownianNoise:
    """Standard normal noise for the step from sigma `a` to sigma `b`: (W(b) - W(a)) / sqrt(|b - a|)
    on one Brownian path over [0, sigma_max], fixed by the seed. Built on sigma itself (not on the
    step index), so runs with more or fewer steps see increments of the same path."""

    def __init__(self, x: torch.Tensor, sigma_max: float, seed: int):
        try:
            import torchsde
        except ImportError as e:
            raise ImportError("sample_dpmpp_sde needs torchsde (a ComfyUI requirement): pip install torchsde") from e
        self.path = torchsde.BrownianInterval(t0=0.0, t1=sigma_max * (1 + 1e-6), size=x.shape, dtype=x.dtype,
                                              device=x.device, entropy=seed)

    def __call__(self, a: float, b: float) -> torch.Tensor:
        lo, hi = min(a, b), max(a, b)
        return self.path(lo, hi) / math.sqrt(hi - lo)


def _ancestral(sigma: float, sigma_next: float) -> tuple[float, float]:
    """Split a step to sigma_next into a deterministic part down to sigma_down and fresh noise of
    size sigma_up, sigma_down² + sigma_up² = sigma_next² (eta = 1: as much noise as the step allows)."""
    up = min(sigma_next, math.sqrt(max(0.0, sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++ SDE, second order with the midpoint in log sigma (r = 1/2)."""
    extra = dict(extra_args or {})
    noise = BrownianNoise(x, float(sigmas[0]), int(extra.pop("seed", 0)))

    def toward(x, sigma, target, denoised):
        # the exact solution from sigma to `target` with the denoised image held fixed (first order)
        return (target / sigma) * x + (1 - target / sigma) * denoised

    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, x.new_full((x.shape[0],), sigma), **extra)
        if sigma_next == 0:
            x = denoised                                   # the last step lands on the denoised image
        else:
            midpoint = math.sqrt(sigma * sigma_next)       # half way in log sigma
            down, up = _ancestral(sigma, midpoint)
            x_mid = toward(x, sigma, down, denoised) + noise(sigma, midpoint) * up
            denoised_mid = model(x_mid, x.new_full((x.shape[0],), midpoint), **extra)
            down, up = _ancestral(sigma, sigma_next)
            x = toward(x, sigma, down, denoised_mid) + noise(sigma, sigma_next) * up
        if callback is not None:
            callback({"i": i, "x": x, "denoised": denoised})
    return x
