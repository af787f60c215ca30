"""Euler and DPM-Solver++(2M) with k-diffusion's calling convention, for benchmarks without ComfyUI.

`sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None)` as in
`comfy.k_diffusion.sampling`, so `benchmarks.forecast_sampler_bench.sample` runs either set:
`model(x, sigma)` returns the denoised image, `x` starts at noise of level `sigmas[0]`, and the
callback gets `{"i": step}` after each step. Written from the published update rules (Karras et
al. 2022 for Euler, Lu et al. 2022 for DPM-Solver++(2M)); deterministic, one model call per step.
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
