"""EOC-style correction of reused branch outputs with a prior of how they change between steps.

EOC (Error-Optimized Cache) sits on top of any caching schedule: it does not decide when a branch
is reused, it shrinks the error of the value that is reused. Its authors published no code; the
parts below marked "reconstructed" are ours (docs/eoc.md says which follow the paper).

- Prior (follows the paper's prior knowledge extraction, kept as a running mean instead of the
  authors' per-class dumps): P[s][k][u], the mean over calibration samples of the full-compute
  pre-gate output of unit u (block, branch) at step k, per CFG stream s. "token" pooling keeps a
  per-token tensor, "channel" pooling keeps only the per-channel mean over tokens (memory-bounded:
  one vector per step and unit).
- Judgment (reconstructed): a reuse of unit u at step k from the value filled at step c is
  corrected when the prior's relative drift E = |P[k] - P[c]| / |P[c]| reaches `threshold` AND the
  expected gain of the correction on a new sample is above `min_gain`. The gain comes from
  calibration statistics of the per-sample reuse error D = F_k - F_c (gap k - c):
      gain(gamma) = (2 gamma m - gamma^2 |dP|^2) / E|D|^2
  with dP = P[k] - P[c] and m = |dP|^2 minus the sampling noise of that mean (an unbiased estimate
  of the squared true mean drift). It is the expected share of the reuse error the correction
  removes; it is negative where the drift differs from sample to sample more than the prior can
  tell, which is where a token-wise prior hurts on unseen seeds (method.md 5.5). Gaps the
  calibration did not record are judged on E alone.
- Correction (reconstructed, the GOC-family form): reused = cached + gamma * (P[k] - P[c]).

Correction off (gamma 0, no prior, or nothing judged) hands back the cached tensor itself, so a
run is bit-identical to plain reuse.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
from typing import Callable, Hashable, Iterable, Sequence

import torch

from .schedule import StepKind
from .safetensors_header import sorted_header

FORMAT = "procache.eoc_prior"
VERSION = 1
POOLINGS = ("token", "channel")
MAX_JSON_BYTES = 64 << 20
# Channel priors take a few MiB; token priors grow with tokens x channels x steps x branches and
# beyond this are impractical to hold in memory anyway (pool by channel instead).
MAX_PRIOR_BYTES = 1 << 30
MAX_HEADER_BYTES = 100 << 20        # safetensors' own limit for the JSON header
_SEP = "|"

log = logging.getLogger("procache")


class EOCError(ValueError):
    """A prior or correction setting that cannot be used; the message says why."""


def pooled(value: torch.Tensor, pooling: str) -> torch.Tensor:
    """Per-sample pooled branch output: [B, *token dims, C] -> [B, *token dims, C] or [B, C]."""
    if pooling == "channel" and value.ndim >= 3:
        return value.flatten(1, -2).mean(1)
    return value


def _mean_square(x: torch.Tensor) -> float:
    return float(x.double().square().mean())


def _last_fill(kinds: Sequence[int], step: int) -> int | None:
    for c in range(step - 1, -1, -1):
        if kinds[c] == StepKind.FULL:
            return c
    return None


class StreamOrder:
    """CFG streams by order of first appearance in a run (ComfyUI gives them new ids every run)."""

    def __init__(self):
        self.ordinals: dict[str, int] = {}

    def __call__(self, stream: str) -> int:
        return self.ordinals.setdefault(stream, len(self.ordinals))


# ---- the prior ------------------------------------------------------------------------------
UnitKey = tuple      # (block index, branch name)


class Prior:
    """Mean branch outputs per (stream ordinal, step, unit) and reuse-error statistics per gap.

    means[(s, k, (block, branch))]: float32 tensor, shape value.shape[1:] (token) or [C] (channel).
    stats[(s, k, (block, branch), gap)]: (samples, sum of mean-square D, sum of mean-square pooled D)
    with D = F_k - F_{k-gap} per sample.
    """

    def __init__(self, pooling: str, means: dict, counts: dict | None = None, stats: dict | None = None,
                 metadata: dict | None = None):
        if pooling not in POOLINGS:
            raise EOCError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.means = {k: v.detach().to("cpu", torch.float32) for k, v in means.items()}
        self.units = frozenset(u for _, _, u in self.means)
        self.counts = dict(counts or {})
        self.stats = {k: tuple(float(x) for x in v) for k, v in (stats or {}).items()}
        self.metadata = dict(metadata or {})

    def __deepcopy__(self, memo):
        return self          # read-only once built; ComfyUI deep-copies model options on clone

    @property
    def steps(self) -> int:
        return 1 + max((k for _, k, _ in self.means), default=-1)

    @property
    def streams(self) -> int:
        return 1 + max((s for s, _, _ in self.means), default=-1)

    @property
    def samples(self) -> int:
        return min(self.counts.values(), default=0)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.means.values())

    def describe(self) -> str:
        units = len({u for _, _, u in self.means})
        return (f"EOC prior ({self.pooling}): {self.samples} samples, {self.steps} steps, {units} units, "
                f"{self.streams} streams, {self.nbytes / 2**20:.1f} MiB")

    # ---- file formats: safetensors, and JSON carrying the same bytes ----------------------------
    def to_bytes(self) -> bytes:
        from safetensors.torch import save
        tensors = {_name("mean", s, k, u): v.contiguous() for (s, k, u), v in self.means.items()}
        for (s, k, u, gap), (n, full, pool) in self.stats.items():
            tensors[_name("stats", s, k, u, gap)] = torch.tensor([n, full, pool], dtype=torch.float64)
        counts = {_name("count", s, k, u): n for (s, k, u), n in self.counts.items()}
        header = {"format": FORMAT, "version": str(VERSION), "pooling": self.pooling,
                  "counts": json.dumps(counts), "metadata": json.dumps(self.metadata)}
        return sorted_header(save(tensors, metadata=header))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "EOC prior") -> "Prior":
        from safetensors.torch import load
        if len(data) > MAX_PRIOR_BYTES:
            raise EOCError(f"{where}: larger than {MAX_PRIOR_BYTES >> 20} MiB; {_SMALLER}")
        header = _checked_header(_header_bytes(data[:8], lambda n: data[8:8 + n], where), where)
        try:
            tensors = load(data)
        except Exception as e:      # noqa: BLE001  (safetensors raises several types)
            raise EOCError(f"{where}: not a readable safetensors prior ({e}); {_AGAIN}") from None
        means, stats = {}, {}
        for name, value in tensors.items():
            kind, *key = _parse(name, where)
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise EOCError(f"{where}: tensor {name!r} is not all finite numbers; {_AGAIN}")
            if kind == "mean":
                means[tuple(key)] = value
            elif kind == "stats" and value.numel() == 3:
                stats[tuple(key)] = tuple(value.tolist())
        try:
            return cls(header.get("pooling", ""), means, header["counts"], stats, header["metadata"])
        except EOCError as e:
            raise EOCError(f"{where}: {e}") from None

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def load(cls, path: str) -> "Prior":
        """A prior file, its size and header checked before its tensors are read."""
        where = check_file(path)
        with open(path, "rb") as f:
            data = f.read(MAX_PRIOR_BYTES + 1)          # never more than the limit, whatever the file grew to
        return cls.from_bytes(data, where)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "pooling": self.pooling,
                           "summary": self.describe(), "metadata": self.metadata,
                           "safetensors": base64.b64encode(self.to_bytes()).decode("ascii")})

    @classmethod
    def from_json(cls, text: str, where: str = "EOC prior text") -> "Prior":
        if len(text) > MAX_JSON_BYTES:
            raise EOCError(f"{where} is larger than {MAX_JSON_BYTES >> 20} MiB; {_SMALLER}")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise EOCError(f"{where} is not valid JSON ({e}); connect EOC Prior Extractor or clear the text") from None
        except (ValueError, RecursionError) as e:       # numbers of over 4300 digits, nesting past the stack
            raise EOCError(f"{where} is not an EOC prior ({str(e)[:100]}); connect EOC Prior Extractor") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise EOCError(f"{where} is not an EOC prior (format should be {FORMAT!r})")
        if doc.get("version") != VERSION:
            raise EOCError(f"{where}: EOC prior version {str(doc.get('version'))[:40]!r} is not supported "
                           f"(this pack reads {VERSION}); {_AGAIN}")
        try:
            data = base64.b64decode(doc["safetensors"], validate=True)
        except (KeyError, TypeError, ValueError) as e:
            raise EOCError(f"{where} has no readable 'safetensors' field ({e}); {_AGAIN}") from None
        return cls.from_bytes(data, where)


def _name(kind: str, stream: int, step: int, unit: UnitKey, gap: int | None = None) -> str:
    block, branch = unit
    parts = [kind, str(stream), str(step), str(block), str(branch)] + ([str(gap)] if gap is not None else [])
    return _SEP.join(parts)


def _parse(name: str, where: str = "EOC prior") -> list:
    parts = name.split(_SEP)
    numbers = [parts[i] for i in (1, 2, 3, 5) if i < len(parts)]
    if len(parts) not in (5, 6) or not all(n.isascii() and n.isdigit() and len(n) <= 9 for n in numbers):
        raise EOCError(f"{where}: unexpected tensor name {name[:80]!r} (kind|stream|step|block|branch[|gap]); {_AGAIN}")
    kind, stream, step, block, branch = parts[:5]
    out = [kind, int(stream), int(step), (int(block), branch)]
    return out + [int(parts[5])] if len(parts) == 6 else out


_AGAIN = "extract the prior again with EOC Prior Extractor"
_SMALLER = "extract a smaller one (pooling 'channel', or fewer steps)"


def check_file(path: str) -> str:
    """Check a prior file's size and header without reading its tensors (cheap enough for
    validation); returns how messages name the file. EOCError saying what is wrong otherwise."""
    where = f"EOC prior file {os.path.basename(path)!r}"
    size = os.path.getsize(path)
    if size > MAX_PRIOR_BYTES:
        raise EOCError(f"{where} is {size >> 20} MiB, larger than the {MAX_PRIOR_BYTES >> 20} MiB a prior may have; "
                       f"{_SMALLER}")
    with open(path, "rb") as f:
        _checked_header(_header_bytes(f.read(8), f.read, where), where)
    return where


def _header_bytes(length: bytes, read, where: str) -> bytes:
    """The JSON header of safetensors bytes; `read(n)` gives the n bytes after the length."""
    size = int.from_bytes(length, "little") if len(length) == 8 else -1
    if not 0 < size <= MAX_HEADER_BYTES:
        raise EOCError(f"{where}: not a readable safetensors file (no header); {_AGAIN}")
    header = read(size)
    if len(header) != size:
        raise EOCError(f"{where}: the file is cut short; {_AGAIN}")
    return header


def _checked_header(raw: bytes, where: str) -> dict:
    """The prior's metadata with 'counts' and 'metadata' decoded; EOCError naming the field otherwise."""
    try:
        header = json.loads(raw)
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("'__metadata__' is not an object")
    except (ValueError, AttributeError, RecursionError) as e:
        raise EOCError(f"{where}: the safetensors header is not valid JSON ({e}); {_AGAIN}") from None
    if meta.get("format") != FORMAT:
        raise EOCError(f"{where}: not an EOC prior (format should be {FORMAT!r}, got {str(meta.get('format'))[:40]!r})")
    if meta.get("version") != str(VERSION):
        raise EOCError(f"{where}: EOC prior version {str(meta.get('version'))[:40]!r} is not supported "
                       f"(this pack reads {VERSION}); {_AGAIN}")
    out = dict(meta)
    try:
        counts = json.loads(meta.get("counts", "{}"))
        if not isinstance(counts, dict):
            raise ValueError(f"a JSON {type(counts).__name__}")
        out["counts"] = {tuple(_parse(n, where)[1:]): _count(c) for n, c in counts.items()}
    except EOCError:
        raise
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise EOCError(f"{where}: its 'counts' metadata should be a JSON object of tensor name -> sample count, "
                       f"not {str(e)[:120]}; {_AGAIN}") from None
    try:
        metadata = json.loads(meta.get("metadata", "{}"))
        if not isinstance(metadata, dict):
            raise ValueError(f"a JSON {type(metadata).__name__}")
        out["metadata"] = metadata
    except (ValueError, TypeError, RecursionError) as e:
        raise EOCError(f"{where}: its 'metadata' should be a JSON object, not {str(e)[:120]}; {_AGAIN}") from None
    return out


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a count of {str(value)[:40]}")
    return value


