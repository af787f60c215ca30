"""The cache plan: what each granularity would hold, and the finest one that fits a budget.

At real sizes one cached tensor is tens of MiB (FLUX 1024²) to most of a GiB (Wan 14B 720p), and
branch-level caching keeps one per branch, per block, per CFG stream, times the forecaster's
history. So before the first block of a sampler run computes, the engine takes a *census*: one
model call run on fake tensors (no compute, no memory) that records what a full step would store,
block by block. A `Rung` says which blocks keep their branches and which blocks are grouped into
residual *spans* (one residual per span: the span's output minus its input); `planned_bytes`
turns census + rung into the bytes the cache store will hold at its peak, and `choose` walks the
ladder from finest to coarsest until the plan fits the budget:

    branch level in every block
    -> branch level in the first blocks (a reuse error there runs through every later block),
       residual spans over the deeper ones
    -> residual spans of k blocks
    -> one model-level residual (the output of the whole model, as the step-skipping caches keep)

Budgets are bytes; "auto" is a share of the cache device's free memory at run start, and a budget
may also be given in residuals: one latent-token x hidden tensor per CFG stream, what the
step-skipping caches keep, so a budget of 8 residuals means the same at every resolution.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Iterable

import torch

GIB = 1 << 30
AUTO_SHARE = 0.15           # "auto": this share of the cache device's free memory at run start


class BudgetError(ValueError):
    """A budget text that cannot be read; the message says what to write instead."""


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much the cache may hold. kind: auto | unlimited | minimal | bytes | residuals."""

    kind: str = "auto"
    amount: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Budget":
        raw = str(text).strip().lower()
        if raw in ("", "auto"):
            return cls("auto")
        if raw in ("unlimited", "none", "off"):
            return cls("unlimited")
        if raw in ("minimal", "min"):
            return cls("minimal")
        match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|residuals?|r)?", raw)
        if match is None:
            raise BudgetError(f"the budget {text!r} is not understood: write auto, minimal, unlimited, a size such "
                              "as 4 GiB or 512 MiB, or a count of residuals such as 8 residuals")
        amount, unit = float(match.group(1)), match.group(2) or "gib"
        if not math.isfinite(amount) or amount > 1e6:
            raise BudgetError(f"the budget {text!r} is out of range: give at most 1000000 GiB or residuals")
        if unit.startswith("r"):
            return cls("residuals", amount)
        return cls("bytes", amount * (GIB if unit.startswith("g") else 1 << 20))

    def limit(self, free_bytes: int | None, residual_bytes: int, streams: int) -> int | None:
        """The budget in bytes for this run (None: no limit; 0: the minimal rung)."""
        if self.kind == "unlimited":
            return None
        if self.kind == "minimal":
            return 0
        if self.kind == "bytes":
            return int(self.amount)
        if self.kind == "residuals":
            return int(self.amount * residual_bytes * streams)
        return None if free_bytes is None else int(free_bytes * AUTO_SHARE)

    def describe(self) -> str:
        if self.kind == "bytes":
            return format_bytes(self.amount)
        if self.kind == "residuals":
            return f"{self.amount:g} residuals"
        return self.kind


def format_bytes(n: float) -> str:
    n = float(n)
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


@dataclasses.dataclass
class Sizes:
    """The byte tables of a census as an 8-bit store would hold them (codes plus a scale per token)."""

    values: dict[int, dict[str, int]] = dataclasses.field(default_factory=dict)
    extras: dict[int, int] = dataclasses.field(default_factory=dict)
    corrections: dict[int, int] = dataclasses.field(default_factory=dict)
    carry: dict[int, int | None] = dataclasses.field(default_factory=dict)
    model: int = 0


@dataclasses.dataclass
class Census:
    """What one full step of this run stores, block by block, for the streams of one call.

    values: block -> branch name -> bytes of the branch's cached value (forecasts keep `history`
        of them).
    extras: block -> bytes stored once per block whatever the history (selection references,
        staleness, attention scores, kept inputs).
    corrections: block -> bytes of the offsets selective steps keep when forecasting.
    carry: block -> bytes of the residual a span ending at this block stores (None: the block's
        outputs do not all match its inputs, so no span may end there).
    stacks: the block index ranges of each block list (a span never crosses two lists).
    model: bytes of the model-level residual (the model's output).
    residual: bytes of one residual per stream (one latent-token x hidden tensor): the unit of
        budgets given in residuals.
    """

    streams: int = 1
    values: dict[int, dict[str, int]] = dataclasses.field(default_factory=dict)
    extras: dict[int, int] = dataclasses.field(default_factory=dict)
    corrections: dict[int, int] = dataclasses.field(default_factory=dict)
    carry: dict[int, int | None] = dataclasses.field(default_factory=dict)
    stacks: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    model: int = 0
    residual: int = 0
    eight_bit: Sizes = dataclasses.field(default_factory=Sizes)

    @property
    def num_blocks(self) -> int:
        return max((end for _, end in self.stacks), default=0)

    def per_stream(self, streams: int) -> "Census":
        """The census scaled from the streams it was taken on to `streams` (CFG passes run apart
        carry the same shapes: one latent, one text length per family)."""
        if streams == self.streams:
            return self
        scale = lambda n: None if n is None else n * streams // self.streams  # noqa: E731

        def scaled(sizes):
            return dict(values={b: {k: scale(v) for k, v in d.items()} for b, d in sizes.values.items()},
                        extras={b: scale(v) for b, v in sizes.extras.items()},
                        corrections={b: scale(v) for b, v in sizes.corrections.items()},
                        carry={b: scale(v) for b, v in sizes.carry.items()}, model=scale(sizes.model))
        return Census(streams=streams, stacks=list(self.stacks), residual=self.residual,
                      eight_bit=Sizes(**scaled(self.eight_bit)), **scaled(self))


