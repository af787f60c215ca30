"""Rung check: is the run's granularity closer to full compute than one model-level residual?

The memory ladder orders granularities by bytes, and on the models it was built on a finer rung
was also the closer one. A trained model can disagree: on the reference DiT (50 steps, about 3x)
4-block residual spans land 35.0 dB from full compute and the model-level residual 37.4 dB; with
Taylor 1, 44.8 against 47.4 dB. Which one wins depends on the model, so it is measured on the run
itself.

At every full step that follows an earlier full step, before the step computes, the engine runs
the call the way a cached step would (cached or forecast branches and span residuals, no block
work) and this check predicts the output from the model-level residual of the earlier full steps
(forecast the same way, where the run forecasts). Both are compared with the full output; each
one's relative errors add up with a decay, so recent steps weigh most. Once `steps` full steps are
scored and the model-level residual's total is clearly below the rung's (MARGIN), the rest of the
run keeps only that residual (and its history).

While it runs the check holds one model-level residual per stream (times the forecaster's history)
outside the cache plan: the size of a latent, about 0.5 MiB per stream for FLUX at 1024x1024.
"""
from __future__ import annotations

import torch

from .cache import CacheStore
from .forecast import ForecastState, combine

RESIDUAL = ("model", "residual")
# The model-level residual must be clearly closer: a finer rung's errors grow less over the run
# than one step's error shows (reference DiT, Taylor 1: at 0.91x the rung's error a switch lost
# 2.5 dB; at 0.57x or below it was within 0.2 dB or gained up to 3 dB).
MARGIN = 0.75
DECAY = 0.5     # each scored step halves the weight of the earlier ones


def relative_error(guess: torch.Tensor, truth: torch.Tensor) -> float:
    truth = truth.float()
    return float((guess.float() - truth).norm() / truth.norm().clamp_min(1e-12))


class RungCheck:
    """Errors of the run's rung and of the model-level residual at the first checked full steps."""

    def __init__(self, device=None, forecast: ForecastState | None = None, steps: int = 2):
        self.store = CacheStore(device)
        self.forecast = forecast
        self.steps = steps              # scored full steps before a verdict
        self.scored: list[int] = []     # the full steps scored so far
        self.rung_error = self.model_error = 0.0    # decayed sums of relative errors

    def model_level_guess(self, streams, step: int, sigma: float, x: torch.Tensor,
                          out: torch.Tensor) -> torch.Tensor | None:
        """What a cached step at `step` would return from the model-level residual (None: nothing stored)."""
        if self.forecast is None:
            residual = self.store.get(streams, RESIDUAL, device=x.device)
        else:
            residual = combine(self.store, streams, RESIDUAL, self.forecast.plan(RESIDUAL, step, "model", sigma),
                               x.device)
        if residual is None or residual.shape != out.shape:
            return None
        return x[:, :out.shape[1]] + residual

    def has_previous(self, streams) -> bool:
        if self.forecast is None:
            return self.store.get(streams, RESIDUAL) is not None
        return self.forecast.memory.latest(RESIDUAL) is not None

    def record(self, streams, step: int, sigma: float, x: torch.Tensor, out: torch.Tensor,
               rung_guess: torch.Tensor | None) -> None:
        """A full step's output: score both guesses against it, then keep its model-level residual."""
        if not (out.shape[0] == x.shape[0] and out.shape[2:] == x.shape[2:] and out.shape[1] <= x.shape[1]):
            return          # not a residual of its input (another layout): nothing to compare
        model_guess = self.model_level_guess(streams, step, sigma, x, out)
        if rung_guess is not None and model_guess is not None and rung_guess.shape == out.shape:
            if not self.scored or self.scored[-1] != step:     # a new step: older ones weigh less
                self.rung_error *= DECAY
                self.model_error *= DECAY
                self.scored.append(step)
            self.rung_error += relative_error(rung_guess, out)
            self.model_error += relative_error(model_guess, out)
        residual = (out - x[:, :out.shape[1]]).to(out.dtype)
        if self.forecast is None:
            self.store.put(streams, RESIDUAL, residual)
        else:
            self.forecast.store(self.store, streams, RESIDUAL, step, sigma, residual)

    def model_level_wins(self) -> bool:
        return len(self.scored) >= self.steps and self.model_error < MARGIN * self.rung_error

    def switches_before(self, step: int) -> bool:
        """True when the run should keep only the model-level residual from `step` on (a later step
        than every scored one, so all streams of the last scored step are in)."""
        return bool(self.scored) and step > self.scored[-1] and self.model_level_wins()

    def text(self, rung: str) -> str:
        steps = f"{len(self.scored)} full steps ({self.scored[0]}-{self.scored[-1]})" if self.scored else "no full step"
        if self.model_level_wins():
            return (f"rung check over {steps}: one model-level residual landed clearly closer to full compute "
                    f"than {rung} (recent relative error {self.model_error:.4f} against {self.rung_error:.4f}); "
                    f"the rest of the run keeps only that residual")
        return (f"rung check over {steps}: {rung} stays (recent relative error {self.rung_error:.4f} against "
                f"{self.model_error:.4f} for one model-level residual)")

    def free(self) -> None:
        self.store.clear()
