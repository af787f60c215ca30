"""ProCache Schedule Loader: a schedule from the library, a uniform interval, or typed text."""
from __future__ import annotations

from comfy_api.latest import io

from ..procache_core import Schedule, ScheduleError, StepKind, inject_selective, parse_pattern, uniform
from . import library

SCHEDULE = io.Custom("PROCACHE_SCHEDULE")
UNIFORM, TYPED = "uniform interval", "typed pattern"


def describe(schedule: Schedule) -> str:
    counts = (schedule.count(StepKind.FULL), schedule.count(StepKind.SELECTIVE), schedule.count(StepKind.REUSE))
    text = (f"{schedule.name}: {schedule.steps} steps, {counts[0]} full / {counts[1]} selective / {counts[2]} reuse; "
            f"theoretical speedup {schedule.theoretical_speedup():.2f}x\npattern {schedule.pattern}")
    if schedule.provenance:
        text += f"\nfrom: {schedule.provenance}"
    for note in schedule.notes:
        text += f"\nnote: {note}"
    if schedule.granularity:
        text += f"\ngranularity: {schedule.granularity} (measured by its search; applies with memory_budget auto)"
    return text


FAST_PREFIX = "procache-fast-"


def menu_order(name: str) -> tuple[int, str]:
    """The paper's patterns first, then the pack's fast (5-6x) family, then the user's searched
    ones, then the generic fallbacks (many)."""
    if name.startswith(FAST_PREFIX):
        return (1, name)
    return (0 if name.startswith("procache-") else 3 if name.startswith("generic-") else 2, name)


def build_schedule(source: str, pattern: str, interval: int, steps: int, selective: bool) -> Schedule:
    if source == TYPED:
        schedule = parse_pattern(pattern)
    elif source == UNIFORM:
        if steps < 1:
            raise ScheduleError("a uniform schedule needs steps >= 1 (the sampler's step count)")
        schedule = uniform(steps, interval)
    else:
        schedule = library.load(source)
    if selective and StepKind.SELECTIVE not in schedule.kinds:
        schedule = schedule.with_kinds(inject_selective(schedule.kinds),
                                       note="selective steps injected on even positions of each reuse run")
    if steps and steps != schedule.steps:
        schedule = schedule.resampled(steps)
    return schedule


class ProCacheScheduleLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = sorted(library.listing(), key=menu_order)
        return io.Schema(
            node_id="ProCacheScheduleLoader",
            display_name="ProCache Schedule Loader",
            category="ProCache/schedules",
            description="Chooses which sampler steps run in full, reuse the cache, or recompute important tokens.",
            inputs=[
                io.Combo.Input("source", options=names + [UNIFORM, TYPED],
                               default=next((n for n in names if menu_order(n)[0] == 0), names[0] if names else UNIFORM),
                               tooltip="A schedule from the library, a full step every N steps, or the pattern "
                                       "typed below. procache-*: the paper's released patterns; procache-fast-<steps>-<x>x: "
                                       "searched by the pack on its reference model for 5-6x with Taylor 1 (connect "
                                       "ProCache Forecaster set to taylor 1); generic-<steps>-<x>: "
                                       "made by the constraint rule for that step count and speedup, not searched; "
                                       "user/*: saved by ProCache Schedule Search (the report names the model it was "
                                       "searched on). Another step count is resampled, with a note."),
                io.String.Input("pattern", multiline=True, default="",
                                tooltip="Used when source is 'typed pattern': digits 1 (full), 0 (reuse), "
                                        "2 (selective), e.g. '1,0,0,2,0' or '[1,0,2,0]x6 + [1,0]x7', or a "
                                        "schedule JSON. Text here travels inside the workflow."),
                io.Int.Input("interval", default=3, min=1, max=50,
                             tooltip="For 'uniform interval': a full step every N steps. 1 turns caching off; "
                                     "raising it is faster and less exact."),
                io.Int.Input("steps", default=0, min=0, max=10000,
                             tooltip="The sampler's step count. 0 keeps the schedule's own length; another value "
                                     "resamples it (keeping its share of full steps). Required for 'uniform'."),
                io.Boolean.Input("selective", default=False,
                                 tooltip="Turn every second reuse step of each cached run into a selective step "
                                         "(ProCache's injection rule). Off keeps the pattern as it is."),
            ],
            outputs=[
                SCHEDULE.Output(display_name="schedule", tooltip="Connect to ProCache Apply."),
                io.String.Output(display_name="report", tooltip="Steps by kind and the theoretical speedup."),
            ],
        )

    @classmethod
    def validate_inputs(cls, source, pattern, interval, steps, selective):
        try:
            build_schedule(source, pattern, interval, steps, selective)
        except (ScheduleError, ValueError) as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, source, pattern, interval, steps, selective) -> io.NodeOutput:
        schedule = build_schedule(source, pattern, interval, steps, selective)
        text = describe(schedule)
        if source not in (UNIFORM, TYPED):
            text = f"{library.origin(source, schedule)}\n{text}"
        return io.NodeOutput(schedule, text, ui={"text": [text], "pattern": [schedule.pattern]})