class PriorRecorder:
    """Builds a Prior during full-compute runs; the engine calls `observe` (Run(recorder=...)).

    Running means, so memory is one prior (not one dump per sample). For the reuse-error
    statistics it keeps each unit's last `max_gap` full outputs per stream, and, with `kinds` (the
    host schedule), the output at each of its fill steps, so the statistics cover the schedule's
    own reuse gaps whatever their length.
    """

    grouping = "role"       # what the engine's recorder hook asks for; unused here

    def __init__(self, pooling: str = "channel", max_gap: int = 2, kinds: Sequence[int] | None = None):
        if pooling not in POOLINGS:
            raise EOCError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if max_gap < 0:
            raise EOCError(f"max_gap must be >= 0, got {max_gap}")
        self.pooling = pooling
        self.max_gap = max_gap
        self.kinds = [int(k) for k in kinds] if kinds is not None else None
        self.means: dict = {}
        self.counts: dict = {}
        self.stats: dict = {}
        self._history: dict = {}       # (stream ordinal, unit) -> [(step, tensor)], newest last
        self._order = StreamOrder()
        self._last_step = -1

    def __deepcopy__(self, memo):
        return self          # ComfyUI deep-copies model options on clone; runs must fill this one

    def observe(self, streams: Sequence[str], key: Hashable, group: str, step: int, value: torch.Tensor) -> None:
        if step < self._last_step:
            self._order = StreamOrder()           # a new sampling run: its streams have new ids
            self._history.clear()
        self._last_step = step
        unit = (int(key[0]), str(key[1]))
        parts = value.chunk(len(streams), dim=0) if len(streams) > 1 else (value,)
        for stream, part in zip(streams, parts):
            s = self._order(stream)
            part = part.detach().float()
            self._accumulate((s, step, unit), pooled(part, self.pooling))
            self._record_gaps(s, step, unit, part)

    def _accumulate(self, key, samples: torch.Tensor) -> None:
        b = samples.shape[0]
        n = self.counts.get(key, 0) + b
        batch_mean = samples.mean(0)
        mean = self.means.get(key)
        if mean is None or mean.shape != batch_mean.shape:
            self.means[key], self.counts[key] = batch_mean.clone(), b
            return
        mean.add_(batch_mean - mean, alpha=b / n)     # running mean, exact for any batch sizes
        self.counts[key] = n

    def _record_gaps(self, s: int, step: int, unit: UnitKey, part: torch.Tensor) -> None:
        history = self._history.setdefault((s, unit), [])
        fill = None
        if self.kinds is not None and step < len(self.kinds) and self.kinds[step] != StepKind.FULL:
            fill = _last_fill(self.kinds, step)
        for c, old in history:
            gap = step - c
            if old.shape != part.shape or not (gap <= self.max_gap or c == fill):
                continue
            diff = part - old
            full = diff.square().flatten(1).mean(1).double()
            pool = pooled(diff, self.pooling).square().flatten(1).mean(1).double()
            n, f, p = self.stats.get((s, step, unit, gap), (0, 0.0, 0.0))
            self.stats[(s, step, unit, gap)] = (n + part.shape[0], f + float(full.sum()), p + float(pool.sum()))
        history.append((step, part))
        fills = [c for c, _ in history if self.kinds is not None and c < len(self.kinds) and self.kinds[c] == StepKind.FULL]
        latest_fill = max(fills, default=None)
        history[:] = [(c, v) for c, v in history if step - c < self.max_gap or c == latest_fill]

    def prior(self, metadata: dict | None = None) -> Prior:
        if not self.means:
            raise EOCError("nothing was recorded: the model runs no branch-level family, or no run happened")
        return Prior(self.pooling, self.means, self.counts, self.stats, metadata)


# ---- judgment and correction ------------------------------------------------------------------
class Correction:
    """A prior plus the correction settings; what ProCache Apply and the reference sampler take.

    gamma: correction strength (0 = plain reuse). threshold: minimum relative prior drift E.
    min_gain: minimum expected share of the reuse error removed (None: judge on E alone).
    end: only steps before this share of the prior's steps are corrected (on the reference DiT the
        correction helps the early steps and not the late ones, see docs/eoc.md).
    steps: only these schedule steps are corrected (None: any step), e.g. from `judge_by_trial`.
    """

    def __init__(self, prior: Prior, gamma: float = 0.5, threshold: float = 0.0, min_gain: float | None = 0.0,
                 steps: Iterable[int] | None = None, end: float = 1.0):
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and 0.0 <= gamma <= 2.0):
            raise EOCError(f"gamma must be between 0 and 2, got {gamma}")
        if threshold < 0:
            raise EOCError(f"threshold must be >= 0, got {threshold}")
        self.prior = prior
        self.gamma = float(gamma)
        self.threshold = float(threshold)
        self.min_gain = None if min_gain is None else float(min_gain)
        self.steps = None if steps is None else frozenset(int(k) for k in steps)
        if not 0.0 <= end <= 1.0:
            raise EOCError(f"end must be between 0 and 1, got {end}")
        self.end = float(end)
        self._judged: dict = {}

    def restricted(self, steps: Iterable[int] | None) -> "Correction":
        """The same correction, on `steps` only."""
        return Correction(self.prior, self.gamma, self.threshold, self.min_gain, steps, self.end)

    def __deepcopy__(self, memo):
        return self

    def judge(self, stream: int, step: int, fill: int, unit: UnitKey) -> tuple[bool, float, float | None]:
        """(correct?, relative drift E, expected gain or None) for a reuse at `step` from `fill`."""
        key = (stream, step, fill, unit)
        cached = self._judged.get(key)
        if cached is None:
            cached = self._judge(*key)
            self._judged[key] = cached
        return cached

    def _judge(self, stream, step, fill, unit):
        means = self.prior.means
        now, then = means.get((stream, step, unit)), means.get((stream, fill, unit))
        if now is None or then is None or now.shape != then.shape or self.gamma == 0.0:
            return False, 0.0, None
        if (self.steps is not None and step not in self.steps) or step >= self.end * self.prior.steps:
            return False, 0.0, None
        drift_sq = _mean_square(now - then)
        base_sq = _mean_square(then)
        drift = math.sqrt(drift_sq / base_sq) if base_sq > 0 else 0.0
        gain = self.expected_gain(stream, step, fill, unit, drift_sq)
        ok = drift_sq > 0 and drift >= self.threshold and (gain is None or self.min_gain is None or gain > self.min_gain)
        return ok, drift, gain

    def expected_gain(self, stream, step, fill, unit, drift_sq: float) -> float | None:
        stats = self.prior.stats.get((stream, step, unit, step - fill))
        if stats is None:
            return None
        n, full, pool = stats
        if n < 2 or full <= 0:
            return None
        variance = max(pool / n - drift_sq, 0.0) * n / (n - 1)      # of the pooled per-sample drift
        signal = drift_sq - variance / n                              # unbiased |true mean drift|^2
        g = self.gamma
        return (2 * g * signal - g * g * drift_sq) / (full / n)

    def delta(self, stream: int, step: int, fill: int, unit: UnitKey) -> torch.Tensor | None:
        """gamma * (P[step] - P[fill]) in the prior's pooled shape, or None when not judged."""
        if not self.judge(stream, step, fill, unit)[0]:
            return None
        means = self.prior.means
        return self.gamma * (means[(stream, step, unit)] - means[(stream, fill, unit)])

    def plan(self, kinds: Sequence[int], units: Iterable[UnitKey] | None = None,
             streams: Iterable[int] | None = None) -> dict[int, list]:
        """Which (stream, unit) each reuse step of the schedule corrects: {step: [(stream, unit)]}."""
        units = sorted({u for _, _, u in self.prior.means}) if units is None else list(units)
        streams = range(self.prior.streams) if streams is None else list(streams)
        out: dict[int, list] = {}
        for k, kind in enumerate(kinds):
            fill = _last_fill(kinds, k) if kind != StepKind.FULL else None
            if fill is None:
                continue
            picked = [(s, u) for s in streams for u in units if self.judge(s, k, fill, u)[0]]
            if picked:
                out[k] = picked
        return out

    def describe(self) -> str:
        gain = "off" if self.min_gain is None else f"> {self.min_gain:g}"
        steps = "" if self.steps is None else f", steps {_ranges(sorted(self.steps))}"
        steps += "" if self.end >= 1.0 else f", first {self.end:.0%} of the steps"
        return (f"EOC gamma {self.gamma:g}, drift >= {self.threshold:g}, expected gain {gain}{steps}; "
                f"{self.prior.describe()}")