@dataclasses.dataclass(frozen=True)
class Rung:
    """One granularity: blocks cached per branch, residual spans (first, last block, inclusive),
    or the model-level residual."""

    branch_blocks: frozenset = frozenset()
    spans: tuple[tuple[int, int], ...] = ()
    model_level: bool = False
    quantize: str | None = None         # "int8" / "fp8": the store keeps 8-bit codes (cache.py)

    @property
    def kind(self) -> str:
        if self.model_level:
            return "model"
        if not self.spans:
            return "branch"
        return "mixed" if self.branch_blocks else "spans"

    def span_of(self, block: int) -> tuple[int, int] | None:
        for first, last in self.spans:
            if first <= block <= last:
                return first, last
        return None

    def describe(self, num_blocks: int) -> str:
        text = self._granularity(num_blocks)
        return f"{text}, 8-bit ({self.quantize})" if self.quantize else text

    def _granularity(self, num_blocks: int) -> str:
        if self.model_level:
            return "one model-level residual"
        if not self.spans:
            return f"branch level in all {num_blocks} blocks"
        lengths = sorted({last - first + 1 for first, last in self.spans})
        span = f"{'/'.join(map(str, lengths))}-block residual spans"
        if not self.branch_blocks:
            return f"{span} ({len(self.spans)} spans)"
        return f"branch level in {len(self.branch_blocks)} of {num_blocks} blocks, {span} elsewhere"


BRANCH_LEVEL = Rung()
MODEL_LEVEL = Rung(model_level=True)


Phases = tuple  # ((values kept per entry, selective offsets held), ...): the states a run passes through


def planned_bytes(census: Census, rung: Rung, phases: Phases = ((1, False),)) -> int:
    """Peak bytes of the cache store for `rung`.

    phases: the states the run passes through (Run.phases): how many values each entry holds
    (a forecaster's history fills one slot per full step) and whether selective steps' offsets
    are held (forecasting runs keep them until the next full step drops them). Entries stored
    once (selection references, staleness, scores) are there from the first full step on.
    """
    sizes = census.eight_bit if rung.quantize else census
    if rung.model_level:
        return sizes.model * max(slots for slots, _ in phases)
    values = extras = corrections = 0
    for first, last in rung.spans:
        values += sizes.carry.get(last) or 0
    for block in range(census.num_blocks):
        if block in rung.branch_blocks or (not rung.spans and block in census.values):
            values += sum(sizes.values.get(block, {}).values())
            extras += sizes.extras.get(block, 0)
            corrections += sizes.corrections.get(block, 0)
    return max(slots * values + (corrections if held else 0) for slots, held in phases) + extras


