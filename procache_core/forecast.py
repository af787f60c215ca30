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

Memory stays bounded: K tensors per cached branch per CFG stream, in ring slots of the cache store.
"""
from __future__ import annotations

import json
from typing import Hashable, Sequence

import torch

from .schedule import StepKind

FORMAT = "procache.forecaster"
VERSION = 1
MAX_HISTORY = 3
MAX_JSON_BYTES = 1 << 20
# Fitted weights are O(1) (Lagrange weights for the pack's schedules stay within about +-10); far
# larger ones come from a broken fit or an edited file and overflow half-precision products.
MAX_COEFFICIENT = 1e4


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
    """Base: how many values to keep and how to combine them."""

    kind = "none"
    history = 1

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
    raise ForecastError(f"unknown forecaster kind {kind!r} (none, taylor, fitted)")


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


# ---- the engine's side ------------------------------------------------------------------------
class ForecastState:
    """Per-run history bookkeeping: which full steps each branch's ring slots hold.

    Tensors live in the run's CacheStore (per stream) under key + ("history", slot); this object
    keeps, per branch key, the (step, noise level, slot) of the stored values, shared by all
    streams: the streams of one step are stored at the same step whether they arrive batched or
    in separate calls.
    """

    def __init__(self, forecaster: Forecaster):
        self.forecaster = forecaster
        self.entries: dict[Hashable, list[tuple[int, float, int]]] = {}
        self.counts: dict[Hashable, int] = {}

    def slot_for(self, key: Hashable, step: int, sigma: float) -> int:
        """The ring slot that holds this branch's value of full step `step`."""
        entries = self.entries.setdefault(key, [])
        for s, _, slot in entries:
            if s == step:
                return slot
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        slot = n % self.forecaster.history
        entries.append((step, float(sigma), slot))
        del entries[:-self.forecaster.history]
        return slot

    def plan(self, key: Hashable, step: int, group: str, sigma: float) -> list[tuple[int, float]]:
        """(slot, weight) pairs that forecast this branch at `step` / `sigma`."""
        entries = self.entries.get(key)
        if not entries:
            return []
        times = [t for _, t, _ in entries]
        try:
            weights = self.forecaster.coefficients(step, group, times, float(sigma))
        except ForecastError:          # two values at one noise level: fall back to the latest
            return [(entries[-1][2], 1.0)]
        used = entries[-len(weights):]
        return [(slot, w) for (_, _, slot), w in zip(used, weights)]


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

