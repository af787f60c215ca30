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
        first = self.streams[0]
        return sum(1 for r in self.steps if r.actual.get(first) == letter)

    @property
    def flops_speedup(self) -> float:
        done = sum(r.flops_done for r in self.steps)
        full = sum(r.flops_full for r in self.steps)
        return full / done if done > 0 else 1.0

    def summary(self) -> dict:
        stream_names = {s: f"stream {i}" for i, s in enumerate(self.streams)}
        return {
            "mode": self.mode,
            "model": self.model,
            "steps": len(self.steps),
            "planned": "".join(str(int(r.planned)) for r in self.steps),
            "actual": {stream_names[s]: "".join(r.actual.get(s, "-") for r in self.steps) for s in self.streams},
            "seconds_per_step": [round(r.seconds, 5) for r in self.steps],
            # block work run per step, as a share of a full step (selective steps and routers'
            # partly computed steps lie between 0 and 1); None for a step that never ran
            "compute_share": [round(r.flops_done / r.flops_full, 4) if r.flops_full else None for r in self.steps],
            "counts": {"full": self.count("F"), "selective": self.count("S"), "reuse": self.count("R")},
            "flops_speedup": round(self.flops_speedup, 4),
            "wall_seconds": round(self.wall_seconds, 4),
            "cache_bytes_peak": self.cache_bytes_peak,
            "plan": self.plan,
            "misses": sum(r.misses for r in self.steps),
            "notes": list(self.notes),
        }

    def line(self) -> str:
        c = self.summary()["counts"]
        return (f"ProCache [{self.mode}] {self.model}: {c['full']} full / {c['selective']} selective / "
                f"{c['reuse']} reused of {len(self.steps)} steps, block FLOPs speedup {self.flops_speedup:.2f}x")
