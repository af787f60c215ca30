"""Statistics of one sampling run: what each step actually ran as, its cost and its time.

The panel, the node's report text and the benchmarks read these; nothing here changes behaviour.
"""
from __future__ import annotations

import dataclasses
import statistics
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
        self.schedule = ""              # the connected schedule's name
        self.schedule_steps = len(planned)   # its own length (the sampler may run another count)
        # "complete", or how the run ended early: set by whoever sees the sampler stop
        # ("cancelled": the user interrupted; "failed: <error>": an exception)
        self.ending = "complete"
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
    def steps_run(self) -> int:
        return sum(1 for r in self.steps if r.calls)

    @property
    def status(self) -> str:
        """complete, cancelled, failed, or partial (ended without an error before its last step)."""
        if self.ending != "complete":
            return self.ending.split(":")[0]
        return "partial" if self.steps_run < len(self.steps) else "complete"

    def timing(self) -> dict:
        """Sampling time and an estimate of it without caching, over the steps that ran.

        Without caching every step that ran would have taken as long as this run's typical full
        step (the median); the time outside the model (sampler, callbacks) stays as measured.
        """
        ran = [r for r in self.steps if r.calls]
        first = self.streams[0] if self.streams else None
        full = [r.seconds for r in ran if r.actual.get(first) == "F"]
        model_seconds = sum(r.seconds for r in ran)
        sampling = max(self.wall_seconds, model_seconds)
        # the median: a first step that also warmed up kernels would inflate a mean
        without = sampling - model_seconds + statistics.median(full) * len(ran) if full else sampling
        return {"sampling_seconds": round(sampling, 4), "seconds_without": round(without, 4),
                "speedup": round(without / sampling, 4) if sampling > 0 else 1.0}

    def headline(self) -> str:
        """The run in a user's words: how much faster, and the time with and without caching."""
        t = self.timing()
        if not self.steps_run:
            return f"{self.status}: no step ran"
        speed = (f"about {t['speedup']:.1f}x faster, sampling {_seconds(t['sampling_seconds'])} "
                 f"(about {_seconds(t['seconds_without'])} without)")
        if self.status == "complete":
            return speed
        how = {"cancelled": "cancelled", "failed": "failed", "partial": "stopped"}[self.status]
        return f"{how} after {self.steps_run} of {len(self.steps)} steps; over those: {speed}"

    @property
    def flops_speedup(self) -> float:
        work = self._flops()
        done = sum(d for d, _ in work)
        full = sum(f for _, f in work)
        return full / done if done > 0 else 1.0

    def summary(self) -> dict:
        stream_names = {s: f"stream {i}" for i, s in enumerate(self.streams)}
        planned_run = [r.planned for r in self.steps if r.calls]
        return {
            "mode": self.mode,
            "model": self.model,
            "schedule": self.schedule,
            "schedule_steps": self.schedule_steps,
            "status": self.status,
            "error": self.ending.partition(": ")[2],
            "steps": len(self.steps),
            "steps_run": self.steps_run,
            "headline": self.headline(),
            **self.timing(),
            # the schedule's own figure, over the steps that ran: steps / full steps planned
            "schedule_speedup": round(len(planned_run) / max(1, planned_run.count(StepKind.FULL)), 4),
            "planned": "".join(str(int(r.planned)) for r in self.steps),
            "actual": {stream_names[s]: self.letters(s) for s in self.streams},
            "stream_labels": stream_labels(self.streams, stream_names),
            # None for a step that never ran (cancelled, failed and partial runs)
            "seconds_per_step": [round(r.seconds, 5) if r.calls else None for r in self.steps],
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
        return (f"ProCache [{self.mode}] {self.model}: {self.headline()}; {c['full']} full / {c['selective']} "
                f"selective / {c['reuse']} reused of {self.steps_run} steps run, "
                f"block FLOPs {self.flops_speedup:.2f}x fewer" + (f"; cache: {self.plan['text']}" if self.plan else ""))


def stream_labels(streams: list[str], names: dict[str, str]) -> dict[str, str]:
    """What a user calls each stream: the host names its streams '<role>-...' or '<role>:...'
    (positive, negative); a role seen more than once is numbered. Unknown ids keep their name."""
    roles = [s.replace(":", "-").split("-")[0] for s in streams]
    labels = {}
    for stream, role in zip(streams, roles):
        if role not in ("positive", "negative"):
            labels[names[stream]] = names[stream]
        elif roles.count(role) > 1:
            labels[names[stream]] = f"{role} {roles[:streams.index(stream) + 1].count(role)}"
        else:
            labels[names[stream]] = role
    return labels


def _seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"
