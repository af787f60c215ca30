"""Caching schedules: which kind of step each sampler step runs as.

A schedule is a per-step sequence of `StepKind`s in forward denoising order (step 0 is the
noisiest). It travels as a small versioned JSON document, so a schedule can live in a file, in a
workflow's widget text, or in a benchmark table, and always reads back the same.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from typing import Iterable, Sequence

FORMAT_NAME = "procache.schedule"
FORMAT_VERSION = 1
MODEL_LEVEL = "model level"
GRANULARITIES = ("", MODEL_LEVEL)
MAX_STEPS = 10_000          # a schedule longer than this is a typo or an attack, not a sampler run
MAX_DOCUMENT_BYTES = 4 << 20


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message says what to change."""


class StepKind(enum.IntEnum):
    """What a whole step does. The integer values are the paper's pattern digits."""

    REUSE = 0       # every block re-gates its cached branch outputs
    FULL = 1        # every block runs and refreshes its cache
    SELECTIVE = 2   # deep blocks refresh token-wise branches for the top tokens; others reuse

    @property
    def letter(self) -> str:
        return {StepKind.REUSE: "R", StepKind.FULL: "F", StepKind.SELECTIVE: "S"}[self]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A per-step caching pattern plus the metadata a user needs to trust it.

    `units` is optional: a steps x units table of booleans (True = compute) for per-branch
    routers such as HarmoniCa's, with units ordered (attention, MLP) per block. When present it
    refines FULL/REUSE per branch; `kinds` still says what each step is overall.
    """

    kinds: tuple[StepKind, ...]
    name: str = "custom"
    family: str = "any"
    sampler: str = ""
    provenance: str = ""
    notes: tuple[str, ...] = ()
    units: tuple[tuple[bool, ...], ...] | None = None
    # "" lets ProCache Apply's memory budget pick the granularity; MODEL_LEVEL: a search measured one
    # model-level residual clearly closer to full compute than branch level, so under the auto
    # budget the cache keeps only that (an explicit budget still decides for itself)
    granularity: str = ""

    def __post_init__(self):
        kinds = tuple(self.kinds)
        if len(kinds) > MAX_STEPS:      # before converting: a long list is refused at the cost of its length
            raise ScheduleError(f"a schedule has at most {MAX_STEPS} steps, got {len(kinds)}")
        kinds = tuple(StepKind(int(k)) for k in kinds)
        object.__setattr__(self, "kinds", kinds)
        if not kinds:
            raise ScheduleError("a schedule needs at least one step")
        if kinds[0] != StepKind.FULL:
            raise ScheduleError(
                f"step 0 must be full (1): nothing is cached before it; got {int(kinds[0])}")
        if self.units is not None:
            units = tuple(tuple(bool(u) for u in row) for row in self.units)
            if len(units) != len(kinds):
                raise ScheduleError(
                    f"the unit table has {len(units)} rows but the schedule has {len(kinds)} steps")
            if len({len(row) for row in units}) != 1:
                raise ScheduleError("every row of the unit table needs the same number of units")
            object.__setattr__(self, "units", units)
        if self.granularity not in GRANULARITIES:
            raise ScheduleError(f"'granularity' must be one of {', '.join(map(repr, GRANULARITIES))}, "
                                f"got {self.granularity!r}")

    # ---- reading -------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return len(self.kinds)

    def kind_at(self, step: int) -> StepKind:
        if not 0 <= step < len(self.kinds):
            raise IndexError(f"step {step} is outside a {len(self.kinds)}-step schedule")
        return self.kinds[step]

    def count(self, kind: StepKind) -> int:
        return sum(1 for k in self.kinds if k == kind)

    @property
    def pattern(self) -> str:
        """The digits, e.g. '1020102'; what users type and what the panel draws."""
        return "".join(str(int(k)) for k in self.kinds)

    def theoretical_speedup(self, selective_cost: float = 0.0, reuse_cost: float = 0.0) -> float:
        """Full-compute cost over this schedule's cost, in units of one full step.

        `selective_cost` and `reuse_cost` are the fraction of a full step that a selective or a
        reuse step still costs (modulation, the recomputed tokens); both 0 give the step-count ratio.
        """
        cost = (self.count(StepKind.FULL) + selective_cost * self.count(StepKind.SELECTIVE)
                + reuse_cost * self.count(StepKind.REUSE))
        return self.steps / cost

    # ---- changing ------------------------------------------------------------------------
    def with_kinds(self, kinds: Iterable[int], note: str | None = None) -> "Schedule":
        notes = self.notes + ((note,) if note else ())
        return dataclasses.replace(self, kinds=tuple(kinds), notes=notes, units=None)

    def windowed(self, start_percent: float, end_percent: float, force_last_full: bool) -> "Schedule":
        """Force FULL outside [start, end) of the run (fractions of the step count)."""
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ScheduleError(
                f"need 0 <= start_percent <= end_percent <= 1, got {start_percent} and {end_percent}")
        n = self.steps
        first, stop = math.floor(start_percent * n), math.ceil(end_percent * n)
        kinds = [k if first <= i < stop else StepKind.FULL for i, k in enumerate(self.kinds)]
        if force_last_full:
            kinds[-1] = StepKind.FULL
        if kinds == list(self.kinds):
            return self
        units = self.units
        if units is not None:       # a router's forced steps compute every unit
            units = tuple((True,) * len(row) if k == StepKind.FULL else row for k, row in zip(kinds, units))
        return dataclasses.replace(self, kinds=tuple(kinds), units=units)

    def resampled(self, steps: int) -> "Schedule":
        """The same pattern stretched or squeezed to another step count.

        Keeps step 0 full, the share of full steps, the non-increasing order of reuse intervals
        (long early, short late) and the relative position of selective steps in each interval.
        """
        if steps == self.steps:
            return self
        if not 1 <= steps <= MAX_STEPS:
            raise ScheduleError(f"cannot resample to {steps} steps")
        if self.units is not None:
            return self._units_resampled(steps)
        segments = [length for length, _ in full_step_segments(self.kinds)]
        budget = min(steps, max(1, round(len(segments) * steps / self.steps)))
        # Sample the old interval profile at the centre of each new segment, scale it to the new
        # step count, round by largest remainder, then sort so intervals never grow.
        weights = [segments[min(len(segments) - 1, int((i + 0.5) * len(segments) / budget))]
                   for i in range(budget)]
        exact = [w * steps / sum(weights) for w in weights]
        lengths = [max(1, math.floor(e)) for e in exact]
        while sum(lengths) > steps:
            lengths[max(range(budget), key=lambda i: (lengths[i], i))] -= 1
        by_remainder = sorted(range(budget), key=lambda i: (math.floor(e := exact[i]) - e, i))
        for i in range(steps - sum(lengths)):
            lengths[by_remainder[i % budget]] += 1
        lengths.sort(reverse=True)
        had_selective = any(k == StepKind.SELECTIVE for k in self.kinds)
        pattern = pattern_from_segments(lengths)
        if had_selective:
            pattern = inject_selective(pattern)
        note = (f"resampled from {self.steps} to {steps} steps: {len(segments)} -> {budget} full steps, "
                f"intervals kept non-increasing")
        return dataclasses.replace(self, kinds=tuple(pattern), notes=self.notes + (note,), units=None)

    def _units_resampled(self, steps: int) -> "Schedule":
        # A router is trained for one step count; another count takes, for each new step, the
        # row of the nearest old step by position in the run (the first step still computes).
        old = self.steps
        rows = [self.units[0 if steps == 1 else round(i * (old - 1) / (steps - 1))] for i in range(steps)]
        rows[0] = (True,) * len(rows[0])
        kinds = tuple(StepKind.FULL if all(r) else StepKind.REUSE for r in rows)
        note = (f"router resampled from {self.steps} to {steps} steps (nearest step's units); a router is "
                "trained for one step count, train one for {steps} steps for best results").replace("{steps}", str(steps))
        return dataclasses.replace(self, kinds=kinds, units=tuple(rows), notes=self.notes + (note,))

    # ---- JSON ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "name": self.name,
               "family": self.family, "steps": self.steps, "sampler": self.sampler,
               "provenance": self.provenance, "pattern": [int(k) for k in self.kinds]}
        if self.notes:
            doc["notes"] = list(self.notes)
        if self.units is not None:
            doc["units"] = ["".join("1" if u else "0" for u in row) for row in self.units]
        if self.granularity:        # written only when set: files without it read as before
            doc["granularity"] = self.granularity
        return doc

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, doc: dict, where: str = "schedule") -> "Schedule":
        if not isinstance(doc, dict):
            raise ScheduleError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        if doc.get("format") != FORMAT_NAME:
            raise ScheduleError(f"{where}: 'format' must be '{FORMAT_NAME}', got {doc.get('format')!r}")
        version = doc.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
            raise ScheduleError(
                f"{where}: schedule format version {version!r} is not supported (this pack reads 1..{FORMAT_VERSION}); "
                "update the pack or re-save the schedule")
        pattern = doc.get("pattern")
        if isinstance(pattern, list) and len(pattern) > MAX_STEPS:
            raise ScheduleError(f"{where}: the pattern has {len(pattern)} steps; a schedule has at most {MAX_STEPS} steps")
        if not isinstance(pattern, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in pattern):
            raise ScheduleError(f"{where}: 'pattern' must be a list of integers 0, 1, 2")
        bad = sorted({p for p in pattern if p not in (0, 1, 2)})
        if bad:
            raise ScheduleError(f"{where}: pattern values must be 0 (reuse), 1 (full) or 2 (selective); found {bad}")
        steps = doc.get("steps", len(pattern))
        if steps != len(pattern):
            raise ScheduleError(f"{where}: 'steps' says {steps!r} but the pattern has {len(pattern)} entries")
        units = doc.get("units")
        if units is not None:
            if not isinstance(units, list) or not all(isinstance(r, str) and set(r) <= {"0", "1"} for r in units):
                raise ScheduleError(f"{where}: 'units' must be a list of strings of 0/1")
            units = tuple(tuple(c == "1" for c in row) for row in units)
        notes = doc.get("notes", [])
        if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
            raise ScheduleError(f"{where}: 'notes' must be a list of strings")
        text = {key: doc.get(key, "") for key in ("name", "family", "sampler", "provenance", "granularity")}
        for key, value in text.items():
            if not isinstance(value, str):
                raise ScheduleError(f"{where}: '{key}' must be a string")
        try:
            return cls(kinds=tuple(pattern), name=text["name"] or "custom", family=text["family"] or "any",
                       sampler=text["sampler"], provenance=text["provenance"],
                       notes=tuple(notes), units=units, granularity=text["granularity"])
        except ScheduleError as e:
            raise ScheduleError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, text: str, where: str = "schedule") -> "Schedule":
        if len(text.encode("utf-8", "replace")) > MAX_DOCUMENT_BYTES:
            raise ScheduleError(f"{where}: larger than {MAX_DOCUMENT_BYTES >> 20} MiB; not a schedule")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScheduleError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        except RecursionError:
            raise ScheduleError(f"{where}: not a schedule (JSON nested too deeply)") from None
        except ValueError as e:         # e.g. a number of over 4300 digits (Python's conversion limit)
            raise ScheduleError(f"{where}: not a schedule ({str(e)[:100]}); schedules hold small numbers only") from None
        return cls.from_dict(doc, where)


# ---- building schedules ----------------------------------------------------------------------
_REPEAT = re.compile(r"\[([0-2,\s]*)\]\s*[x\*]\s*(\d+)")
_OUTSIDE_GROUPS = re.compile(r"[\s,\[\]+]")


def parse_pattern(text: str, name: str = "typed pattern") -> Schedule:
    """A schedule from text a user types.

    Accepts plain digits ('1002'), separated digits ('1,0,0,2'), repeated groups
    ('[1,0,2,0]x6 + [1,0]x7') or a whole JSON schedule document. The step count is worked out
    from the repeat counts before anything is repeated, so a short text that asks for billions of
    steps is refused at once (ComfyUI validates on its event loop: a slow parse stalls the server).
    """
    text = (text or "").strip()
    if not text:
        raise ScheduleError("the pattern is empty: type digits such as 1,0,0,1,0 (1 full, 0 reuse, 2 selective)")
    if text.startswith("{"):
        return Schedule.from_json(text, where="pattern text")
    if len(text) > 8 * MAX_STEPS:
        raise ScheduleError(f"the pattern text is too long ({len(text)} characters, at most {8 * MAX_STEPS}): "
                            "write long runs as repeated groups, e.g. [1,0,0]x20")
    pieces = _pattern_pieces(text)
    steps = sum(len(digits) * times for digits, times in pieces)
    if steps > MAX_STEPS:
        raise ScheduleError(f"the pattern makes {steps} steps; a schedule has at most {MAX_STEPS} steps: "
                            "lower the repeat counts")
    kinds = [int(c) for digits, times in pieces for c in digits * times]
    return Schedule(kinds=tuple(kinds), name=name, provenance="typed by the user")


def _pattern_pieces(text: str) -> list[tuple[str, int]]:
    """(digits, times) for each part of a typed pattern, in order, nothing repeated yet."""
    pieces, end = [], 0
    for match in _REPEAT.finditer(text):
        pieces.append((_digits_outside_groups(text[end:match.start()]), 1))
        count = match.group(2).lstrip("0") or "0"
        if len(count) > len(str(MAX_STEPS)) or int(count) > MAX_STEPS:
            shown = count if len(count) <= 12 else f"of {len(count)} digits"
            raise ScheduleError(f"the pattern's repeat count {shown} is too large: a schedule has at most "
                                f"{MAX_STEPS} steps")
        pieces.append((re.sub(r"[^012]", "", match.group(1)), int(count)))
        end = match.end()
    pieces.append((_digits_outside_groups(text[end:]), 1))
    return [(digits, times) for digits, times in pieces if digits and times]


def _digits_outside_groups(part: str) -> str:
    bad = sorted(set(_OUTSIDE_GROUPS.sub("", part)) - set("012"))
    if bad:
        shown = "".join(bad) if len(bad) <= 20 else "".join(bad[:20]) + "..."
        raise ScheduleError(
            f"the pattern may only contain 0 (reuse), 1 (full), 2 (selective), commas and [group]xN; found {shown!r}")
    return re.sub(r"[^012]", "", part)


def uniform(steps: int, interval: int, name: str | None = None) -> Schedule:
    """FORA-style: a full step every `interval` steps, reuse in between."""
    if steps < 1:
        raise ScheduleError(f"steps must be at least 1, got {steps}")
    if interval < 1:
        raise ScheduleError(f"the interval must be at least 1 (1 = no caching), got {interval}")
    kinds = [StepKind.FULL if i % interval == 0 else StepKind.REUSE for i in range(steps)]
    return Schedule(kinds=tuple(kinds), name=name or f"uniform-every-{interval}",
                    provenance=f"uniform: full every {interval} steps")


def full_step_segments(kinds: Sequence[int]) -> list[tuple[int, int]]:
    """(length, start) of each segment that begins with a full step."""
    starts = [i for i, k in enumerate(kinds) if k == StepKind.FULL]
    return [(end - start, start) for start, end in zip(starts, starts[1:] + [len(kinds)])]


def pattern_from_segments(lengths: Iterable[int]) -> list[int]:
    """Segment lengths -> digits: each segment is a full step followed by reuse steps."""
    out: list[int] = []
    for length in lengths:
        out += [1] + [0] * (length - 1)
    return out


def inject_selective(pattern: Sequence[int]) -> list[int]:
    """ProCache's injection: inside each run of reuse steps, every even (1-based) position
    becomes selective, so a selective step never directly follows a full one."""
    out, run = [], 0
    for p in pattern:
        if p == StepKind.FULL:
            run = 0
            out.append(int(p))
            continue
        run += 1
        out.append(int(StepKind.SELECTIVE) if run % 2 == 0 else int(StepKind.REUSE))
    return out