def ladder(census: Census, deep_blocks: Iterable[int] = (), quantize: str | None = None,
           quantize_all: bool = False, keep_first: str = "shallow") -> list[Rung]:
    """The rungs from finest to coarsest that this census allows.

    keep_first: which blocks keep their branches longest. "shallow" (default): the first blocks,
        the deepest go into spans first. Measured on the trained reference DiT (50 steps, same
        bytes): branch level in blocks 0-3 with 2-block spans over 4-7 lands 40.1 dB from full
        compute, the other way round 37.3; a reuse error in a shallow block runs through every
        later one. "deep": the `deep_blocks` (where selective steps refresh tokens) first.
    Spans grow in length k = 1, 2, 4, ... up to a whole block list. A block list whose blocks do not
    hand back what they take (no span may end there) keeps branch level in every rung but the
    model-level one.
    """
    n = census.num_blocks
    if n == 0:
        return [MODEL_LEVEL]
    spannable = {b for b in range(n) if census.carry.get(b) is not None}
    fixed = frozenset(range(n)) - spannable          # blocks that can only be cached per branch
    if keep_first == "deep":
        deep = [b for b in sorted(set(deep_blocks), reverse=True) if b in spannable]
        order = deep + [b for b in range(n - 1, -1, -1) if b in spannable and b not in deep]
    else:
        order = sorted(spannable)
    m = len(order)
    # most blocks at branch level first
    counts = sorted({keep for keep in (m * 3 // 4, *[m >> s for s in range(1, 8)], 1, 0) if 0 <= keep < m},
                    reverse=True)
    rungs = [BRANCH_LEVEL]
    longest = max(last - first for first, last in census.stacks) + 1
    lengths = [1]
    while lengths[-1] < longest:
        lengths.append(min(lengths[-1] * 2, longest))
    for keep in counts:
        branch = fixed | frozenset(order[:keep])
        for k in lengths:
            spans = _spans(census.stacks, branch, k)
            if spans:
                rungs.append(Rung(branch_blocks=branch, spans=spans))
    rungs.append(MODEL_LEVEL)
    unique = []
    for r in rungs:
        if r not in unique:
            unique.append(r)
    if quantize is None:
        return unique
    if quantize_all:
        return [dataclasses.replace(r, quantize=quantize) for r in unique]
    # 8-bit when needed: each granularity first as it is, then in 8 bits (a few hundredths of a dB,
    # cheaper in quality than the next coarser granularity)
    return [q for r in unique for q in (r, dataclasses.replace(r, quantize=quantize))]


def _spans(stacks, branch_blocks, k: int) -> tuple[tuple[int, int], ...]:
    """Runs of consecutive non-branch blocks within each block list, cut into spans of at most k."""
    spans = []
    for first, end in stacks:
        run = []
        for b in range(first, end + 1):
            if b < end and b not in branch_blocks:
                run.append(b)
                continue
            for i in range(0, len(run), k):
                chunk = run[i:i + k]
                spans.append((chunk[0], chunk[-1]))
            run = []
    return tuple(spans)


@dataclasses.dataclass
class CachePlan:
    """The rung a run uses and what it holds, with every rung it looked at."""

    rung: Rung
    bytes: int
    budget: int | None
    device: str
    num_blocks: int
    considered: list[tuple[str, int]] = dataclasses.field(default_factory=list)   # (rung, bytes)
    reason: str = ""
    budget_source: str = ""         # how the budget was set, e.g. "auto: 15% of 21.4 GiB free"

    def text(self, peak: int | None = None) -> str:
        budget = "no budget" if self.budget is None else f"budget {format_bytes(self.budget)}"
        if self.budget_source:
            budget += f", {self.budget_source}"
        line = f"{self.rung.describe(self.num_blocks)}: {format_bytes(self.bytes)} on {self.device} ({budget})"
        if peak is not None:
            line += f", peak {format_bytes(peak)}"
        if self.reason:
            line += f"; {self.reason}"
        return line

    def to_dict(self, peak: int | None = None) -> dict:
        return {"rung": self.rung.kind, "granularity": self.rung.describe(self.num_blocks), "bytes": self.bytes,
                "budget": self.budget, "device": self.device, "branch_blocks": len(self.rung.branch_blocks),
                "spans": len(self.rung.spans), "considered": [list(c) for c in self.considered],
                "text": self.text(peak)}


def choose(census: Census, budget: int | None, device: str, *, phases: Phases = ((1, False),),
           deep_blocks: Iterable[int] = (), quantize: str | None = None, quantize_all: bool = False) -> CachePlan:
    """The finest rung whose plan fits `budget` (None: the finest rung).

    quantize / quantize_all: 8-bit rungs after each granularity, or every rung in 8 bits.
    """
    rungs = ladder(census, deep_blocks, quantize, quantize_all)     # never empty: it ends at the model level
    considered = []
    for rung in rungs:
        size = planned_bytes(census, rung, phases)
        considered.append((rung.describe(census.num_blocks), size))
        if budget is None or size <= budget:
            return CachePlan(rung, size, budget, device, census.num_blocks, considered)
    rung = rungs[-1]
    size = planned_bytes(census, rung, phases)
    return CachePlan(rung, size, budget, device, census.num_blocks, considered,
                     reason="even this exceeds the budget; it is the smallest cache there is")


# The cache precision choices of ProCache Apply: (8-bit format the ladder may use, for every rung).
PRECISIONS = {
    "model dtype": (None, False),
    "8-bit when needed": ("int8", False),
    "int8": ("int8", True),
    "fp8": ("fp8", True),
}
# Apply's default: at every budget that fits branch level in model dtype nothing changes; below it,
# branch level in 8 bits keeps all of its quality on the reference DiT (R = 8: 42.56 dB against 37.68
# for the coarser rung in model dtype, benchmarks/results/memory_quality.md), so 8 bits come before
# coarser granularity.
DEFAULT_PRECISION = "8-bit when needed"


@contextlib.contextmanager
def fake_tensors():
    """Run model code on fake tensors: shapes, dtypes and storage sizes without compute or memory.
    Real weights and inputs are read as fakes of themselves."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield
