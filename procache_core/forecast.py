"""Forecasting cached branches: a reused branch output is a linear combination of its last K
full-step values instead of a copy of the latest one.

    forecast(t) = sum_i c_i(t) * h_i + D

h_i are the branch's pre-gate outputs at the last K full steps (oldest first), taken at noise
levels t_i; c_i are the forecaster's coefficients for the target noise level t; D is the
correction left by selective steps since the last full step (tokens recomputed on a selective
step overwrite the forecast, and keep their offset until the next full step).

- `Taylor(order)`: polynomial extrapolation through the last order+1 values at their actual noise
  levels (Lagrange form), so it is exact for trajectories that are polynomials of that degree
  whatever the gaps; searched schedules have uneven reuse intervals. Order 0 is plain reuse.
- `Fitted`: coefficients per schedule step and branch group, found by least squares on recorded
  full-compute trajectories (`ForecastFitter`), with Taylor as the fallback where no fit exists.
- `Online`: a small Chebyshev polynomial over the run's steps per unit, fitted by ridge regression on
  the full steps of the run itself; h_i are then its running normal-equation sums, not past values.

Memory stays bounded: K tensors per cached branch per CFG stream, in slots of the cache store.

With a frequency split (`Forecaster.with_frequency_split`), only a unit's low spatial frequencies
are forecast and its high ones are reused from the last full step (frequency.py).

Two safeguards (`ForecastState`): the sampler's kind damps or switches off extrapolation where it
overshoots (SDE and ancestral samplers inject noise every step), and a per-unit guard compares
forecast and reuse errors at every full step and makes a unit whose forecasts miss more reuse.
"""
from __future__ import annotations

import copy
import json
from typing import Hashable, Sequence

import torch

from .frequency import patch_sizes, split_forecast, token_grid
from .schedule import StepKind

FORMAT = "procache.forecaster"
VERSION = 1
MAX_HISTORY = 3
MAX_JSON_BYTES = 1 << 20
# Fitted weights are O(1) (Lagrange weights for the pack's schedules stay within about +-10); far
# larger ones come from a broken fit or an edited file and overflow half-precision products.
MAX_COEFFICIENT = 1e4
MAX_DEGREE = 4


class ForecastError(ValueError):
    """A forecaster description that cannot be used; the message says why."""


def lagrange_coefficients(times: Sequence[float], target: float) -> list[float]:
    """Weights w_i with sum_i w_i p(t_i) = p(target) for every polynomial p of degree < len(times)."""
    times = [float(t) for t in times]
    if len(set(times)) != len(times):
        raise ForecastError(f"history noise levels must differ, got {times}")
    weights = []
    for i, ti in enumerate(times):
        w = 1.0
        for j, tj in enumerate(times):
            if j != i:
                w *= (target - tj) / (ti - tj)
        weights.append(w)
    return weights


