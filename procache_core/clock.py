"""The step clock: which sampler step a model call belongs to.

Samplers call the model once (euler, dpmpp_2m), twice (heun, dpmpp_2s_ancestral, dpmpp_sde) or
more per step, at sigmas that may lie between two schedule entries, and a corrector call of step k
can land exactly on the sigma that starts step k+1. Sigma alone is therefore ambiguous; the clock
uses the sampler's per-step callback (ComfyUI calls it once at the end of every step) to know
where each step ends, and falls back to locating the sigma in the schedule when no callback came.
"""
from __future__ import annotations

from typing import Sequence


class StepClock:
    """Maps model calls to step indices 0..steps-1 of one sampler run, in denoising order."""

    def __init__(self, sigmas: Sequence[float], offset: int = 0, callback_driven: bool = True):
        self.sigmas = [float(s) for s in sigmas]
        if len(self.sigmas) < 2:
            raise ValueError("a sampler run needs at least two sigmas (one step)")
        self.steps = len(self.sigmas) - 1
        self.offset = offset            # index of this run's first step in a longer schedule
        # True when the sampler reports the end of every step (ComfyUI's samplers do, once the run
        # wraps their callback); False locates each call by its sigma alone.
        self.callback_driven = callback_driven
        self._finished = -1             # last step the sampler reported as done
        # ComfyUI's samplers report step k after its first model call. Heun then makes its corrector
        # call exactly at sigma_{k+1}, where the next step also starts: with this set (the runtime
        # does for heun), the first call at sigma_{k+1} after the report still belongs to step k.
        self.corrector_at_next_sigma = False
        self._corrector_pending = False
        self._corrector_seen: set = set()     # CFG streams run apart each make their own corrector call

    @property
    def last_finished_step(self) -> int:
        """The last step the sampler reported as done (-1 before the first)."""
        return self._finished

    def step_finished(self, step: int) -> None:
        """Called from the sampler callback with the index of the step that just ended."""
        if int(step) > self._finished:
            self._corrector_pending = self.corrector_at_next_sigma
            self._corrector_seen = set()
        self._finished = max(self._finished, int(step))

    def step_for(self, sigma: float, streams=None) -> int:
        """The run-local step index of a model call at noise level `sigma` for `streams`."""
        sigma = float(sigma)
        if not self.callback_driven:
            return self._locate(sigma, lowest=0)
        if self._corrector_pending:
            k = self._finished
            at_next = k + 1 <= self.steps and self.sigmas[k + 1] > 0 and abs(sigma - self.sigmas[k + 1]) <= self._tolerance(k)
            if at_next and streams not in self._corrector_seen:
                self._corrector_seen.add(streams)
                return k
            self._corrector_pending = False
        expected = min(self._finished + 1, self.steps - 1)
        if self._contains(expected, sigma):
            return expected
        return self._locate(sigma, lowest=expected if sigma <= self.sigmas[expected] else 0)

    def _tolerance(self, k: int) -> float:
        return 1e-5 * max(abs(self.sigmas[k]), 1e-3)

    def _contains(self, k: int, sigma: float) -> bool:
        hi, lo = self.sigmas[k], self.sigmas[k + 1]
        if hi < lo:     # an ascending piece (restart samplers): compare the other way round
            hi, lo = lo, hi
        tol = self._tolerance(k)
        return lo - tol <= sigma <= hi + tol

    def _locate(self, sigma: float, lowest: int) -> int:
        # Half-open [sigma_{k+1}, sigma_k): a call exactly at sigma_{k+1} starts step k+1.
        for k in range(lowest, self.steps):
            tol = self._tolerance(k)
            if self.sigmas[k + 1] + tol < sigma <= self.sigmas[k] + tol:
                return k
        if sigma > self.sigmas[0]:
            return 0
        return self.steps - 1