def _ranges(steps: list[int]) -> str:
    if not steps:
        return "none"
    parts, start = [], steps[0]
    for prev, cur in zip(steps, steps[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def judge_by_trial(run: Callable[[Correction | None], torch.Tensor], reference: torch.Tensor,
                   correction: Correction, kinds: Sequence[int], should_stop: Callable[[], None] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Which reuse steps of a schedule the correction improves, measured (reconstructed judgment).

    Smaller branch errors do not always mean a better image: on the reference DiT the prior's drift
    lowers the branch error at every step, but correcting the later steps moves the final image away
    from full compute. So each reuse step the statistics accept is tried alone on calibration
    samples: run(c) samples them with the host schedule and correction c (None: plain reuse) and
    returns the final latents; a step is kept when its correction lowers the mean squared error
    to `reference` (their full-compute latents). Costs one run per candidate step, plus one.

    Returns {"pattern", "gamma", "steps": kept steps, "ratios": {step: error / plain error}}.
    """
    def error(c):
        if should_stop is not None:
            should_stop()
        return float((run(c).double() - reference.double()).square().mean())
    candidates = sorted(correction.plan(kinds))
    total = len(candidates) + 1
    plain = error(None)
    if progress is not None:
        progress(1, total)
    ratios, kept = {}, []
    for i, step in enumerate(candidates):
        ratio = error(correction.restricted([step])) / plain if plain > 0 else 1.0
        ratios[step] = ratio
        if ratio < 1.0:
            kept.append(step)
        if progress is not None:
            progress(i + 2, total)
    return {"pattern": "".join(str(int(k)) for k in kinds), "gamma": correction.gamma, "steps": kept,
            "ratios": ratios}


class CorrectionState:
    """Per-run side of the correction: stream ordinals, fill steps, counts. The engine calls
    `filled` when a branch is computed in full and `correct` when it is reused.

    A prior that does not fit the run (another model, resolution or guidance) corrects nothing
    there; each such reason is logged once and added to `notes` (the runtime passes the run's
    statistics notes, so the report and the panel say it), never skipped silently."""

    def __init__(self, correction: Correction, notes: list[str] | None = None):
        self.correction = correction
        self.notes = notes if notes is not None else []
        self._skipped: set = set()
        self.order = StreamOrder()
        self.fills: dict = {}                 # (stream id, unit key) -> step of the cached value
        self.corrected: dict[int, int] = {}   # step -> corrected stream chunks (tests, reports)
        self._deltas: dict = {}               # this step's deltas on the device, by (ordinal, unit, dtype)
        self._delta_step = -1

    def filled(self, streams: Sequence[str], key: Hashable, step: int) -> None:
        for stream in streams:
            self.order(stream)
            self.fills[(stream, key)] = step

    def correct(self, streams: Sequence[str], key: Hashable, step: int, cached: torch.Tensor) -> torch.Tensor:
        """cached + gamma * prior drift per stream chunk; `cached` itself when nothing applies."""
        if self.correction.gamma == 0.0 or cached.ndim < 2:
            return cached
        if step != self._delta_step:
            self._deltas.clear()
            self._delta_step = step
        unit = (int(key[0]), str(key[1]))
        chunks = cached.chunk(len(streams), dim=0) if len(streams) > 1 else (cached,)
        if len(chunks) != len(streams):
            return cached
        out, changed = [], False
        for stream, chunk in zip(streams, chunks):
            delta = self._delta(stream, key, unit, step, chunk)
            if delta is None:
                out.append(chunk)
            else:
                out.append(chunk + delta)
                changed = True
        if not changed:
            return cached
        self.corrected[step] = self.corrected.get(step, 0) + sum(o is not c for o, c in zip(out, chunks))
        return out[0] if len(out) == 1 else torch.cat(out, dim=0)

    def _delta(self, stream, key, unit, step, chunk):
        fill = self.fills.get((stream, key))
        if fill is None or fill >= step:
            return None
        s = self.order(stream)
        memo = (s, fill, unit, chunk.dtype, chunk.device)
        if memo not in self._deltas:
            delta = self.correction.delta(s, step, fill, unit) if self._fits(s, unit) else None
            if delta is not None:
                shaped = _broadcastable(delta, chunk, self.correction.prior.pooling)
                if shaped is None:
                    self._skip("shape", f"the prior's values have shape {list(delta.shape)} but this run's are "
                                        f"{list(chunk.shape[1:])} per sample (another resolution, token layout or "
                                        "model width); extract the prior at this latent size and model")
                delta = shaped
            if delta is not None:
                delta = delta.to(device=chunk.device, dtype=chunk.dtype)
            self._deltas[memo] = delta
        return self._deltas[memo]

    def _fits(self, s: int, unit) -> bool:
        prior = self.correction.prior
        if unit not in prior.units:
            made_on = prior.metadata.get("settings", {}).get("model") if isinstance(prior.metadata.get("settings"), dict) else None
            self._skip("model", f"the prior has no values for this model's branch {unit[1]!r} of block {unit[0]} "
                                f"(it was extracted on {made_on or 'another model'}); extract a prior on this model")
            return False
        if s >= prior.streams:
            self._skip("streams", f"this run has more CFG streams than the prior's {prior.streams} (extracted at "
                                  "another cfg); extract the prior with the cfg you sample with")
            return False
        return True

    def _skip(self, reason: str, why: str) -> None:
        if reason not in self._skipped:
            self._skipped.add(reason)
            note = f"EOC correction skipped where it does not fit: {why}"
            self.notes.append(note)
            log.warning("ProCache: %s", note)


def _broadcastable(delta: torch.Tensor, chunk: torch.Tensor, pooling: str) -> torch.Tensor | None:
    """The delta shaped to add to `chunk` (batch and, for channel pooling, tokens broadcast)."""
    if pooling == "channel" and chunk.ndim >= 3:
        if delta.shape != chunk.shape[-1:]:
            return None
        return delta.view(*([1] * (chunk.ndim - 1)), -1)
    if delta.shape != chunk.shape[1:]:
        return None          # another resolution or token layout than the prior's
    return delta.unsqueeze(0)