class Forecaster:
    """Base: how many values to keep and how to combine them.

    guard: check each unit's forecast against plain reuse at every full step (`ForecastState`).
    sampler_aware: damp or switch off extrapolation under the samplers that overshoot (`DAMPING`).
    frequency_cutoff: forecast only the spatial frequencies up to this fraction of Nyquist over the
      image token grid and reuse the rest from the last full step (frequency.py); None: all.
    """

    kind = "none"
    history = 1
    guard = True
    sampler_aware = True
    frequency_cutoff: float | None = None

    def slots_after(self, full_steps: int) -> int:
        """Tensors each unit holds after `full_steps` full steps (the cache plan counts them)."""
        return max(1, min(full_steps, self.history))

    def memory(self, sigmas: Sequence[float] | None = None) -> "RingHistory":
        """What a run keeps per unit to forecast it (`sigmas`: the run's noise levels, step by step)."""
        return RingHistory(self)

    def with_safeguards(self, guard: bool, sampler_aware: bool) -> "Forecaster":
        """A copy with these safeguards (the built-in forecasters are shared; never changed in place)."""
        other = copy.copy(self)
        other.guard, other.sampler_aware = bool(guard), bool(sampler_aware)
        return other

    def with_frequency_split(self, cutoff: float | None) -> "Forecaster":
        """A copy that forecasts the spatial frequencies up to `cutoff` x Nyquist (0..1) and reuses
        the higher ones; None or 1 forecasts every frequency (no split)."""
        if cutoff is not None and not (_finite(cutoff) and 0.0 <= cutoff <= 1.0):
            raise ForecastError(f"frequency cutoff must be a number from 0 to 1 (1: no split), got {cutoff!r}")
        other = copy.copy(self)
        other.frequency_cutoff = None if cutoff is None or cutoff >= 1.0 else float(cutoff)
        return other

    def label(self) -> str:
        """describe(), and the frequency split where there is one (the node shows it)."""
        if self.frequency_cutoff is None:
            return self.describe()
        return f"{self.describe()}, frequencies up to {self.frequency_cutoff:g} x Nyquist (the rest reused)"

    def coefficients(self, step: int, group: str, times: Sequence[float], target: float) -> list[float]:
        """Weights for the stored values at `times` (oldest first) to forecast noise level `target`."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, "history": self.history}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


class Taylor(Forecaster):
    """Finite-difference extrapolation of order 0, 1 or 2 on the actual noise-level gaps."""

    kind = "taylor"

    def __init__(self, order: int = 1):
        if order not in (0, 1, 2):
            raise ForecastError(f"Taylor order must be 0, 1 or 2, got {order}")
        self.order = order
        self.history = order + 1

    def coefficients(self, step, group, times, target):
        times = list(times)[-self.history:]
        return lagrange_coefficients(times, target)

    def describe(self) -> str:
        return f"Taylor order {self.order}"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "order": self.order}


class Fitted(Forecaster):
    """Least-squares coefficients per (schedule step, branch group); Taylor where none was fitted."""

    kind = "fitted"

    def __init__(self, table: dict[int, dict[str, list[float]]], history: int, grouping: str = "role",
                 fallback_order: int = 0, metadata: dict | None = None):
        if not 1 <= history <= MAX_HISTORY:
            raise ForecastError(f"history must be 1..{MAX_HISTORY}, got {history}")
        if grouping not in ("role", "role+depth"):
            raise ForecastError(f"grouping must be 'role' or 'role+depth', got {grouping!r}")
        for step, groups in table.items():
            for group, coeffs in groups.items():
                if not isinstance(coeffs, list) or not 1 <= len(coeffs) <= history \
                        or not all(_finite(c) and abs(c) <= MAX_COEFFICIENT for c in coeffs):
                    raise ForecastError(f"step {step}, group {str(group)[:40]!r}: coefficients must be a list of "
                                        f"1..{history} numbers within +-{MAX_COEFFICIENT:g}, got {str(coeffs)[:80]}; "
                                        "calibrate again with ProCache Forecaster Trainer")
        self.table = {int(s): {str(g): [float(c) for c in cs] for g, cs in gs.items()} for s, gs in table.items()}
        self.history = history
        self.grouping = grouping
        self.fallback = Taylor(min(fallback_order, history - 1))
        self.metadata = dict(metadata or {})

    def coefficients(self, step, group, times, target):
        coeffs = self.table.get(step, {}).get(group)
        if coeffs is None or len(coeffs) != min(len(times), self.history):
            return self.fallback.coefficients(step, group, times, target)
        return coeffs

    def describe(self) -> str:
        cells = sum(len(g) for g in self.table.values())
        return f"fitted (K={self.history}, {cells} step/group cells)"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "grouping": self.grouping, "fallback_order": self.fallback.order,
                "metadata": self.metadata,
                "coefficients": {str(s): gs for s, gs in sorted(self.table.items())}}


class Online(Forecaster):
    """A Chebyshev polynomial over the run's noise schedule per unit, fitted by ridge regression on
    the values of this run's own full steps: no calibration, and constant memory per unit (`ChebyshevSums`).

    degree: of the polynomial (1..4); few full steps support little more than 2.
    forgetting: weight kept by older full steps at each new one (1: all count alike; lower fits
      the recent trajectory more closely). 0.5 measured best on the reference DiT.
    ridge: penalty on the non-constant coefficients, relative to the total weight of the values.
    """

    kind = "online"

    def __init__(self, degree: int = 2, forgetting: float = 0.5, ridge: float = 1e-3):
        if not 1 <= degree <= MAX_DEGREE:
            raise ForecastError(f"online degree must be 1..{MAX_DEGREE}, got {degree}")
        if not _finite(forgetting) or not 0.0 < forgetting <= 1.0:
            raise ForecastError(f"online forgetting must be in (0, 1], got {forgetting}")
        if not _finite(ridge) or ridge < 0.0:
            raise ForecastError(f"online ridge must be a finite number >= 0, got {ridge}")
        self.degree, self.forgetting, self.ridge = int(degree), float(forgetting), float(ridge)
        self.history = self.degree + 1

    def slots_after(self, full_steps: int) -> int:
        return self.degree + 2          # the basis-weighted sums and the latest value, from the first full step

    def memory(self, sigmas: Sequence[float] | None = None) -> "ChebyshevSums":
        return ChebyshevSums(self, sigmas)

    def describe(self) -> str:
        forgetting = f", forgetting {self.forgetting:g}" if self.forgetting < 1.0 else ""
        return f"online Chebyshev degree {self.degree}{forgetting}"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "degree": self.degree, "forgetting": self.forgetting, "ridge": self.ridge}


def chebyshev(x: float, degree: int) -> list[float]:
    """T_0(x) .. T_degree(x)."""
    values = [1.0, float(x)][:degree + 1]
    while len(values) <= degree:
        values.append(2.0 * x * values[-1] - values[-2])
    return values


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _whole_number(data: dict, key: str, default: int, allowed: str) -> int:
    """data[key] as an int; ForecastError naming the field and the values it takes otherwise."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ForecastError(f"forecaster field {key!r} must be a whole number ({allowed}), got {str(value)[:40]!r}; "
                            "fix the text or calibrate again")
    return value


