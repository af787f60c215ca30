"""The caching engine: runs each transformer block as FULL, REUSE or SELECTIVE.

A `Run` lives for one sampling run. For every model call it asks the clock which step this is and
the policy what each block does, then attaches itself to the model's blocks for the duration of
that call only (instance attributes removed in `finally`), so nothing stays patched between calls
and the model is never modified outside a run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Sequence

import torch
from torch import nn

from .cache import CacheStore
from .clock import StepClock
from .families.base import Branch, BlockStack, FamilySpec, ProbeContext, forward_hooks, linear_params, resolve
from .eoc import Correction, CorrectionState
from .forecast import Forecaster, ForecastFitter, ForecastState, group_name
from .memory import (BRANCH_LEVEL, MODEL_LEVEL, Budget, CachePlan, Census, Rung, choose, fake_tensors, ladder,
                     planned_bytes)
from .policy import Policy
from .rung_check import RungCheck
from .schedule import StepKind
from .stats import RunStats
from .tokens import SelectionContext, TokenSelector, gather_tokens, scatter_tokens

_MISSING = object()


class CacheMiss(Exception):
    """A branch must be reused but nothing usable is cached; the block runs in full instead."""


@dataclasses.dataclass
class _CallWork:
    flops_done: float = 0.0
    flops_full: float = 0.0
    misses: int = 0
    computed: int = 0        # branch computations on all tokens
    selective: int = 0       # branch computations on a subset of tokens


class Run:
    """State of one sampling run: clock, cache, statistics. Freed by `close()`."""

    def __init__(self, policy: Policy, clock: StepClock, family: FamilySpec | None,
                 selector: TokenSelector | None = None, cache_device=None, model_name: str = "",
                 forecaster: Forecaster | None = None, recorder: ForecastFitter | None = None,
                 eoc: Correction | None = None):
        self.policy = policy
        self.clock = clock
        self.family = family
        self.selector = selector or TokenSelector()
        self.cache = CacheStore(cache_device)
        # Forecasting (None: reuse copies the last full value) and calibration recording.
        self.forecast = ForecastState(forecaster, clock.sigmas) if forecaster is not None else None
        self.recorder = recorder
        # EOC: reused values get the prior's drift since their fill step (None: plain reuse).
        self.eoc = CorrectionState(eoc) if eoc is not None else None
        planned = [policy.step_kind(clock.offset + k) for k in range(clock.steps)]
        self.stats = RunStats(planned, mode=f"branch:{family.name}" if family else "model-level",
                              model=model_name)
        self.branch_calls = [0] * clock.steps   # full-token branch computations per step (tests, panel)
        self.selected_tokens = [0] * clock.steps  # tokens recomputed on selective steps, per step
        self.policy_steps = clock.offset + clock.steps
        # The last step that can read the cache; full steps after it store nothing (an all-full
        # schedule caches nothing at all: holding outputs nobody reads costs memory traffic).
        self.last_cached_step = max((clock.offset + k for k, kind in enumerate(planned) if kind != StepKind.FULL),
                                    default=-1)
        self._cost_cache: dict[int, int] = {}
        self._started = time.perf_counter()
        self.closed = False
        # Granularity (memory.py): which blocks keep branches, which form residual spans, or the
        # model-level residual; branch level everywhere until a plan says otherwise.
        self.rung = BRANCH_LEVEL if family is not None else MODEL_LEVEL
        self.plan: CachePlan | None = None
        self.block_flops: dict[int, float] = {}     # full-step branch FLOPs per block (spans count them)
        self.carry_maps: dict[int, tuple] = {}      # block -> which input each output continues
        self.census: Census | None = None           # what a full step stores (make_plan)
        self.recording: Census | None = None        # set on the scout run that takes a census
        self.quantize_options: tuple = (None, False)  # 8-bit format the ladder may use, for every rung
        self.rung_check: RungCheck | None = None    # the rung against one model-level residual (rung_check.py)
        # Block FLOPs of a computed call, per number of streams: a run that moves to the model-level
        # residual mid-run keeps counting its work in the same units.
        self.call_flops: dict[int, float] = {}

    # ---- the sampler's side ------------------------------------------------------------------
    def sampler_callback(self, user_callback: Callable | None,
                         on_step: Callable[[int], None] | None = None) -> Callable:
        """A sampler callback that ends the step on the clock, then calls the user's (previews)."""
        def callback(step, *args, **kwargs):
            self.clock.step_finished(step)
            if on_step is not None:
                on_step(step)
            if user_callback is not None:
                return user_callback(step, *args, **kwargs)
        return callback

    @contextlib.contextmanager
    def model_call(self, model: nn.Module, sigma: float, streams: Sequence[str]):
        """Attach to `model` for one call at noise level `sigma` with these CFG streams."""
        step = self.clock.step_for(sigma, tuple(streams))
        if self.rung_check is not None and self.rung_check.switches_before(self.clock.offset + step):
            self._switch_to_model_level()
        call = _Call(self, step, tuple(streams), model, float(sigma))
        started = time.perf_counter()
        try:
            with call.attached():
                yield call
        finally:
            w = call.work
            if call.step_kind == StepKind.FULL and w.flops_full > 0 and not self.rung.model_level:
                self.call_flops[len(call.streams)] = w.flops_full
            self.stats.record_call(step, call.streams, call.step_kind, time.perf_counter() - started,
                                   w.flops_done, w.flops_full, w.misses)
            self.branch_calls[step] += w.computed
            if self.recording is None:      # a census stores fake tensors: nothing to measure
                self.stats.cache_bytes_peak = max(self.stats.cache_bytes_peak, self.cache.nbytes)

    def close(self) -> RunStats:
        """Free every cached tensor; safe to call twice (error paths)."""
        if not self.closed:
            self.closed = True
            if self.forecast is not None:
                self.stats.notes.extend(self.forecast.report())
            self.cache.clear()
            if self.rung_check is not None:     # it never switched: say what it measured
                self.stats.notes.append(self.rung_check.text(self._rung_text()))
                self.rung_check.free()
            self.stats.wall_seconds = time.perf_counter() - self._started
            if self.plan is not None:
                self.stats.plan = self.plan.to_dict(self.stats.cache_bytes_peak)
        return self.stats

    # ---- memory plan ---------------------------------------------------------------------------
    @property
    def phases(self) -> tuple[tuple[int, bool], ...]:
        """The states this run's cache passes through (memory.planned_bytes): values held per
        entry (a forecaster's history fills a slot per full step) and whether selective steps'
        offsets from the forecast are held (until the next full step drops them)."""
        if self.forecast is None:
            return ((1, False),)
        forecaster = self.forecast.forecaster
        routed = getattr(getattr(self.policy, "schedule", None), "units", None) is not None
        states, fulls, held = set(), 0, False
        for k in range(self.clock.steps):
            kind = self.policy.step_kind(self.clock.offset + k)
            if kind == StepKind.FULL or routed:
                fulls, held = fulls + 1, False
            elif kind == StepKind.SELECTIVE and fulls:
                held = True
            states.add((forecaster.slots_after(fulls), held))
        return tuple(sorted(states))

    def stores_at(self, step: int) -> bool:
        """Whether a full step's values are kept: some later step reads them (or a forecast's history)."""
        return step <= self.last_cached_step or self.forecast is not None

    def prefetches(self, device) -> bool:
        """The cache is in host memory and the model on a GPU: copy the next block's values ahead."""
        return self.cache.device is not None and self.cache.device.type == "cpu" and device is not None \
            and torch.device(device).type == "cuda"

    def keeps_branches(self, index: int) -> bool:
        return not self.rung.model_level and (not self.rung.spans or index in self.rung.branch_blocks)

    def take_census(self, model: nn.Module, sigma: float, streams: Sequence[str], call_model: Callable) -> Census:
        """What a full step of this run stores, block by block: `call_model()` (one model call, as
        the sampler makes it) runs on fake tensors through a scout copy of this run that stores
        everything at branch level, so nothing is computed or allocated."""
        scout = Run(self.policy, StepClock(self.clock.sigmas, offset=self.clock.offset), self.family,
                    selector=self.selector, forecaster=self.forecast.forecaster if self.forecast else None)
        scout.last_cached_step = 1 << 30        # store as if a later step read everything
        census = Census(streams=len(streams))
        scout.recording = census
        handles = []
        # hooks of other nodes (and tests) never see the census: it is not a model call
        hidden = [(m, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()
                  if m._forward_pre_hooks or m._forward_hooks]
        for m, _, _ in hidden:
            m._forward_pre_hooks.clear()
            m._forward_hooks.clear()
        if self.family is not None:
            first = 0
            for stack in self.family.stacks:
                count = len(getattr(model, stack.attr))
                census.stacks.append((first, first + count))
                first += count
            for index, _, block in self.family.blocks(model):
                handles.append(block.register_forward_hook(_census_carry(census, index), with_kwargs=True))
        handles.append(model.register_forward_hook(_census_model(census), with_kwargs=True))
        try:
            with fake_tensors(), torch.no_grad(), scout.model_call(model, sigma, streams):
                call_model()
        finally:
            for handle in handles:
                handle.remove()
            for m, pre, post in hidden:
                m._forward_pre_hooks.update(pre)
                m._forward_hooks.update(post)
        for key, size, size8 in scout.cache.items():
            if key[0] == "model" or not isinstance(key[0], int):
                continue
            index, name, *rest = key
            if not rest or rest[0] == "history":
                census.values.setdefault(index, {})[name] = size
                census.eight_bit.values.setdefault(index, {})[name] = size8
            else:       # selection references, staleness, attention scores, kept inputs
                census.extras[index] = census.extras.get(index, 0) + size
                census.eight_bit.extras[index] = census.eight_bit.extras.get(index, 0) + size8
        return census

    def make_plan(self, census: Census, budget: Budget, free_bytes: int | None, device: str,
                  streams: int | None = None, quantize: str | None = None, quantize_all: bool = False) -> CachePlan:
        """Choose the finest rung that fits `budget` for `streams` CFG streams and use it.
        quantize: an 8-bit format the ladder may use (after each granularity in full precision,
        or for every rung with quantize_all)."""
        self.quantize_options = (quantize, quantize_all)
        census = census.per_stream(streams or census.streams)
        limit = budget.limit(free_bytes, census.residual, census.streams)
        if self.family is None:         # no branches to keep: the model-level residual is the only rung
            census = dataclasses.replace(census, stacks=[], values={}, carry={})
        plan = choose(census, limit, device, phases=self.phases, deep_blocks=self.deep_blocks(census),
                      quantize=quantize, quantize_all=quantize_all)
        self.census, self.plan = census, plan
        if plan.rung.model_level and self.rung_check is not None:     # nothing coarser to check against
            self.rung_check.free()
            self.rung_check = None
        self._use_rung(plan.rung)
        return plan

    def deep_blocks(self, census: Census) -> list[int]:
        """The blocks selective steps refresh (the ladder can keep them at branch level first)."""
        return [b for b in range(census.num_blocks) if self.policy.refreshes(b, census.num_blocks)]

    def _use_rung(self, rung: Rung) -> None:
        self.rung = rung
        if self.cache.quantize != rung.quantize:    # before anything is stored, or after a clear
            self.cache.clear()
            self.cache = CacheStore(self.cache.device, quantize=rung.quantize)

    def coarsen(self, why: str) -> CachePlan | None:
        """Free the cache and move the rest of the run to the next coarser rung (after an
        allocation failure). None when the run already holds the smallest rung."""
        self.cache.clear()
        census = self.census
        if census is None:          # no plan was made: the model-level residual needs no census
            self.rung = MODEL_LEVEL
            return None
        rungs = ladder(census, self.deep_blocks(census), *self.quantize_options)
        if self.rung == rungs[-1]:
            return None
        rung = rungs[rungs.index(self.rung) + 1] if self.rung in rungs[:-1] else rungs[-1]
        if rung == self.rung:
            return None
        if self.rung_check is not None:     # the check's residual is memory too
            self.rung_check.free()
            self.rung_check = None
        self._replan(rung, why)
        self._use_rung(rung)
        return self.plan

    def _replan(self, rung: Rung, why: str) -> None:
        """The plan for the rest of the run moves to `rung`, keeping the budget it was made for."""
        previous, census = self.plan, self.census
        if census is None:
            return
        self.plan = CachePlan(rung, planned_bytes(census, rung, self.phases),
                              previous.budget if previous else None, previous.device if previous else "?",
                              census.num_blocks, previous.considered if previous else [], reason=why,
                              budget_source=previous.budget_source if previous else "")

    def start_rung_check(self, steps: int = 2) -> None:
        """Measure this run's rung against one model-level residual at its first full steps
        (rung_check.py); a no-op where the model-level residual is the rung already."""
        if self.family is None or self.rung.model_level or self.eoc is not None or self.recorder is not None:
            return          # EOC and calibration runs read every cached step as it is
        forecast = None
        if self.forecast is not None:
            forecast = ForecastState(self.forecast.forecaster, self.clock.sigmas)
        self.rung_check = RungCheck(self.cache.device, forecast, steps)

    def _rung_text(self) -> str:
        return self.rung.describe(self.census.num_blocks) if self.census is not None else "branch level"

    def _switch_to_model_level(self) -> None:
        check, self.rung_check = self.rung_check, None
        self.stats.notes.append(check.text(self._rung_text()))
        # the check's store already holds the model-level residual (and history) of the full steps so far
        self.cache.clear()
        self.rung, self.cache = MODEL_LEVEL, check.store
        if self.forecast is not None:
            self.forecast = check.forecast
        self._replan(MODEL_LEVEL, "the rung check measured it clearly closer to full compute")

    def branch_cost(self, block: nn.Module, branch: Branch, rows: int) -> float:
        key = id(block), branch.name
        params = self._cost_cache.get(key)
        if params is None:
            paths = branch.cost_paths or (branch.path,)
            params = sum(linear_params(m) for m in (resolve(block, p) for p in paths) if m is not None)
            self._cost_cache[key] = params
        width = getattr(block, "hidden_size", None) or 0
        attention = 4.0 * rows * rows * width if branch.attention else 0.0
        return 2.0 * rows * params + attention


class _Call:
    """One model call: which step, which streams, what each block does."""

    def __init__(self, run: Run, step: int, streams: tuple[str, ...], model: nn.Module, sigma: float = 0.0):
        self.run = run
        self.step = step
        self.sigma = sigma
        self.schedule_step = run.clock.offset + step
        self.streams = streams
        self.model = model
        self.step_kind = run.policy.step_kind(self.schedule_step)
        self.work = _CallWork()
        self._num_blocks = 0
        self._recomputing = False
        self.probe_notes: dict = {}     # facts a family's probes share across this call's blocks
        self._prefetched: set = set()   # blocks whose cached values were copied ahead (cache_on_cpu)
        self._guessing = False          # the rung check's pass: every block as on a cached step

    # ---- attaching ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def attached(self):
        with contextlib.ExitStack() as stack:
            forecast = self.run.forecast
            if forecast is not None and forecast.forecaster.frequency_cutoff is not None:
                stack.enter_context(_input_noted(self.model, forecast))
            if self.run.family is None or self.run.rung.model_level:
                stack.enter_context(_instance_forward(self.model, self._model_level_forward))
                yield
                return
            blocks = self.run.family.blocks(self.model)
            self._num_blocks = len(blocks)
            self._spans: dict[tuple[int, int], dict] = {}     # this call's state of each residual span
            for index, block_stack, block in blocks:
                for branch in block_stack.branches:
                    module = resolve(block, branch.path)
                    if module is None:      # an optional branch this block does not have
                        continue
                    stack.enter_context(_instance_forward(module, self._tap(index, block, branch)))
                span = self.run.rung.span_of(index)
                if span is not None:
                    stack.enter_context(_instance_forward(block, self._span_forward(index, span)))
                elif block_stack.reuse_forward is not None:
                    stack.enter_context(_instance_forward(block, self._block_forward(index, block, block_stack)))
            if self.run.rung_check is not None and self.step_kind == StepKind.FULL:
                stack.enter_context(_instance_forward(self.model, self._checked_forward))
            yield

    def block_kind(self, index: int) -> StepKind:
        if self._guessing:
            return StepKind.REUSE
        return self.run.policy.block_kind(self.schedule_step, index, self._num_blocks)

    def _checked_forward(self, original):
        """A full step during the rung check: first the output a cached step would give (no block
        work, nothing counted), then the real one, and both guesses scored against it."""
        def forward(x, *args, **kwargs):
            check = self.run.rung_check
            if check.forecast is not None:      # the sampler's damping is known only once sampling starts
                check.forecast.damping = self.run.forecast.damping
            guess = self._cached_pass(original, x, args, kwargs) if check.has_previous(self.streams) else None
            out = original(x, *args, **kwargs)
            check.record(self.streams, self.schedule_step, self.sigma, x, out, guess)
            return out
        return forward

    def _cached_pass(self, original, x, args, kwargs):
        saved = self.work, self._spans
        self.work, self._spans, self._guessing = _CallWork(), {}, True
        try:
            return original(x, *args, **kwargs)
        finally:
            self.work, self._spans = saved
            self._guessing, self._prefetched = False, set()

    def branch_kind(self, index: int, branch: Branch) -> StepKind:
        """The block's kind, refined per branch where the policy routes units (HarmoniCa)."""
        kind = self.block_kind(index)
        per_branch = getattr(self.run.policy, "branch_kind", None)
        if kind == StepKind.FULL or per_branch is None or self._guessing:
            return kind
        return per_branch(self.schedule_step, index, self._num_blocks, branch.role)

    def _tap(self, index: int, block: nn.Module, branch: Branch):
        def make(original):
            def forward(*args, **kwargs):
                if self._recomputing:     # a family's selective code calling the module itself
                    return original(*args, **kwargs)
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                rows = None
                if branch.token_wise and x is not None:
                    def rows(idx, tokens, kept):
                        return original(gather_tokens(tokens, idx), *args[1:], **kwargs)
                return self.branch(index, block, branch, self.branch_kind(index, branch), like=x,
                                   full=lambda: self._probed(index, block, branch.probes, original, args, kwargs),
                                   tokens=(lambda: token_rows(x)) if x is not None else None, rows=rows, inputs=args)
            return forward
        return make

    def _block_forward(self, index: int, block: nn.Module, block_stack: BlockStack):
        branches = {b.name: b for b in block_stack.branches}

        def make(original):
            def forward(*args, **kwargs):
                kind = self.block_kind(index)
                if kind == StepKind.FULL:
                    return self._probed(index, block, block_stack.probes, original, args, kwargs)
                kinds = {name: self.branch_kind(index, b) for name, b in branches.items()}
                if any(kinds[name] == StepKind.FULL and not b.token_wise for name, b in branches.items()):
                    # a router computes an attention unit here: the block's own code runs, and the
                    # taps reuse the branches routed off
                    return original(*args, **kwargs)

                def branch(name, like, tokens=None, rows=None):
                    b, full = branches[name], None
                    if kinds[name] == StepKind.FULL:        # a token-wise branch a router computes
                        if tokens is None:
                            raise CacheMiss((index, name))
                        full = functools.partial(self._untapped, resolve(block, b.path), tokens)
                    return self.branch(index, block, b, kinds[name], like=like, tokens=tokens, rows=rows, full=full)
                branch.kind = kind          # families may skip input work that only refreshes need
                try:
                    return block_stack.reuse_forward(block, branch, *args, **kwargs)
                except CacheMiss:
                    if any(k == StepKind.FULL for k in kinds.values()):
                        return original(*args, **kwargs)    # routed: the taps decide per branch
                    self.work.misses += 1
                    return self._full_block(index, original, args, kwargs)
            return forward
        return make

    def _span_forward(self, index: int, span: tuple[int, int]):
        """A block inside a residual span: the span's first block adds the cached (or forecast)
        residual of the whole span to its inputs, the others hand their inputs on; on full steps
        (or when nothing usable is cached) every block runs its own code and the last one stores
        the span's output minus its input."""
        first, last = span

        def make(original):
            def forward(*args, **kwargs):
                run = self.run
                state = self._spans.setdefault(span, {})
                kind = self.block_kind(first)       # a span computes or reuses as a whole
                carry = run.carry_maps.get(index)
                if kind != StepKind.FULL and not state.get("computing") and carry is not None:
                    if index != first:
                        return _carried(carry, args, kwargs)
                    reused = self._reused_span(span, carry, args, kwargs)
                    if reused is not None:
                        self._prefetch(last + 1, next(t for t in _flat(reused) if t is not None).device)
                        self.work.flops_full += sum(run.block_flops.get(b, 0.0) for b in range(first, last + 1))
                        return reused
                    self.work.misses += 1
                if kind != StepKind.FULL:
                    state["computing"] = True
                if index == first and run.stores_at(self.schedule_step):
                    # a copy: blocks may add into their inputs in place (freed at the span's end)
                    state["inputs"] = ({i: a.clone() for i, a in enumerate(args) if torch.is_tensor(a)},
                                       {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)})
                before = self.work.flops_full
                out = original(*args, **kwargs) if kind == StepKind.FULL else \
                    self._full_block(index, original, args, kwargs)
                run.block_flops[index] = self.work.flops_full - before
                if carry is None:
                    carry = run.carry_maps[index] = carry_map(args, kwargs, out)
                if index == last and "inputs" in state:
                    self._store_span(span, out, state.pop("inputs"))
                return out
            return forward
        return make

    def _prefetch(self, block: int, device) -> None:
        """Start the host-to-GPU copies of what `block` will read, while this block computes."""
        run = self.run
        if block in self._prefetched or block >= self._num_blocks or not run.prefetches(device):
            return
        self._prefetched.add(block)
        for key in run.cache.keys():
            if key[0] == block and (len(key) == 2 or key[2] in ("history", "correction")) or \
                    key[0] == "span" and key[1] == block:
                run.cache.prefetch(self.streams, key, device)

    def _reused_span(self, span, carry, args, kwargs):
        is_tuple, locations = carry
        parts = []
        for j, location in enumerate(locations):
            if location is None:
                parts.append(None)
                continue
            x = _input_at(location, args, kwargs)
            residual = self._reused(("span", *span, j), "span", x.device)
            if residual is None or residual.shape != x.shape:
                return None
            parts.append((x + residual).to(residual.dtype))
        return tuple(parts) if is_tuple else parts[0]

    def _store_span(self, span, out, inputs):
        carry = self.run.carry_maps.get(span[0])
        if carry is None:
            return
        outs = out if carry[0] else (out,)
        for j, location in enumerate(carry[1]):
            if location is None:
                continue
            x = _input_at(location, *inputs)
            self._remember(("span", *span, j), (outs[j] - x).to(outs[j].dtype))

    def _reused(self, key, group: str, device) -> torch.Tensor | None:
        """A cached value for this call: the stored one, or its forecast from the stored history."""
        run = self.run
        if run.forecast is None:
            return run.cache.get(self.streams, key, device=device)
        return run.forecast.value(run.cache, self.streams, key, self.schedule_step, group, self.sigma, device)

    def _remember(self, key, value: torch.Tensor) -> None:
        """Store a full step's value (into the forecaster's history when forecasting)."""
        run = self.run
        if run.forecast is None:
            run.cache.put(self.streams, key, value)
        else:       # forecasts read the history slots only: K values per entry, not K + 1
            run.forecast.store(run.cache, self.streams, key, self.schedule_step, self.sigma, value)
            run.cache.discard(self.streams, key + ("correction",))

    def _untapped(self, module, tokens):
        self._recomputing = True        # the module's tap hands straight to its own forward
        try:
            return module(tokens())
        finally:
            self._recomputing = False

    def _probed(self, index, block, probes, original, args, kwargs):
        """original(*args, **kwargs); where the selector's score is an attention score the family
        measures here, the family's probe reads q/k with forward hooks while the block runs."""
        probe = next((p for score, p in probes if score == self.run.selector.score), None)
        if probe is None:
            return original(*args, **kwargs)
        run, step = self.run, self.schedule_step

        def store(scores):
            for name, value in scores.items():
                run.cache.put(self.streams, (index, name, "importance"), value)
        deep = run.policy.refreshes(index, self._num_blocks) and run.keeps_branches(index)
        ctx = ProbeContext(deep=deep, store=store, notes=self.probe_notes,
                           queries=lambda n, device: run.selector.query_subset(n, step, index, device))
        with forward_hooks(probe(block, args, kwargs, ctx)):
            return original(*args, **kwargs)

    def _full_block(self, index, original, args, kwargs):
        # Run the block's own code with its taps in FULL mode (they capture fresh branch outputs).
        saved = self.block_kind
        self.block_kind = lambda i: StepKind.FULL if i == index else saved(i)
        try:
            return original(*args, **kwargs)
        finally:
            self.block_kind = saved

    # ---- the branch decision -------------------------------------------------------------------
    def branch(self, index: int, block: nn.Module, branch: Branch, kind: StepKind, *, like: torch.Tensor | None,
               full: Callable[[], torch.Tensor] | None = None, tokens: Callable[[], torch.Tensor] | None = None,
               rows: Callable | None = None, inputs: tuple = ()) -> torch.Tensor:
        """The output of one branch at this call.

        like: a tensor whose (batch, tokens) dims the output has (shape check of the cache).
        full(): the whole branch output, computed (None: it can only come from the cache).
        tokens(): the branch's per-token input; called only when tokens are scored or kept.
        rows(idx, tokens, kept): output rows of tokens `idx`, for selective steps.
        inputs: the branch module's positional inputs, for the branch's `keep_inputs`.
        """
        run = self.run
        rows_n = like.shape[1] if like is not None and like.ndim >= 3 else 1
        full_cost = run.branch_cost(block, branch, rows_n)
        self.work.flops_full += full_cost
        if kind != StepKind.FULL:
            device = like.device if like is not None else None
            self._prefetch(index + 1, device)
            if run.forecast is not None:
                cached = self._forecast(index, branch, device)
            else:
                cached = run.cache.get(self.streams, (index, branch.name), device=device)
            if cached is not None and like is not None and cached.shape[:2] != like.shape[:2]:
                cached = None        # another resolution or batch layout: never reuse stale tensors
            if cached is not None:
                if kind == StepKind.SELECTIVE and rows is not None and tokens is not None and self._refreshes(branch):
                    return self._selective(index, branch, cached, tokens(), rows, full_cost)
                if run.eoc is not None:
                    cached = run.eoc.correct(self.streams, (index, branch.name), self.schedule_step, cached)
                return cached
            if full is None:
                raise CacheMiss((index, branch.name))
            self.work.misses += 1
        out = full()
        self._store_full(index, block, branch, out, tokens, inputs)
        self.work.flops_done += full_cost
        self.work.computed += 1
        return out

    def _refreshes(self, branch: Branch) -> bool:
        modules = self.run.selector.modules
        return branch.role in modules or (branch.role == "fused" and "mlp" in modules)

    def _store_full(self, index, block, branch, out, tokens, inputs):
        run, key = self.run, (index, branch.name)
        if not run.stores_at(self.schedule_step) and run.recorder is None and run.eoc is None:
            return          # no later step of this run reads the cache
        if run.recorder is not None and out.ndim >= 2:
            group = group_name(branch.role, index, self._num_blocks, run.recorder.grouping)
            run.recorder.observe(self.streams, key, group, self.schedule_step, out)
        if not run.keeps_branches(index):
            return          # a block inside a residual span: the span keeps one residual instead
        self._remember(key, out)
        if run.eoc is not None:
            run.eoc.filled(self.streams, key, self.schedule_step)
        deep = self._refreshes(branch) and run.policy.refreshes(index, self._num_blocks)
        if deep and branch.keep_inputs is not None and inputs:     # only selective steps read them
            for name, value in branch.keep_inputs(block, inputs).items():
                run.cache.put(self.streams, key + (name,), value)
        if not deep or not out.ndim >= 3:
            return
        if run.recording is not None:       # a census: selective steps keep an offset per refreshed branch
            census = run.recording
            census.corrections[index] = census.corrections.get(index, 0) + out.numel() * out.element_size()
            census.eight_bit.corrections[index] = census.eight_bit.corrections.get(index, 0) + \
                CacheStore.entry_nbytes(out.shape, out.dtype, "int8")
        if run.selector.needs_reference and tokens is not None:
            # a copy: some blocks (LTXV, Flux) add into their residual stream in place after the branch
            run.cache.put(self.streams, key + ("reference",), tokens().clone())
        if run.selector.tracks_staleness:
            run.cache.put(self.streams, key + ("staleness",), out.new_zeros(token_rows(out).shape[:2], dtype=torch.int32))

    def _selective(self, index, branch, cached, tokens, rows, full_cost):
        run, key = self.run, (index, branch.name)
        layout, cached = cached, token_rows(cached)       # select and scatter on [B, N, C]
        get = lambda name: run.cache.get(self.streams, key + (name,), device=cached.device)  # noqa: E731
        staleness = get("staleness") if run.selector.tracks_staleness else None
        ctx = SelectionContext(tokens=tokens, cached=cached, reference=get("reference"), staleness=staleness,
                               step=self.schedule_step, steps=run.policy_steps, block=index,
                               blocks=self._num_blocks, role="mlp" if branch.role == "fused" else branch.role,
                               streams=len(self.streams), importance=get("importance"), family=run.family.name)
        idx = run.selector.select(ctx)
        if staleness is not None:
            staleness = (staleness + 1).scatter(1, idx, 0)
            run.cache.put(self.streams, key + ("staleness",), staleness)
        if idx.shape[1] == 0:
            return layout

        def kept(name):
            value = get(name)
            if value is None:
                raise CacheMiss(key + (name,))
            return value
        self._recomputing = True
        try:
            fresh = rows(idx, tokens, kept)
        finally:
            self._recomputing = False
        updated = scatter_tokens(cached, idx, fresh).view_as(layout)
        cached = layout
        if run.forecast is not None:
            # Recomputed tokens keep their offset from the forecast until the next full step.
            offset = updated - cached
            correction = get("correction")
            run.cache.put(self.streams, key + ("correction",), offset if correction is None else correction + offset)
        else:
            run.cache.put(self.streams, key, updated)
        run.selected_tokens[self.step] += idx.shape[1] * idx.shape[0]
        self.work.flops_done += full_cost * idx.shape[1] / tokens.shape[1]
        self.work.selective += 1
        return updated

    def _forecast(self, index: int, branch: Branch, device) -> torch.Tensor | None:
        """The forecast of a branch from its stored full-step values, plus selective corrections."""
        run, key = self.run, (index, branch.name)
        grouping = getattr(run.forecast.forecaster, "grouping", "role")
        group = group_name(branch.role, index, self._num_blocks, grouping)
        out = self._reused(key, group, device)
        if out is None:
            return None
        correction = run.cache.get(self.streams, key + ("correction",), device=device)
        if correction is not None and correction.shape == out.shape:
            out = out + correction
        return out

    # ---- model-level fallback ------------------------------------------------------------------
    def _model_level_forward(self, original):
        """For models without a branch-level family: reuse the model's output residual."""
        cost = self.run.call_flops.get(len(self.streams), 1.0)

        def forward(x, *args, **kwargs):
            self.work.flops_full += cost
            key = ("model", "residual")
            if self.step_kind != StepKind.FULL:
                cached = self._reused(key, "model", x.device)
                if cached is not None and cached.shape[0] == x.shape[0] and cached.shape[2:] == x.shape[2:]:
                    channels = cached.shape[1]
                    return x[:, :channels] + cached
                self.work.misses += 1
            out = original(x, *args, **kwargs)
            self.work.flops_done += cost
            self.work.computed += 1
            if not self.run.stores_at(self.schedule_step):
                return out              # no later step of this run reads the cache
            if out.shape[0] == x.shape[0] and out.shape[2:] == x.shape[2:] and out.shape[1] <= x.shape[1]:
                self._remember(key, out - x[:, :out.shape[1]])
            return out
        return forward


