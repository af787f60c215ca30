"""Policies decide what each block does at each step; the engine does it.

One mechanism, many methods: FORA, ProCache and the benchmark baselines are all policies over the
same block machinery, so they are compared on equal terms.
"""
from __future__ import annotations

from typing import Protocol

from .router import unit_columns
from .schedule import Schedule, ScheduleError, StepKind


class Policy(Protocol):
    def step_kind(self, step: int) -> StepKind:
        """What the step as a whole is (for statistics and model-level fallback)."""

    def block_kind(self, step: int, block: int, num_blocks: int) -> StepKind:
        """What block `block` of `num_blocks` does at `step`."""

    def refreshes(self, block: int, num_blocks: int) -> bool:
        """Whether the block ever recomputes tokens (so its full steps keep scoring state)."""


class SchedulePolicy:
    """Follows a per-step schedule; selective steps touch only the deepest blocks.

    deep_fraction: share of blocks (the deepest) that recompute tokens on selective steps;
        the paper uses the deepest 25 %. Shallower blocks reuse on selective steps.
    """

    def __init__(self, schedule: Schedule, deep_fraction: float = 0.25):
        if not 0.0 <= deep_fraction <= 1.0:
            raise ValueError(f"deep_fraction must be in [0, 1], got {deep_fraction}")
        self.schedule = schedule
        self.deep_fraction = deep_fraction

    def step_kind(self, step: int) -> StepKind:
        return StepKind.FULL if step == 0 else self.schedule.kind_at(step)

    def first_deep_block(self, num_blocks: int) -> int:
        return num_blocks - round(self.deep_fraction * num_blocks)

    def refreshes(self, block: int, num_blocks: int) -> bool:
        return StepKind.SELECTIVE in self.schedule.kinds and block >= self.first_deep_block(num_blocks)

    def block_kind(self, step: int, block: int, num_blocks: int) -> StepKind:
        kind = self.step_kind(step)
        if self.schedule.units is not None and kind != StepKind.FULL:
            # a router's step: the block runs whole when both its units compute
            row = self._unit_row(step, num_blocks)
            return StepKind.FULL if row[2 * block] and row[2 * block + 1] else StepKind.REUSE
        if kind == StepKind.SELECTIVE and block < self.first_deep_block(num_blocks):
            return StepKind.REUSE
        return kind

    def branch_kind(self, step: int, block: int, num_blocks: int, role: str) -> StepKind:
        """What one branch of `role` does; a schedule with a unit table (a router) decides per
        unit (router.unit_columns: attention vs MLP; cross-attention is not routed)."""
        kind = self.block_kind(step, block, num_blocks)
        if self.schedule.units is None or kind == StepKind.FULL:
            return kind
        columns = unit_columns(block, role)
        row = self._unit_row(step, num_blocks)
        return StepKind.FULL if not columns or any(row[c] for c in columns) else StepKind.REUSE

    def _unit_row(self, step: int, num_blocks: int) -> tuple[bool, ...]:
        self.check_units(num_blocks)
        return self.schedule.units[step]

    def check_units(self, num_blocks: int) -> None:
        """ScheduleError unless the unit table (if any) has the two units of each of `num_blocks`
        blocks; the runtime calls it before the first step, so a wrong router stops nothing midway."""
        units = self.schedule.units
        if units is not None and len(units[0]) != 2 * num_blocks:
            raise ScheduleError(f"the router has {len(units[0])} units per step but this model has {num_blocks} blocks "
                                f"({2 * num_blocks} units): it was trained for another model; train one on this "
                                "model with HarmoniCa Router Trainer, or load one made for it")
