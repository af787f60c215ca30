"""ProCache Schedule Search: a caching schedule searched for the connected model, sampler and prompts.

Each candidate runs through ComfyUI's own sampler with the pack's wrappers (the same path as
ProCache Apply + KSampler), once per search seed, and is scored by how far its final latents are
from the full-compute latents of the same seeds. The full-compute runs double as the profiling
run that pre-ranks a large pool of candidates, so only the most promising few are sampled.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import time

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import numpy
import torch
from comfy_api.latest import io
from PIL import Image, ImageDraw

from ..procache_core import Schedule, ScheduleError
from ..procache_core.profiling import FeatureProfile, step_weights
from ..procache_core.memory import Budget
from ..procache_core.schedule import MODEL_LEVEL
from ..procache_core.search import (SearchConstraints, auto_max_interval, count_partitions, output_error,
                                    prefer_model_level, search)
from . import library
from .forecaster_node import FORECASTER
from .runtime import ApplyConfig, attach, describe_model
from .schedule_loader import SCHEDULE, describe

log = logging.getLogger("procache")


AUTO = -1       # max_interval: let the pack choose (search.auto_max_interval)


def constraints_from(steps: int, full_steps: int, target_speedup: float, min_interval: int,
                     max_interval: int) -> SearchConstraints:
    if max_interval == AUTO:
        budget = (full_steps if full_steps > 0
                  else SearchConstraints.for_speedup(steps, target_speedup, 0, steps).full_steps)
        max_interval = max(min_interval, auto_max_interval(steps, budget))
    if full_steps > 0:
        return SearchConstraints(steps, full_steps, min_interval, max_interval)
    return SearchConstraints.for_speedup(steps, target_speedup, min_interval, max_interval)


class SeedRunner:
    """Samples the search seeds exactly as KSampler would with each seed, full or with a pattern."""

    def __init__(self, model, seed, seeds, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                 on_step, forecaster=None):
        self.model, self.steps, self.cfg, self.forecaster = model, steps, cfg, forecaster
        self.sampler_name, self.scheduler, self.positive, self.negative = sampler_name, scheduler, positive, negative
        self.latent = latent
        self.seeds = [seed + i for i in range(seeds)]
        self.on_step = on_step

    def _sample(self, model, seed, callback=None):
        latent_image = comfy.sample.fix_empty_latent_channels(model, self.latent["samples"])
        noise = comfy.sample.prepare_noise(latent_image, seed, self.latent.get("batch_index"))

        def step_done(step, x0, x, total):
            if callback is not None:
                callback(step)
            self.on_step()       # progress, and cancel between steps

        return comfy.sample.sample(model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                   self.positive, self.negative, latent_image,
                                   noise_mask=self.latent.get("noise_mask"), callback=step_done,
                                   disable_pbar=True, seed=seed)

    def full(self, profile: FeatureProfile) -> list[torch.Tensor]:
        """Full-compute outputs of every seed, recording the raw model output at each step.

        A forward hook on the diffusion model (not a DIFFUSION_MODEL wrapper: not every model
        class runs those), present only during these runs and removed even on cancel."""
        state = {"step": 0, "recorded": -1}

        def record(module, args, out):
            if state["recorded"] != state["step"] and torch.is_tensor(out):   # the step's first call
                state["recorded"] = state["step"]
                profile.record(state["step"], out)

        def next_step(step):
            state["step"] = step + 1

        hook = self.model.model.diffusion_model.register_forward_hook(record)
        outputs = []
        try:
            for seed in self.seeds:
                state.update(step=0, recorded=-1)
                profile.begin_run()
                outputs.append(self._sample(self.model, seed, next_step).float().cpu())
        finally:
            hook.remove()
        return outputs

    def scheduled(self, pattern, model_level: bool = False) -> list[torch.Tensor]:
        """Outputs of every seed with `pattern`: branch level (no budget), or with model_level one
        model-level residual for the whole block stack (budget minimal)."""
        schedule = Schedule(kinds=tuple(pattern), name="search candidate")
        patched = attach(self.model, ApplyConfig(schedule=schedule, forecaster=self.forecaster,
                                                 budget=Budget("minimal") if model_level else None))
        return [self._sample(patched, seed).float().cpu() for seed in self.seeds]


# ---- the plot -------------------------------------------------------------------------------
def plot(result, width: int = 640, height: int = 400) -> torch.Tensor:
    """Error vs measured speedup of every candidate run; the winner marked. IMAGE [1, H, W, 3]."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 20, 40, height - 50
    points = [(result.speedup(c), c.error, c) for c in result.candidates]
    if result.final is not result.best:
        points.append((result.speedup(result.final), result.final.error, result.final))
    xs = [p[0] for p in points if math.isfinite(p[0])] or [1.0]
    ys = [math.log10(max(p[1], 1e-12)) for p in points]
    theory = result.constraints.steps / result.constraints.full_steps
    x_lo, x_hi = min(xs + [theory, 1.0]) * 0.95, max(xs + [theory]) * 1.05
    y_lo, y_hi = min(ys) - 0.1, max(ys) + 0.1

    def at(x, y):
        x = x if math.isfinite(x) else theory
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline="black")
    for i in range(5):
        y = y_lo + (y_hi - y_lo) * i / 4
        py = at(x_lo, y)[1]
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{10 ** y:.2e}", fill="black")
        x = x_lo + (x_hi - x_lo) * i / 4
        px = at(x, y_lo)[0]
        draw.line([px, bottom, px, bottom + 4], fill="black")
        draw.text((px - 12, bottom + 8), f"{x:.2f}x", fill="black")
    tx = at(theory, y_lo)[0]
    for y in range(top, bottom, 8):
        draw.line([tx, y, tx, y + 4], fill=(150, 150, 150))
    draw.text((left, 8), f"ProCache Schedule Search: {len(result.candidates)} runs, error vs full compute "
                         f"(log) over measured speedup; dashed = {theory:.2f}x by step count", fill="black")
    draw.text((left, height - 28), "grey: drawn   blue square: uniform intervals   green triangle: library generic",
              fill="black")
    draw.text((left, height - 15), "red star: winner   orange: winner + selective", fill="black")
    for x, _, c in points:
        px, py = at(x, math.log10(max(c.error, 1e-12)))
        if c is result.best:
            star = [(px + r * math.cos(a), py + r * math.sin(a))
                    for i in range(10) for a, r in [(math.pi / 2 + i * math.pi / 5, 10 if i % 2 == 0 else 4)]]
            draw.polygon(star, fill=(220, 30, 30))
        elif c.origin == "uniform":
            draw.rectangle([px - 5, py - 5, px + 5, py + 5], fill=(40, 90, 220))
        elif c.origin == "generic":
            draw.polygon([(px, py - 7), (px + 7, py + 6), (px - 7, py + 6)], fill=(30, 160, 60))
        elif c.origin == "winner+selective":
            draw.polygon([(px, py - 7), (px + 7, py), (px, py + 7), (px - 7, py)], fill=(240, 150, 20))
        else:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(120, 120, 120))
    return torch.from_numpy(numpy.asarray(img, dtype="float32") / 255.0).unsqueeze(0)


