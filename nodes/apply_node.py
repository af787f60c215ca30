"""ProCache Apply: a MODEL that caches by the connected schedule (the input MODEL is untouched)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..procache_core import Schedule, ScheduleError, TokenSelector
from ..procache_core.memory import AUTO_SHARE, DEFAULT_PRECISION, PRECISIONS, Budget, BudgetError
from .eoc_node import EOC
from .forecaster_node import FORECASTER, default_forecaster
from .runtime import ApplyConfig, attach, describe_model, double_caching_warning
from .schedule_loader import SCHEDULE, describe
from .selector_node import SELECTOR, SelectorConfig

log = logging.getLogger("procache")

# What cached steps do when neither a ProCache Forecaster nor an EOC Correction is connected.
# "taylor 1" is ProCache Forecaster's default; "none" copies the latest value (half the cache).
FORECAST_OPTIONS = ("taylor 1", "none")
DEFAULT_FORECAST = "taylor 1"
NOT_CONNECTED = object()        # the forecaster input's value when nothing is linked to it


class ProCacheApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProCacheApply",
            display_name="ProCache Apply",
            category="ProCache/model",
            description="Speeds up a DiT by reusing cached block outputs on the steps the schedule marks.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to speed up. It is cloned, never changed."),
                SCHEDULE.Input("schedule", tooltip="From ProCache Schedule Loader."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Steps before this share of the run always compute in full."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Steps from this share of the run on always compute in full. "
                                       "1.0 lets the schedule decide to the end."),
                io.Boolean.Input("force_last_full", default=False,
                                 tooltip="Always compute the last step in full (a little slower, sharper detail)."),
                io.Boolean.Input("cache_on_cpu", default=False,
                                 tooltip="Keep cached tensors in system RAM instead of VRAM: saves VRAM on big "
                                         "video models, costs a copy on every cached step."),
                io.String.Input("memory_budget", default="auto", optional=True,   # older workflows lack it
                                tooltip="How much memory the cache may hold. auto: 15% of the cache device's free "
                                        "memory at the start of each run. A size (4 GiB, 512 MiB), a count of "
                                        "residuals (8 residuals: one image-token x hidden tensor per CFG pass, "
                                        "the same at every resolution), minimal (one model-level residual, "
                                        "as the step-skipping caches keep) or unlimited. Where caching every "
                                        "branch does not fit, the first blocks keep their branches and the "
                                        "others share residuals over spans of blocks; the report says which."),
                io.Combo.Input("cache_precision", options=list(PRECISIONS), default=DEFAULT_PRECISION, optional=True,
                               tooltip="How cached values are stored. model dtype: exactly as computed. 8-bit when "
                                       "needed: where the budget would otherwise force a coarser granularity, "
                                       "try the same one in 8 bits first (int8 codes with a scale per token: about "
                                       "half the bytes of bf16, a few hundredths of a dB on the reference DiT). "
                                       "int8 / fp8: always 8 bits."),
                io.Boolean.Input("check_model_level", default=False, optional=True,
                                 tooltip="At the first full steps, also measure how close one model-level "
                                         "residual (what the step-skipping caches keep) would have come, and "
                                         "keep only that for the rest of the run when it is clearly closer to "
                                         "full compute than the granularity the budget gave. Helps most on "
                                         "small budgets with a forecaster; the report says what it measured. Off "
                                         "under SDE and ancestral samplers."),
                io.Combo.Input("forecast", options=list(FORECAST_OPTIONS), default=DEFAULT_FORECAST, optional=True,
                               tooltip="What cached steps do when no ProCache Forecaster or EOC Correction is "
                                       "connected. taylor 1: extrapolate each cached value along its change "
                                       "between its last two full steps (under SDE and ancestral samplers, where "
                                       "that overshoots, it reuses instead and the report says so). none: reuse "
                                       "the latest value as computed (half the cache memory). A connected "
                                       "Forecaster or EOC replaces this."),
                SELECTOR.Input("selector", optional=True,
                               tooltip="From Token Importance Selector: which tokens selective steps recompute. "
                                       "Without it, selective steps refresh 10% of the tokens of the deepest 25% of blocks, by output norm."),
                FORECASTER.Input("forecaster", optional=True,
                                 tooltip="From ProCache Forecaster: how cached steps extrapolate each branch from "
                                         "its last full steps. Without it: the forecast input above decides."),
                EOC.Input("eoc", optional=True,
                          tooltip="From EOC Correction: reused branch outputs get the prior's change since they "
                                  "were cached. Works with any schedule. Replaces the forecast input above."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A copy of the input model that caches by the schedule. "
                                                              "Connect to the sampler."),
                io.String.Output(display_name="report", tooltip="Which caching mode the model got, and why."),
            ],
        )

    @classmethod
    def validate_inputs(cls, memory_budget: str = "auto") -> bool | str:
        # only memory_budget: ComfyUI then still checks the other inputs' types and ranges itself
        try:
            Budget.parse(memory_budget)
        except BudgetError as e:
            return f"memory_budget: {e}"
        return True

    @classmethod
    def execute(cls, model, schedule, start_percent, end_percent, force_last_full, cache_on_cpu,
                selector: SelectorConfig | None = None, forecaster=NOT_CONNECTED, eoc=None,
                memory_budget: str = "auto", cache_precision: str = DEFAULT_PRECISION,
                check_model_level: bool = False, forecast: str = DEFAULT_FORECAST) -> io.NodeOutput:
        if not isinstance(schedule, Schedule):     # a node of another pack on a loosely typed link
            raise ScheduleError(f"the schedule input got {type(schedule).__name__}: connect ProCache Schedule Loader")
        if start_percent > end_percent:
            raise ScheduleError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
        try:
            budget = Budget.parse(memory_budget)
        except BudgetError as e:
            raise BudgetError(f"ProCache Apply, memory_budget: {e}") from None
        if forecast not in FORECAST_OPTIONS:
            raise ValueError(f"ProCache Apply, forecast: {forecast!r} is not one of {', '.join(FORECAST_OPTIONS)}")
        # a Forecaster set to reuse sends None over its link: connected, so the default does not apply
        default_forecast = forecaster is NOT_CONNECTED and eoc is None and forecast == "taylor 1"
        if forecaster is NOT_CONNECTED:
            forecaster = default_forecaster() if default_forecast else None
        selector = selector or SelectorConfig(TokenSelector(), 0.25)
        config = ApplyConfig(schedule=schedule, start_percent=start_percent, end_percent=end_percent,
                             force_last_full=force_last_full, selector=selector.tokens,
                             deep_fraction=selector.deep_fraction, cache_on_cpu=cache_on_cpu,
                             forecaster=forecaster, eoc=eoc, budget=budget,
                             cache_precision=cache_precision if cache_precision in PRECISIONS else DEFAULT_PRECISION,
                             check_model_level=bool(check_model_level))
        mode, sentence = describe_model(model)
        if mode == "none":
            log.warning("ProCache: %s", sentence)
            return io.NodeOutput(model, sentence, ui={"text": [sentence], "mode": [mode]})
        patched = attach(model, config)
        report = f"{sentence}\n{describe(schedule)}\nmemory budget: {describe_budget(budget, cache_on_cpu)}"
        warning = double_caching_warning(model)
        if warning:
            log.warning("ProCache: %s", warning)
            report = f"WARNING: {warning}\n{report}"
        if default_forecast:
            report += (f"\nforecast: {forecaster.describe()} (Apply's forecast input; set it to none for plain "
                       "reuse, or connect a ProCache Forecaster)")
        elif forecaster is not None:
            report += f"\nforecast: {forecaster.describe()}"
        elif eoc is None:
            report += "\nforecast: none (cached steps reuse the latest values)"
        if eoc is not None:
            report += f"\n{eoc.describe()}"
        if forecaster is not None and eoc is not None:
            # both extrapolate the same cached value: the EOC drift lands on top of the forecast
            both = ("a forecaster and an EOC correction are both connected; each corrects reused values "
                    "for the change since they were cached, so together they add it twice: connect one")
            log.warning("ProCache: %s", both)
            report = f"WARNING: {both}\n{report}"
        report += f"\n{step_count_note(schedule)}"
        # schedule_steps: the node's web extension warns when the connected sampler's step count differs
        return io.NodeOutput(patched, report, ui={"text": [report], "mode": [mode], "schedule_steps": [schedule.steps]})


def step_count_note(schedule: Schedule) -> str:
    return (f"made for a {schedule.steps}-step sampler: a sampler with another step count gets the schedule "
            "resampled to its steps, with other figures (the ProCache panel shows what ran)")


def describe_budget(budget: Budget, cache_on_cpu: bool) -> str:
    where = "system RAM" if cache_on_cpu else "the model's device"
    if budget.kind == "auto":
        return (f"auto, {round(AUTO_SHARE * 100)}% of the free memory of {where} at each run's start; the run's "
                "cache plan is in the console and the panel")
    return f"{budget.describe()} in {where}; the run's cache plan is in the console and the panel"