def group_name(role: str, block: int, num_blocks: int, grouping: str) -> str:
    if grouping == "role+depth":
        third = min(2, 3 * block // max(num_blocks, 1))
        return f"{role}@{('shallow', 'middle', 'deep')[third]}"
    return role


def from_dict(data: dict) -> Forecaster | None:
    """A forecaster from its JSON form (None for kind 'none'); clear errors for anything else."""
    if not isinstance(data, dict):
        raise ForecastError("a forecaster must be a JSON object")
    if data.get("format") != FORMAT:
        raise ForecastError(f"not a forecaster file (format should be {FORMAT!r}, got {data.get('format')!r})")
    if data.get("version") != VERSION:
        raise ForecastError(f"forecaster version {data.get('version')!r} is not supported (this pack reads {VERSION})")
    kind = data.get("kind")
    if kind == "none":
        return None
    if kind == "taylor":
        return Taylor(_whole_number(data, "order", 1, "0, 1 or 2"))
    if kind == "fitted":
        raw = data.get("coefficients")
        if not isinstance(raw, dict):
            raise ForecastError("a fitted forecaster needs a 'coefficients' object: step -> group -> list")
        bad = [s for s, gs in raw.items() if not (s.isascii() and s.isdigit() and len(s) <= 6) or not isinstance(gs, dict)]
        if bad:
            raise ForecastError(f"forecaster 'coefficients': {str(bad[0])[:40]!r} should be a step number holding an "
                                "object of group -> list of numbers; calibrate again with ProCache Forecaster Trainer")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ForecastError(f"forecaster field 'metadata' must be a JSON object, got a {type(metadata).__name__}")
        return Fitted({int(s): gs for s, gs in raw.items()}, _whole_number(data, "history", 2, f"1..{MAX_HISTORY}"),
                      data.get("grouping", "role"), _whole_number(data, "fallback_order", 0, "0, 1 or 2"), metadata)
    if kind == "online":
        try:
            return Online(_whole_number(data, "degree", 2, f"1..{MAX_DEGREE}"), float(data.get("forgetting", 0.5)),
                          float(data.get("ridge", 1e-3)))
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, ForecastError):
                raise ForecastError(f"online forecaster: {e}") from None
            raise ForecastError(f"online forecaster settings: {e}; give a number for 'forgetting' (0..1] and "
                                "'ridge' (> 0)") from None
    raise ForecastError(f"unknown forecaster kind {kind!r} (none, taylor, fitted, online)")