# ---- the node -------------------------------------------------------------------------------
class ProCacheScheduleSearch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProCacheScheduleSearch",
            display_name="ProCache Schedule Search",
            category="ProCache/schedules",
            description="Searches a caching schedule for this model, sampler and prompt: candidate schedules under "
                        "a budget (drawn ones, evenly spaced full steps and the library's generic pattern) are "
                        "sampled on a few seeds and the one closest to full compute is kept. The "
                        "winner then runs once more with one model-level residual; where that lands clearly "
                        "closer, the schedule says so and ProCache Apply (memory_budget auto) keeps only it.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to search a schedule for (not changed)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampler the schedule is for; use the same one in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="The noise schedule the schedule is for; use the same one in KSampler."),
                io.Int.Input("steps", default=20, min=2, max=1000,
                             tooltip="Sampler steps; the schedule has exactly this many."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as in KSampler."),
                io.Conditioning.Input("positive", tooltip="The prompt(s) to search on; a prompt like your real "
                                                          "ones gives a schedule that suits them."),
                io.Conditioning.Input("negative", tooltip="The negative prompt, as in KSampler."),
                io.Latent.Input("latent_image", tooltip="The latent to sample from (its size sets the cost of "
                                                        "each run; a smaller one searches faster)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="First noise seed; the search seeds are seed, seed+1, ... It also seeds the "
                                     "candidate draw, so the same seed gives the same result."),
                io.Int.Input("seeds", default=4, min=1, max=64,
                             tooltip="N: how many seeds each candidate is sampled on. More is more reliable and "
                                     "proportionally slower."),
                io.Int.Input("candidates", default=5, min=1, max=200,
                             tooltip="K: how many candidate schedules are sampled and scored (the method uses 5). "
                                     "Each costs N sampling runs."),
                io.Int.Input("full_steps", default=0, min=0, max=1000,
                             tooltip="Budget B: exactly this many full steps. 0 derives it from target_speedup."),
                io.Float.Input("target_speedup", default=2.0, min=1.0, max=20.0, step=0.1,
                               tooltip="Used when full_steps is 0: B = steps / target_speedup, rounded."),
                io.Int.Input("min_interval", default=0, min=0, max=100,
                             tooltip="Fewest reuse steps between two full steps (0 allows back-to-back full steps)."),
                io.Int.Input("max_interval", default=AUTO, min=AUTO, max=100,
                             tooltip="Most reuse steps between two full steps; raise it for long caching early in "
                                     "the run, lower it for safety. -1: automatic, twice the mean interval and "
                                     "at least 4, which leaves room for uneven spacings at any speedup (a fixed 4 "
                                     "admits no pattern at 20 steps and 6x)."),
                io.Boolean.Input("selective", default=True,
                                 tooltip="Inject selective steps into the winner (every second reuse step of each "
                                         "run recomputes important tokens), as ProCache does; it is run once more "
                                         "so its error is measured too."),
                io.Int.Input("prerank_pool", default=200, min=0, max=5000,
                             tooltip="Draw this many candidates and rank them by how much the model's output changed "
                                     "over their reuse steps in the full-compute runs; only the best K are sampled. "
                                     "0 or <= K: sample K random candidates, as the method does."),
                io.String.Input("save_name", default="",
                                tooltip="Save the result in the user schedule library under this name (letters, "
                                        "digits, '-', '_', '.'); it then appears in the Schedule Loader as "
                                        "user/<name>. Empty: do not save."),
                io.String.Input("searched", multiline=True, default="", optional=True,
                                tooltip="Filled in after a search: the result as schedule JSON, saved with the "
                                        "workflow. While the settings above match it, the node returns it without "
                                        "searching again, so a shared workflow reproduces the run. Clear it to "
                                        "search again (e.g. after changing the prompt or the model)."),
                FORECASTER.Input("forecaster", optional=True,
                                 tooltip="From ProCache Forecaster: candidates run with it, so the schedule is "
                                         "searched for the forecaster it will be used with (connect the same one "
                                         "to ProCache Apply). Without it: candidates run with plain reuse, which "
                                         "Apply runs when its forecast input is none."),
            ],
            outputs=[
                SCHEDULE.Output(display_name="schedule", tooltip="The searched schedule; connect to ProCache Apply."),
                io.String.Output(display_name="pattern", tooltip="The schedule's digits; paste into the Schedule "
                                                                 "Loader's typed pattern to carry it in a workflow."),
                io.Image.Output(display_name="plot", tooltip="Error vs speedup of every candidate, winner marked."),
                io.String.Output(display_name="report", tooltip="What was searched and what each candidate scored."),
            ],
        )

    @classmethod
    def validate_inputs(cls, steps=None, full_steps=None, target_speedup=None, min_interval=None, max_interval=None,
                        save_name=None, **_):
        values = (steps, full_steps, target_speedup, min_interval, max_interval)
        try:
            if None not in values:          # a linked input is known only when the node runs
                constraints_from(*values)
            if save_name:
                library.check_name(save_name, "schedule")
        except ScheduleError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, sampler_name, scheduler, steps, cfg, positive, negative, latent_image, seed, seeds,
                candidates, full_steps, target_speedup, min_interval, max_interval, selective, prerank_pool,
                save_name, searched="", forecaster=None) -> io.NodeOutput:
        constraints = constraints_from(steps, full_steps, target_speedup, min_interval, max_interval)
        mode, sentence = describe_model(model)
        if mode == "none":
            raise ScheduleError(sentence)
        settings = {"model": type(model.model.model_config).__name__, "sampler": sampler_name, "scheduler": scheduler,
                    "steps": steps, "cfg": cfg, "seed": seed, "seeds": seeds, "candidates": candidates,
                    "full_steps": full_steps, "target_speedup": target_speedup, "min_interval": min_interval,
                    "max_interval": max_interval, "selective": selective, "prerank_pool": prerank_pool}
        if forecaster is not None:      # only then: results stored before this input existed stay valid
            settings["forecaster"] = forecaster.describe()
        stored = _stored_result(searched, settings)
        if stored is not None:
            report = f"reused the stored search result (settings unchanged): {describe(stored)}"
            return io.NodeOutput(stored, stored.pattern, note_image(["Stored search result reused",
                                                                     "(clear 'searched' to search again)",
                                                                     stored.pattern]), report,
                                 ui={"text": [report], "pattern": [stored.pattern], "searched": [searched]})
        space = count_partitions(constraints)
        pool = min(prerank_pool, space)
        runs = 1 + min(candidates, space) + 1 + (1 if selective else 0) + 1    # the last: model level
        pbar = comfy.utils.ProgressBar(runs * seeds * steps)

        def on_step():
            comfy.model_management.throw_exception_if_processing_interrupted()
            pbar.update(1)

        runner = SeedRunner(model, seed, seeds, steps, cfg, sampler_name, scheduler, positive, negative,
                            latent_image, on_step, forecaster)
        profile = FeatureProfile(steps, constraints.max_interval + 1, weights=sigma_weights(model, scheduler, steps))
        comfy.model_management.throw_exception_if_processing_interrupted()
        start = time.perf_counter()
        reference = runner.full(profile)
        full_seconds = time.perf_counter() - start
        result = search(constraints, runner.scheduled, reference, count=candidates, seed=seed,
                        profile=profile if profile.ready else None, pool=pool, selective=selective,
                        full_seconds=full_seconds)
        final = result.final
        # the calibration the search already ran decides the granularity too: the winner once more
        # with one model-level residual, against the same full-compute outputs
        model_level_error = output_error(runner.scheduled(final.pattern, model_level=True), reference)
        granularity = MODEL_LEVEL if prefer_model_level(final.error, model_level_error) else ""
        pbar.update_absolute(pbar.total)

        model_name = type(model.model.model_config).__name__
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        name = save_name or f"search-{model_name.lower()}-{steps}-{constraints.full_steps}full"
        provenance = (f"searched by ProCache Schedule Search on {model_name} ({sampler_name}/{scheduler}, {steps} steps, "
                      f"CFG {cfg:g}, seeds {runner.seeds[0]}..{runner.seeds[-1]}, {date}): error {final.error:.4g} "
                      f"vs full compute{comparators_text(result)}; {constraints.full_steps} full steps"
                      + (f"; candidates ran with {forecaster.describe()}, use it with the same" if forecaster else
                         "; candidates ran with plain reuse: set ProCache Apply's forecast to none to run it as searched"))
        notes = [f"{len(result.candidates)} candidates sampled"
                 + (f", the best by prediction of {len(result.pool)} pre-ranked from the full-compute runs"
                    if result.pool else ", drawn at random (CASS)"),
                 f"one model-level residual: error {model_level_error:.4g} against {final.error:.4g} at branch level, "
                 + ("so the cache keeps only that under memory_budget auto" if granularity else
                    "so the memory budget picks the granularity as usual")]
        schedule = Schedule(kinds=final.pattern, name=name, family=mode, sampler=f"{sampler_name}/{scheduler}",
                            provenance=provenance, notes=tuple(notes), granularity=granularity)
        metadata = {"search": {
            "model": model_name, "family": mode, "sampler": sampler_name, "scheduler": scheduler, "steps": steps,
            "cfg": cfg, "seeds": runner.seeds, "date": date, "error": final.error,
            "error_metric": "relative MSE of final latents vs full compute, mean over seeds",
            "uniform_error": result.uniform.error if result.uniform else None,
            "generic_error": result.generic.error if result.generic else None,
            "model_level_error": model_level_error,
            "theoretical_speedup": round(schedule.theoretical_speedup(), 4),
            "measured_speedup": round(result.speedup(final), 4),
            "full_steps": constraints.full_steps, "min_interval": constraints.min_interval,
            "max_interval": constraints.max_interval, "candidates": len(result.candidates),
            "prerank_pool": len(result.pool), "selective": selective, "draw_seed": seed, "settings": settings}}
        report = report_text(result, schedule, space)
        if save_name:
            path = library.save_user(schedule, save_name, extra=metadata)
            report += f"\nsaved as user/{save_name} ({path})"
        log.info("ProCache search: %s", report.splitlines()[0])
        stored_text = json.dumps({**schedule.to_dict(), **metadata}, indent=1)
        return io.NodeOutput(schedule, schedule.pattern, plot(result), report,
                             ui={"text": [report], "pattern": [schedule.pattern], "searched": [stored_text]})


def _stored_result(text: str, settings: dict) -> Schedule | None:
    """The schedule in the node's `searched` text, if it was searched with these settings."""
    def parse(text):
        doc = json.loads(text)
        search = doc.get("search") if isinstance(doc, dict) else None
        return Schedule.from_dict(doc, where="searched"), search.get("settings") if isinstance(search, dict) else None
    return library.stored_result(text, parse, settings, "searched schedule", "searching")


def note_image(lines: list[str], width: int = 640, height: int = 160) -> torch.Tensor:
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((20, 20 + 30 * i), line, fill="black")
    return torch.from_numpy(numpy.asarray(img, dtype=numpy.float32) / 255.0)[None]


def sigma_weights(model, scheduler: str, steps: int) -> list[float] | None:
    try:
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    except Exception:         # a scheduler that needs more than the model sampling: weigh steps equally
        return None
    weights = step_weights([float(s) for s in sigmas])
    return weights if len(weights) == steps else None


def comparators_text(result) -> str:
    """The errors of the fixed patterns every search also runs, for the report and the provenance."""
    return ((f", uniform intervals {result.uniform.error:.4g}" if result.uniform else "")
            + (f", library generic {result.generic.error:.4g}" if result.generic else ""))


def report_text(result, schedule: Schedule, space: int) -> str:
    c = result.constraints
    lines = [f"searched {c.steps} steps, {c.full_steps} full (intervals {c.min_interval}..{c.max_interval}; "
             f"{space} patterns allowed): winner error {result.best.error:.4g}" + comparators_text(result),
             describe(schedule), "candidates (relative MSE vs full, measured speedup, pattern):"]
    for cand in sorted(result.candidates + ([result.final] if result.final is not result.best else []),
                       key=lambda x: x.error):
        mark = " <- winner" if cand is result.best else f" ({cand.origin})" if cand.origin != "drawn" else ""
        lines.append(f"  {cand.error:.4g}  {result.speedup(cand):.2f}x  {cand.text}{mark}")
    return "\n".join(lines)
