"""Spectrum-style and FreqCa-style model-level forecasts on ComfyUI's Flux class, re-implemented by
this pack for the reference Flux frontier (benchmarks/frontier_flux.py) and labelled "-style"
there. They are the readings of benchmarks/model_forecasters.py (the reference DiT's rows), hooked
into a Flux model through ComfyUI's own block-replacement patches ("dit" patches_replace) on a
clone of the model, so the base model is never changed:

    Spectrum-style  the final-block feature (the image tokens the last single block hands to the
                    final layer) as a function of the noise level: a Chebyshev series fitted by
                    ridge regression over the steps computed in this run, blended half and half
                    with a first-order difference forecast (SpectrumState); the other steps
                    evaluate the blend.
    FreqCa-style    one cumulative residual (final-block feature minus the image tokens entering
                    the first block): its low spatial frequencies (a 2-D FFT low-pass over the
                    token grid, cutoff 0.5 x Nyquist) extrapolated linearly from the last two
                    computed steps, its high frequencies reused from the last one.

Both compute the whole block stack on a fixed set of steps (evenly spaced from step 0) and skip
every block on the others; the embedders and the final layer always run. Each CFG batch layout
(ComfyUI's cond_or_uncond) keeps its own fit. A call belongs to the last step whose sigma is at or
above its own, so mid-step evaluations (dpmpp_sde) stay within their step.
"""
from __future__ import annotations

import math

import torch

from procache_core.frequency import TokenGrid

from .model_forecasters import ChebyshevRidge, freqca_extrapolate, spectrum_blend


class SpectrumState:
    """The Chebyshev ridge fit, blended with a first-order forward-difference (Taylor) forecast
    from the last two computed features: chebyshev_weight x fit + (1 - chebyshev_weight) x Taylor,
    the convex combination the method describes (weight 0.5, degree 4 as its published settings).

    The ridge, 0.1, scored best of 0.01-1 on the calibration images (seed 1000, never the reported
    ones) at 20 steps 3x and 50 steps 5x under euler (36.8 and 36.0 dB). The reference DiT's degree 2
    and ridge 0.01 scored 25.9 and 25.9 dB here (22.7 and 22.1 without the blend); degrees 3 and 5
    at most 35.5 on one of the two.
    """

    def __init__(self, degree: int = 4, ridge: float = 0.1, chebyshev_weight: float = 0.5):
        self.fit = ChebyshevRidge(degree, ridge)
        self.chebyshev_weight = chebyshev_weight
        self.last: list[tuple[float, torch.Tensor]] = []        # (position, feature) of the last two computed

    def observe(self, x: float, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        feature = h_out.detach().clone()
        self.fit.observe(x, feature)
        self.last = (self.last + [(x, feature)])[-2:]

    def forecast(self, x: float, h_in: torch.Tensor) -> torch.Tensor:
        return spectrum_blend(self.fit, self.last, x, self.chebyshev_weight)

    @property
    def ready(self) -> bool:
        return self.fit.points > 0

    @property
    def nbytes(self) -> int:
        return self.fit.nbytes + sum(f.numel() * f.element_size() for _, f in self.last)


class FreqCaState:
    def __init__(self, cutoff: float = 0.5):
        self.cutoff = cutoff
        self.history: list[tuple[float, torch.Tensor]] = []     # (position, residual) of the last two computed

    def observe(self, x: float, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        self.history = (self.history + [(x, (h_out - h_in).detach())])[-2:]

    @property
    def ready(self) -> bool:
        return bool(self.history)

    def forecast(self, x: float, h_in: torch.Tensor) -> torch.Tensor:
        tokens = h_in.shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"FreqCa-style needs a square token grid, got {tokens} image tokens")
        return freqca_extrapolate(self.history, x, h_in, TokenGrid(1, side, side), self.cutoff)

    @property
    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for _, r in self.history)


class FluxStackForecast:
    """Patches a clone of a Flux ModelPatcher so that the block stack runs on `compute_steps` only."""

    def __init__(self, make_state, compute_steps, sigmas):
        self.make_state = make_state
        self.compute_steps = set(compute_steps)
        self.step_sigmas = [float(s) for s in sigmas[:-1]]      # the sigma each step starts from
        self.states: dict = {}
        self.computing, self.state, self.x = True, None, 0.0
        self.stack_input, self.text_tokens = None, 0

    def patch(self, patcher):
        model = patcher.clone()
        diffusion_model = model.model.diffusion_model
        doubles, singles = len(diffusion_model.double_blocks), len(diffusion_model.single_blocks)
        if doubles == 0 or singles == 0:
            raise ValueError("the Flux stack forecast needs double and single blocks")
        for i in range(doubles):
            model.set_model_patch_replace(self._double(i), "dit", "double_block", i)
        for i in range(singles):
            model.set_model_patch_replace(self._single(i == singles - 1), "dit", "single_block", i)
        return model

    def _begin(self, args) -> None:
        """At the first block of a model call: which step it is, and whether the stack runs."""
        options = args["transformer_options"]
        sigma = float(options["sigmas"].flatten()[0])
        step = max((i for i, s in enumerate(self.step_sigmas) if s >= sigma - 1e-6), default=0)
        key = (tuple(options.get("cond_or_uncond", ())), tuple(args["img"].shape))
        self.state = self.states.setdefault(key, self.make_state())
        self.computing = step in self.compute_steps or not self.state.ready     # nothing to forecast from yet
        self.x = 2 * sigma / self.step_sigmas[0] - 1          # the noise level in [-1, 1]
        # a copy: ComfyUI's Flux blocks add to their input in place
        self.stack_input, self.text_tokens = args["img"].clone(), args["txt"].shape[1]

    def _double(self, index: int):
        def replace(args, extra):
            if index == 0:
                self._begin(args)
            if self.computing:
                return extra["original_block"](args)
            return {"img": args["img"], "txt": args["txt"]}
        return replace

    def _single(self, last: bool):
        def replace(args, extra):
            if self.computing:
                out = extra["original_block"](args)
                if last:
                    self.state.observe(self.x, self.stack_input, out["img"][:, self.text_tokens:])
                return out
            if not last:
                return {"img": args["img"]}
            image = self.state.forecast(self.x, self.stack_input).to(args["img"].dtype)
            return {"img": torch.cat((args["img"][:, :self.text_tokens], image), dim=1)}
        return replace

    @property
    def cache_bytes(self) -> int:
        return sum(state.nbytes for state in self.states.values())