def from_json(text: str) -> Forecaster | None:
    if len(text.encode()) > MAX_JSON_BYTES:
        raise ForecastError("forecaster JSON is larger than 1 MiB")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ForecastError(f"forecaster is not valid JSON: {e}") from None
    except (ValueError, RecursionError) as e:      # numbers of over 4300 digits, nesting past the stack
        raise ForecastError(f"forecaster text is not a forecaster ({str(e)[:100]}): paste the Trainer's JSON") from None
    return from_dict(data)


# ---- samplers -----------------------------------------------------------------------------------
# ComfyUI's sampler names by how they move between steps. Extrapolating a branch between full steps
# assumes it changes smoothly with the noise level: true along an ODE, less so when a multistep
# solver mixes in earlier steps' predictions, and not at all when fresh noise enters each step
# (SDE and ancestral samplers), where a forecast amplifies the injected noise instead.
SAMPLER_KINDS = {
    "ode": ("euler", "euler_cfg_pp", "heun", "heunpp2", "dpm_2", "exp_heun_2_x0", "dpm_fast", "dpm_adaptive",
            "ddim"),
    "multistep": ("lms", "dpmpp_2m", "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v", "deis", "res_multistep",
                  "res_multistep_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "uni_pc",
                  "uni_pc_bh2"),
    "sde": ("dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
            "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "er_sde", "exp_heun_2_x0_sde", "seeds_2",
            "seeds_3", "sa_solver", "sa_solver_pece"),
    "ancestral": ("euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                  "dpmpp_2s_ancestral_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "ddpm",
                  "lcm"),
}
SAMPLER_KIND = {name: kind for kind, names in SAMPLER_KINDS.items() for name in names}
NOISY_SAMPLER_KINDS = ("sde", "ancestral")      # fresh noise enters every step
# Multistep: measured on the reference DiT, damping cost Taylor more than it saved the online fit
# once the per-unit guard runs; the guard decides there (table in docs/forecast.md).
DAMPING = {"ode": 1.0, "multistep": 1.0, **{kind: 0.0 for kind in NOISY_SAMPLER_KINDS}}


def sampler_name(function_name: str) -> str:
    """ComfyUI's sampler name for the name of its sampling function ("sample_dpmpp_sde" -> "dpmpp_sde")."""
    name = function_name.removeprefix("sample_").removesuffix("_function")
    return {"unipc": "uni_pc", "unipc_bh2": "uni_pc_bh2"}.get(name, name)


# ---- the engine's side ------------------------------------------------------------------------
class RingHistory:
    """Taylor and fitted forecasts: the last K full-step values of each unit, in ring slots.

    Tensors live in the run's CacheStore (per stream) under key + ("history", slot); this object
    keeps, per unit key, the (step, noise level, slot) of the stored values, shared by all
    streams: the streams of one step are stored at the same step whether they arrive batched or
    in separate calls.
    """

    def __init__(self, forecaster: Forecaster):
        self.forecaster = forecaster
        self.entries: dict[Hashable, list[tuple[int, float, int]]] = {}
        self.counts: dict[Hashable, int] = {}

    def has_step(self, key: Hashable, step: int) -> bool:
        return any(s == step for s, _, _ in self.entries.get(key, ()))

    def keep(self, cache, streams, key: Hashable, step: int, sigma: float, value: torch.Tensor) -> None:
        cache.put(streams, key + ("history", self.slot_for(key, step, sigma)), value)

    def slot_for(self, key: Hashable, step: int, sigma: float) -> int:
        """The ring slot that holds this unit's value of full step `step`."""
        entries = self.entries.setdefault(key, [])
        for i, (s, _, slot) in enumerate(entries):
            if s == step:
                # A sampler that evaluates twice per step (heun, dpmpp_sde) stores its later value:
                # it is labelled with its own noise level, or every extrapolation leans on a wrong gap.
                entries[i] = (s, float(sigma), slot)
                return slot
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        slot = n % self.forecaster.history
        entries.append((step, float(sigma), slot))
        del entries[:-self.forecaster.history]
        return slot

    def latest(self, key: Hashable):
        entries = self.entries.get(key)
        return entries[-1][2] if entries else None

    def weights(self, key: Hashable, step: int, group: str, sigma: float) -> list[tuple[Hashable, float]]:
        entries = self.entries[key]
        times = [t for _, t, _ in entries]
        weights = self.forecaster.coefficients(step, group, times, float(sigma))
        used = entries[-len(weights):]
        return [(slot, w) for (_, _, slot), w in zip(used, weights)]