def token_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [B, N, C]: Cosmos runs its MLP on a [B, T, H, W, C] grid of tokens."""
    return x.flatten(1, -2) if x.ndim > 3 else x


@contextlib.contextmanager
def _input_noted(model: nn.Module, forecast: ForecastState):
    """Tell the forecast the latent of each model call (the frequency split's token grid)."""
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if torch.is_tensor(x):
            forecast.note_model_input(module, x)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _instance_forward(module: nn.Module, make: Callable[[Callable], Callable]):
    """Shadow `module.forward` with make(current forward) until the block exits."""
    previous = module.__dict__.get("forward", _MISSING)
    module.forward = make(module.forward)
    try:
        yield
    finally:
        if previous is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous


# ---- residual spans and the census ------------------------------------------------------------
def carry_map(args: tuple, kwargs: dict, output) -> tuple | None:
    """Which input each output of a block continues: (output is a tuple, locations), a location
    being ("arg", i) or ("kw", name), None for a None output; matched by shape, in argument
    order. None when some output has no input of its shape (no residual can be taken)."""
    outs = output if isinstance(output, (tuple, list)) else (output,)
    candidates = [(("arg", i), a) for i, a in enumerate(args) if torch.is_tensor(a)]
    candidates += [(("kw", k), v) for k, v in kwargs.items() if torch.is_tensor(v)]
    used, locations = set(), []
    for out in outs:
        if out is None:
            locations.append(None)
            continue
        if not torch.is_tensor(out):
            return None
        match = next((loc for loc, t in candidates if loc not in used and t.shape == out.shape), None)
        if match is None:
            return None
        used.add(match)
        locations.append(match)
    return isinstance(output, (tuple, list)), tuple(locations)


def _flat(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _input_at(location, args, kwargs):
    where, at = location
    return args[at] if where == "arg" else kwargs[at]


def _carried(carry, args, kwargs):
    """A block's output when a span reuses it: its inputs, handed on unchanged."""
    is_tuple, locations = carry
    parts = tuple(None if loc is None else _input_at(loc, args, kwargs) for loc in locations)
    return parts if is_tuple else parts[0]


# Census hooks see a block's (fake) inputs with its output: only shapes and dtypes are read, which a
# block's in-place updates of its inputs do not change.
def _census_carry(census: Census, index: int):
    def hook(module, args, kwargs, output):
        carry = carry_map(args, kwargs, output)
        if carry is None:
            census.carry[index] = census.eight_bit.carry[index] = None
            return
        outs = output if carry[0] else (output,)
        sizes = [(o - _input_at(loc, args, kwargs)).to(o.dtype) for o, loc in zip(outs, carry[1]) if loc is not None]
        census.carry[index] = sum(t.numel() * t.element_size() for t in sizes)
        census.eight_bit.carry[index] = sum(CacheStore.entry_nbytes(t.shape, t.dtype, "int8") for t in sizes)
        if index == 0:
            census.residual = max(t.numel() * t.element_size() for t in sizes) // max(census.streams, 1)
    return hook


def _census_model(census: Census):
    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(v for v in kwargs.values() if torch.is_tensor(v)))
        if torch.is_tensor(output) and output.shape[0] == x.shape[0] and output.shape[1] <= x.shape[1]:
            residual = output - x[:, :output.shape[1]]
            census.model = residual.numel() * residual.element_size()
            census.eight_bit.model = CacheStore.entry_nbytes(residual.shape, residual.dtype, "int8")
        if not census.residual:
            census.residual = census.model // max(census.streams, 1)
    return hook
