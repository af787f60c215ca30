"""Rung check: is the run's granularity closer to full compute than one model-level residual?

The memory ladder orders granularities by bytes, and on the models it was built on a finer rung
was also the closer one. A trained model can disagree: on the reference DiT (50 steps, about 3x)
4-block residual spans land 35.0 dB from full compute and the model-level residual 37.4 dB; with
Taylor 1, 44.8 against 47.4 dB. Which one wins depends on the model, so it is measured on the run
itself.

At each of the first `steps` full steps that follow an earlier full step, before the step
computes, the engine runs the call the way a cached step would (cached or forecast branches and
span residuals, no block work) and this check predicts the output from the model-level residual
of the earlier full steps (forecast the same way, where the run forecasts). Both are compared with
the full output. If the model-level residual was clearly closer in total, the rest of the run keeps only
that residual (and its history); otherwise the check frees its residual and the rung stays.

While it runs the check holds one model-level residual per stream (times the forecaster's history)
outside the cache plan: the size of a latent, a few MiB at 1024x1024.
"""
from __future__ import annotations

import torch

from .cache import CacheStore
from .forecast import ForecastState, combine

RESIDUAL = ("model", "residual")
# The model-level residual must be clearly closer: the check sees a few early steps, one step's
# error at a time, and a finer rung's errors grow less over the run (reference DiT, Taylor 1: at
# 0.91x the rung's error a switch lost 2.5 dB; at 0.57x or below it was within 0.2 dB or gained up to 3 dB).
MARGIN = 0.75


def relative_error(guess: torch.Tensor, truth: torch.Tensor) -> float:
    truth = truth.float()
    return float((guess.float() - truth).norm() / truth.norm().clamp_min(1e-12))


class RungCheck:
    """Errors of the run's rung and of the model-level residual at the first checked full steps."""

    def __init__(self, device=None, forecast: ForecastState | None = None, steps: int = 3):
        self.store = CacheStore(device)
        self.forecast = forecast
        self.steps = steps
        self.errors: dict[int, list[tuple[float, float]]] = {}  # step -> (rung, model level) per call

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
            self.errors.setdefault(step, []).append((relative_error(rung_guess, out),
                                                     relative_error(model_guess, out)))
        residual = (out - x[:, :out.shape[1]]).to(out.dtype)
        if self.forecast is None:
            self.store.put(streams, RESIDUAL, residual)
        else:
            self.forecast.store(self.store, streams, RESIDUAL, step, sigma, residual)

    def settled_before(self, step: int) -> bool:
        """True once `steps` full steps are scored and `step` comes after all of them."""
        return len(self.errors) >= self.steps and step > max(self.errors)

    def totals(self) -> tuple[float, float]:
        pairs = [p for calls in self.errors.values() for p in calls]
        return sum(r for r, _ in pairs), sum(m for _, m in pairs)

    def model_level_wins(self) -> bool:
        rung, model = self.totals()
        return bool(self.errors) and model < MARGIN * rung

    def text(self, rung: str) -> str:
        scored = sum(len(calls) for calls in self.errors.values())
        rung_error, model_error = (e / max(scored, 1) for e in self.totals())
        steps = ", ".join(str(s) for s in sorted(self.errors))
        if self.model_level_wins():
            return (f"rung check at steps {steps}: one model-level residual landed closer to full compute than "
                    f"{rung} (mean relative error {model_error:.4f} against {rung_error:.4f}); the rest of the "
                    "run keeps only that residual")
        return (f"rung check at steps {steps}: {rung} stays (mean relative error {rung_error:.4f} against "
                f"{model_error:.4f} for one model-level residual)")

    def free(self) -> None:
        self.store.clear()