class ChebyshevSums:
    """The online forecaster's memory: per unit, the ridge normal equations of its fit.

    With basis values phi(s_i) of the observed noise levels and forgetting factor r, the fit is
    min_c sum_i r^(n-i) |phi(s_i) @ c - h_i|^2 + ridge |c_1..|^2, whose solution needs only the
    Gram matrix G = sum_i r^(n-i) phi(s_i) phi(s_i)^T (scalars, shared by every stream of a unit)
    and the sums B_j = sum_i r^(n-i) phi_j(s_i) h_i (degree + 1 tensors per stream). A forecast at
    s is phi(s) @ G^-1 @ B: a weighted sum of the B_j, so the engine reads them like ring slots.
    The latest value is kept too, for reuse where forecasting is off.
    """

    def __init__(self, forecaster: "Online", sigmas: Sequence[float] | None = None):
        self.forecaster = forecaster
        self.sigmas = [float(s) for s in sigmas] if sigmas is not None and len(sigmas) > 1 else None
        self.top: float | None = None           # without sigmas: the first noise level seen maps to +1
        self.gram: dict[Hashable, torch.Tensor] = {}
        self.count: dict[Hashable, int] = {}
        self.observed: dict[Hashable, tuple[int, float]] = {}       # the latest (step, sigma) in the Gram
        self.summed: dict[tuple[str, Hashable], tuple[int, float]] = {}   # ... in each stream's sums

    def basis(self, sigma: float, degree: int) -> list[float]:
        return chebyshev(self.position(float(sigma)), degree)

    def position(self, sigma: float) -> float:
        """Where `sigma` lies in the run, from +1 (first step) to -1 (last sigma).

        The schedule's step positions, not the noise level itself: schedulers space their steps so
        that each changes the sample about as much, while sigma itself spans orders of magnitude on
        epsilon models (a fit in sigma would crowd all late steps at one end). A sigma between two
        schedule entries (a second evaluation inside a step) gets a fractional position."""
        if self.sigmas is None:
            return 2.0 * sigma / self.top - 1.0
        last = len(self.sigmas) - 1
        for k in range(last):
            hi, lo = self.sigmas[k], self.sigmas[k + 1]
            if min(hi, lo) <= sigma <= max(hi, lo):
                fraction = (hi - sigma) / (hi - lo) if hi != lo else 0.0
                return 1.0 - 2.0 * (k + fraction) / last
        return 1.0 if sigma > self.sigmas[0] else -1.0

    def has_step(self, key: Hashable, step: int) -> bool:
        return key in self.observed and self.observed[key][0] == step

    def keep(self, cache, streams, key: Hashable, step: int, sigma: float, value: torch.Tensor) -> None:
        if self.top is None:
            self.top = float(sigma) if sigma > 0 else 1.0
        forget, point = self.forecaster.forgetting, (step, float(sigma))
        phi = self.basis(sigma, self.forecaster.degree)
        if self.observed.get(key) != point:      # streams arriving in separate calls share one Gram
            outer = torch.outer(torch.tensor(phi, dtype=torch.float64), torch.tensor(phi, dtype=torch.float64))
            gram = self.gram.get(key)
            self.gram[key] = outer if gram is None else gram * forget + outer
            self.count[key] = self.count.get(key, 0) + 1
            self.observed[key] = point
        fresh = tuple(s for s in streams if self.summed.get((s, key)) != point)
        if fresh:
            part = value
            if len(fresh) != len(streams):
                part = torch.cat([c for s, c in zip(streams, value.chunk(len(streams))) if s in fresh])
            for j, weight in enumerate(phi):
                slot = key + ("history", ("sum", j))
                total = cache.get(fresh, slot)
                if total is None or total.shape != part.shape:
                    total = part * weight
                else:           # in place: memory stays one tensor per basis function
                    total.mul_(forget).add_(part.to(total.device), alpha=weight)
                cache.put(fresh, slot, total)
            for s in fresh:
                self.summed[(s, key)] = point
        cache.put(streams, key + ("history", "latest"), value)

    def latest(self, key: Hashable):
        return "latest" if key in self.count else None

    def weights(self, key: Hashable, step: int, group: str, sigma: float) -> list[tuple[Hashable, float]]:
        # Fewer observations than coefficients: the degree the data supports (one value: reuse).
        degree = min(self.forecaster.degree, self.count[key] - 1)
        gram = self.gram[key][:degree + 1, :degree + 1]
        # The constant term is not penalised: ridge pulls towards a flat fit, not towards zero.
        penalty = torch.ones(degree + 1, dtype=gram.dtype)
        penalty[0] = 0.0
        regularised = gram + torch.diag(penalty) * self.forecaster.ridge * float(gram[0, 0])
        target = torch.tensor(self.basis(sigma, degree), dtype=torch.float64)
        try:
            coeffs = torch.linalg.solve(regularised, target)
        except RuntimeError:        # ridge 0 and values at one position only: the caller reuses
            raise ForecastError("the online fit is singular at this step") from None
        return [(("sum", j), float(c)) for j, c in enumerate(coeffs)]


