"""Statistics of one sampling run: what each step actually ran as, its cost and its time.

The panel, the node's report text and the benchmarks read these; nothing here changes behaviour.
"""
from __future__ import annotations

import dataclasses
import time

from .schedule import StepKind


@dataclasses.dataclass
class StepRecord:
    planned: StepKind
    actual: dict[str, str] = dataclasses.field(default_factory=dict)   # stream -> kind letter F/S/R
    seconds: float = 0.0
    flops_done: float = 0.0      # block work actually run
    flops_full: float = 0.0      # block work a full step would have run
    calls: int = 0
    misses: int = 0              # branches that had to compute because nothing usable was cached


class RunStats:
    """Per-step records of one run; created with the run, published when it closes."""

    def __init__(self, planned: list[StepKind], mode: str = "", model: str = ""):
        self.steps = [StepRecord(planned=k) for k in planned]
        self.mode = mode
        self.model = model
        self.streams: list[str] = []
        self.started = time.time()
        self.wall_seconds = 0.0
        self.cache_bytes_peak = 0
        self.plan: dict | None = None       # the cache plan (memory.CachePlan.to_dict) when one was made
        self.notes: list[str] = []
        self.recovered_at: int | None = None     # the step where caching stopped after an out of memory
        self._clock = None

    def computed_in_full_from(self, step: int, clock) -> None:
        """Caching stopped at `step` (out of memory): its failed call and every later step ran in
        full outside the run's bookkeeping. `clock` (the run's StepClock, still told when each step
        ends) says how far the run got, so those steps count as full, not as never run."""
        self.recovered_at, self._clock = step, clock

    def _recovered_steps(self) -> range:
        if self.recovered_at is None:
            return range(0)
        last = max(self.recovered_at, self._clock.last_finished_step)
        return range(self.recovered_at, min(last + 1, len(self.steps)))

    def letters(self, stream: str) -> str:
        """What each step ran as in `stream`: F/S/R, or '-' for a step that did not run."""
        letters = [r.actual.get(stream, "-") for r in self.steps]
        for step in self._recovered_steps():
            letters[step] = "F"
        return "".join(letters)

    def _flops(self) -> list[tuple[float, float]]:
        """(done, full) block work per step; a step computed in full after an out of memory counts
        the work of a full step (the largest one recorded), which the run could not measure."""
        work = [(r.flops_done, r.flops_full) for r in self.steps]
        full_step = max((full for _, full in work), default=0.0)
        for step in self._recovered_steps():
            work[step] = (full_step, full_step)
        return work

    def record_call(self, step: int, streams, kind: StepKind, seconds: float,
                    flops_done: float, flops_full: float, misses: int) -> None:
        rec = self.steps[step]
        rec.calls += 1
        rec.seconds += seconds
        rec.flops_done += flops_done
        rec.flops_full += flops_full
        rec.misses += misses
        actual = StepKind.FULL if misses and kind != StepKind.FULL and flops_done >= flops_full else kind
        for stream in streams:
            if stream not in self.streams:
                self.streams.append(stream)
            previous = rec.actual.get(stream)
            # several calls per step (heun): the step counts as the most expensive thing it did
            order = "RSF"
            letter = actual.letter
            if previous is None or order.index(letter) > order.index(previous):
                rec.actual[stream] = letter

    def count(self, letter: str) -> int:
        """Steps that ran as `letter` (F/S/R) in the first stream."""
        if not self.streams:
            return 0
        return self.letters(self.streams[0]).count(letter)

    @property
    def flops_speedup(self) -> float:
        work = self._flops()
        done = sum(d for d, _ in work)
        full = sum(f for _, f in work)
        return full / done if done > 0 else 1.0

    def summary(self) -> dict:
        stream_names = {s: f"stream {i}" for i, s in enumerate(self.streams)}
        return {
            "mode": self.mode,
            "model": self.model,
            "steps": len(self.steps),
            "planned": "".join(str(int(r.planned)) for r in self.steps),
            "actual": {stream_names[s]: self.letters(s) for s in self.streams},
            "seconds_per_step": [round(r.seconds, 5) for r in self.steps],
            # block work run per step, as a share of a full step (selective steps and routers'
            # partly computed steps lie between 0 and 1); None for a step that never ran
            "compute_share": [round(done / full, 4) if full else None for done, full in self._flops()],
            "counts": {"full": self.count("F"), "selective": self.count("S"), "reuse": self.count("R")},
            "flops_speedup": round(self.flops_speedup, 4),
            "wall_seconds": round(self.wall_seconds, 4),
            "cache_bytes_peak": self.cache_bytes_peak,
            "plan": self.plan,
            "misses": sum(r.misses for r in self.steps),
            "recovered_at_step": self.recovered_at,
            "notes": list(self.notes),
        }

    def line(self) -> str:
        c = self.summary()["counts"]
        return (f"ProCache [{self.mode}] {self.model}: {c['full']} full / {c['selective']} selective / "
                f"{c['reuse']} reused of {len(self.steps)} steps, block FLOPs speedup {self.flops_speedup:.2f}x")