class ForecastState:
    """Per-run forecasting: the forecaster's memory, the sampler's damping and the per-unit guard.

    The guard: at every full step, before the new value is stored, it compares what a cached step
    would have forecast there with the value just computed, and does the same for plain reuse (the
    latest stored value). Both squared errors decay by half at each full step; a unit whose recent
    forecast error exceeds its recent reuse error reuses on the following cached steps, until its
    forecasts catch up again. This is measured where it is hardest for a forecast (the farthest
    step from the last full one), so the guard errs on the side of reuse.
    """

    def __init__(self, forecaster: Forecaster, sigmas: Sequence[float] | None = None):
        self.forecaster = forecaster
        self.memory = forecaster.memory(sigmas)
        self.damping = 1.0
        self.errors: dict[Hashable, tuple[float, float]] = {}     # unit -> recent (forecast, reuse) error
        self.reusing: set[Hashable] = set()          # units the guard makes reuse now
        self.ever_reused: set[Hashable] = set()
        # the frequency split's token layout: the latent's spatial dims and the model's patch sizes
        self.latent_dims: tuple[int, ...] | None = None
        self.patches: tuple[int, ...] = ()
        self.unsplit: set[Hashable] = set()          # units with no image token grid: forecast whole

    def use_sampler(self, function_name: str) -> list[str]:
        """Adapt to the sampler of this run (its sampling function's name); notes for the run report."""
        name = sampler_name(function_name)
        kind = SAMPLER_KIND.get(name)
        if not name or not self.forecaster.sampler_aware:
            return []
        if kind is None:
            return [f"forecast: sampler {name!r} is not in ProCache's sampler table: forecasting as for an ODE "
                    "sampler"]
        self.damping = DAMPING[kind]
        if self.damping == 0.0:
            return [f"forecast off under {name} ({kind} sampler: fresh noise enters every step, so extrapolating "
                    "between full steps overshoots): cached steps reuse the latest full value"]
        if self.damping < 1.0:
            return [f"forecast damped under {name} ({kind} sampler): cached steps keep {self.damping:g} of the "
                    "extrapolation beyond the latest full value"]
        return []

    def note_model_input(self, model, x: torch.Tensor) -> None:
        """The latent a model call gets ([B, C, H, W] or [B, C, T, H, W]): where its image tokens lie."""
        if x.ndim >= 4:
            self.latent_dims, self.patches = tuple(x.shape[2:]), patch_sizes(model)

    def value(self, cache, streams, key: Hashable, step: int, group: str, sigma: float,
              device=None) -> torch.Tensor | None:
        """This unit's estimate at `step` / `sigma` (None where a stored value is missing)."""
        plan = self.plan(key, step, group, sigma)
        return self._split(cache, streams, key, plan, combine(cache, streams, key, plan, device), device)

    def _split(self, cache, streams, key, plan, forecast, device):
        """The frequency split of a forecast (frequency.py); the forecast itself where there is none."""
        cutoff, latest = self.forecaster.frequency_cutoff, self.memory.latest(key)
        if cutoff is None or forecast is None or plan == [(latest, 1.0)]:
            return forecast
        grid = token_grid(forecast.shape, self.latent_dims, self.patches) if self.latent_dims else None
        reused = cache.get(streams, key + ("history", latest), device=device) if grid else None
        if reused is None:
            self.unsplit.add(key)
            return forecast
        return split_forecast(forecast, reused, grid, cutoff)

    def store(self, cache, streams, key: Hashable, step: int, sigma: float, value: torch.Tensor) -> None:
        """Keep a unit's freshly computed value of full step `step`."""
        if self.forecaster.guard and self.damping > 0.0 and not self.memory.has_step(key, step):
            self._compare(cache, streams, key, step, sigma, value)
        self.memory.keep(cache, streams, key, step, sigma, value)

    def plan(self, key: Hashable, step: int, group: str, sigma: float) -> list[tuple[Hashable, float]]:
        """(slot, weight) pairs that forecast this unit at `step` / `sigma`."""
        latest = self.memory.latest(key)
        if key in self.reusing and latest is not None:
            return [(latest, 1.0)]
        return self._forecast(key, step, group, sigma)

    def _forecast(self, key, step, group, sigma):
        latest = self.memory.latest(key)
        if latest is None:
            return []
        if self.damping == 0.0:
            return [(latest, 1.0)]
        try:
            weights = self.memory.weights(key, step, group, float(sigma))
        except ForecastError:          # two values at one noise level: fall back to the latest
            return [(latest, 1.0)]
        if self.damping == 1.0:
            return weights
        # latest + d * (forecast - latest)
        damped = [(slot, w * self.damping) for slot, w in weights]
        return damped + [(latest, 1.0 - self.damping)]

    def _compare(self, cache, streams, key, step, sigma, value):
        plan = self._forecast(key, step, "", sigma)
        latest = self.memory.latest(key)
        if not plan or plan == [(latest, 1.0)]:
            return
        forecast = self._split(cache, streams, key, plan, combine(cache, streams, key, plan), None)
        reuse = cache.get(streams, key + ("history", latest))
        if forecast is None or reuse is None or forecast.shape != value.shape:
            return
        target = value.to(forecast.device, torch.float32)
        reuse = reuse.to(forecast.device, torch.float32)
        # one host sync per unit and full step
        now = torch.stack([(forecast.float() - target).square().sum(), (reuse - target).square().sum()]).tolist()
        before = self.errors.get(key, (0.0, 0.0))
        recent = (0.5 * before[0] + now[0], 0.5 * before[1] + now[1])
        self.errors[key] = recent
        if recent[0] > recent[1]:
            self.reusing.add(key)
            self.ever_reused.add(key)
        else:
            self.reusing.discard(key)

    def report(self) -> list[str]:
        """Notes for the run report: what the guard and the frequency split decided."""
        notes = []
        if self.unsplit:
            notes.append(f"frequency split: {len(self.unsplit)} units have no image token grid (text tokens, joint "
                         "text + image sequences): their whole value is forecast")
        if self.ever_reused:
            notes.append(f"forecast guard: {len(self.ever_reused)} of {len(self.errors)} units reused instead of "
                         f"forecasting on some cached steps ({len(self.reusing)} at the end), where their recent "
                         "forecasts missed the computed value by more than plain reuse")
        return notes


def combine(cache, streams, key: Hashable, plan, device=None) -> torch.Tensor | None:
    """sum of weight * stored value over the plan's slots (None if a slot is missing)."""
    out = None
    for slot, weight in plan:
        value = cache.get(streams, key + ("history", slot), device=device)
        if value is None:
            return None
        out = value * weight if out is None else out.add(value, alpha=weight)
    return out


class ForecastFitter:
    """Accumulates least-squares normal equations during a full-compute run.

    Steps that are full in `kinds` feed the history; at every other step the true branch output
    is the target for the history values, per (step, group). Only K values per branch per stream
    are held, as at inference, so calibration memory is that of a forecasting run.
    """

    def __init__(self, kinds: Sequence[int], history: int = 2, grouping: str = "role", ridge: float = 1e-6,
                 normalize: bool = True, affine: bool = True):
        if not 1 <= history <= MAX_HISTORY:
            raise ForecastError(f"history must be 1..{MAX_HISTORY}, got {history}")
        self.kinds = [StepKind(k) for k in kinds]
        self.history = history
        self.grouping = grouping
        self.ridge = ridge
        self.normalize = normalize
        self.affine = affine
        self._values: dict[tuple[str, Hashable], list[tuple[int, torch.Tensor]]] = {}
        self._gram: dict[tuple[int, str], torch.Tensor] = {}
        self._rhs: dict[tuple[int, str], torch.Tensor] = {}
        self.samples = 0

    def __deepcopy__(self, memo):
        # ComfyUI deep-copies model options on clone(); a calibration run must still fill this one.
        return self

    def observe(self, streams: Sequence[str], key: Hashable, group: str, step: int, value: torch.Tensor) -> None:
        parts = value.chunk(len(streams), dim=0) if len(streams) > 1 else (value,)
        target_step = step < len(self.kinds) and self.kinds[step] != StepKind.FULL
        for stream, part in zip(streams, parts):
            hist = self._values.setdefault((stream, key), [])
            if not target_step:
                # Kept in its own dtype (as the cache holds it): the normal equations below work in
                # float64 anyway, and a float32 copy would double a half-precision history.
                hist[:] = [h for h in hist if h[0] != step] + [(step, part.detach())]
                del hist[:-self.history]
                continue
            if not hist or any(h.shape != part.shape for _, h in hist):
                continue
            feats = torch.stack([h.flatten() for _, h in hist]).double()        # (K, n)
            y = part.detach().flatten().double()
            cell = (step, group)
            k = feats.shape[0]
            # Each branch output counts by its relative error, so blocks with large activations do
            # not decide the coefficients of the whole group alone.
            weight = 1.0 / max(float(feats[-1].square().sum()), 1e-12) if self.normalize else 1.0
            gram, rhs = weight * (feats @ feats.T), weight * (feats @ y)
            if cell in self._gram and self._gram[cell].shape[0] == k:
                self._gram[cell] += gram
                self._rhs[cell] += rhs
            else:
                self._gram[cell], self._rhs[cell] = gram, rhs
            self.samples += 1

    def fit(self, metadata: dict | None = None) -> Fitted:
        table: dict[int, dict[str, list[float]]] = {}
        for (step, group), gram in sorted(self._gram.items()):
            k = gram.shape[0]
            scale = float(gram.diagonal().mean()) or 1.0
            regularised = gram + self.ridge * scale * torch.eye(k, dtype=gram.dtype)
            rhs = self._rhs[(step, group)]
            if self.affine:
                # Coefficients that sum to 1 (Lagrange multiplier on the normal equations): a branch
                # output that stays put is forecast as itself. Unconstrained least squares shrinks
                # every forecast a little toward zero, a bias each image inherits.
                ones = torch.ones(k, dtype=gram.dtype)
                g_rhs, g_ones = torch.linalg.solve(regularised, torch.stack([rhs, ones], dim=1)).unbind(1)
                coeffs = g_rhs - g_ones * (g_rhs.sum() - 1.0) / g_ones.sum()
            else:
                coeffs = torch.linalg.solve(regularised, rhs)
            table.setdefault(step, {})[group] = [float(c) for c in coeffs]
        meta = {"samples": self.samples, "steps": len(self.kinds),
                "pattern": "".join(str(int(k)) for k in self.kinds), **(metadata or {})}
        return Fitted(table, self.history, self.grouping, fallback_order=0, metadata=meta)

