"""ComfyUI glue: the wrappers that give each sampling run its own caching `Run`.

`attach()` is all a node does to a cloned MODEL: it stores a small config under
transformer_options and registers two keyed wrappers.
- OUTER_SAMPLE (once per sampler run) builds the Run from the sampler's sigmas, puts it in the
  run's own copy of the model options, wraps the sampler callback (it ends each step on the clock)
  and frees the cache in `finally`, also on error or cancel.
- APPLY_MODEL (every model call, every model type) attaches the Run to the diffusion model's
  blocks for the duration of that one call.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from . import events
from ..procache_core import Run, Schedule, SchedulePolicy, StepClock, StepKind, TokenSelector, find_family
from ..procache_core.forecast import NOISY_SAMPLER_KINDS, SAMPLER_KIND, sampler_name
from ..procache_core.schedule import MODEL_LEVEL
from ..procache_core.families import is_unet
from ..procache_core.memory import AUTO_SHARE, DEFAULT_PRECISION, PRECISIONS, Budget, format_bytes

log = logging.getLogger("procache")

CONFIG_KEY = "procache"          # transformer_options key of the ApplyConfig (deep-copied on clone)
RUN_KEY = "procache_run"         # transformer_options key of the live Run (only inside a sampler run)
WRAPPER_KEY = "procache"
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)   # torch < 2.5 has only the cuda name


@dataclasses.dataclass(frozen=True)
class ApplyConfig:
    """What "ProCache Apply" configured. Plain data only: ModelPatcher.clone() deep-copies it."""

    schedule: Schedule
    start_percent: float = 0.0
    end_percent: float = 1.0
    force_last_full: bool = False
    selector: TokenSelector = TokenSelector()
    deep_fraction: float = 0.25
    cache_on_cpu: bool = False
    forecaster: object = None      # procache_core.forecast.Forecaster; None: reuse copies
    recorder: object = None        # a ForecastFitter during calibration runs (shared, not copied)
    eoc: object = None             # procache_core.eoc.Correction; None: reused values are not corrected
    budget: Budget | None = None    # the cache's memory budget (memory.py; None: no plan); Apply's default is auto
    cache_precision: str = DEFAULT_PRECISION    # a key of memory.PRECISIONS: where the ladder may store 8-bit codes
    check_model_level: bool = False     # measure the rung against one model-level residual (rung_check.py)


class LastRuns:
    """Statistics of the most recent runs, for the panel and the node report (bounded)."""

    def __init__(self, keep: int = 8):
        self._runs: collections.deque = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def publish(self, summary: dict) -> None:
        with self._lock:
            self._runs.append(summary)

    def latest(self) -> dict | None:
        with self._lock:
            return self._runs[-1] if self._runs else None

    def all(self) -> list[dict]:
        with self._lock:
            return list(self._runs)


LAST_RUNS = LastRuns()


def _library_patterns() -> dict[str, str]:
    from . import library
    patterns = {}
    for name in library.listing():
        try:
            patterns[name] = library.load(name).pattern
        except Exception as e:       # one bad user file must not hide the others
            patterns[name] = f"error: {e}"
    return patterns


events.register_routes(LAST_RUNS, _library_patterns)


def plain_clone(model):
    """A clone of `model` (a ModelPatcher) without ProCache's wrappers and settings."""
    clone = model.clone()
    for kind in (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.APPLY_MODEL):
        clone.remove_wrappers_with_key(kind, WRAPPER_KEY)
    clone.model_options.get("transformer_options", {}).pop(CONFIG_KEY, None)
    return clone


def attach(model, config: ApplyConfig):
    """A clone of `model` (a ModelPatcher) that caches per `config`; `model` is left untouched."""
    patched = plain_clone(model)        # a second Apply replaces the first
    patched.model_options.setdefault("transformer_options", {})[CONFIG_KEY] = config
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    return patched


def sampling_inputs() -> list:
    """sampler_name, scheduler, steps and cfg, as in the KSampler: the settings of the calibration
    runs `record_full_compute` makes, which should match the user's sampler."""
    return [
        io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="As in your KSampler."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="As in your KSampler."),
        io.Int.Input("steps", default=20, min=1, max=1000, tooltip="As in your KSampler."),
        io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1, tooltip="As in your KSampler."),
    ]


def record_full_compute(model, recorder, settings: dict, positive, negative, latent_image, name: str) -> None:
    """`settings["samples"]` full-compute sampling runs on seeds `settings["seed"]`, +1, ... with
    `recorder` attached (a forecaster's or an EOC prior's calibration); ComfyUI's progress bar
    counts their steps and Cancel stops them."""
    patched = attach(model, ApplyConfig(schedule=Schedule(kinds=(1,) * settings["steps"], name=name),
                                        recorder=recorder))
    latent = comfy.sample.fix_empty_latent_channels(patched, latent_image["samples"])
    steps, runs = settings["steps"], settings["samples"]
    bar = comfy.utils.ProgressBar(runs * steps)
    for k in range(runs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        seed = settings["seed"] + k

        def progress(step, x0, x, total, done=k * steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done + step + 1, runs * steps)
        noise = comfy.sample.prepare_noise(latent, seed)
        comfy.sample.sample(patched, noise, steps, settings["cfg"], settings["sampler"], settings["scheduler"],
                            positive, negative, latent, seed=seed, callback=progress, disable_pbar=True)


def describe_model(model) -> tuple[str, str]:
    """(mode, sentence) for the model a ModelPatcher holds: branch-level family, fallback, or none."""
    diffusion_model = model.model.diffusion_model
    if is_unet(diffusion_model):
        return "none", (f"{type(diffusion_model).__name__} is a UNet (SD1.5/SDXL style), not a diffusion "
                        "transformer: ProCache left it unchanged")
    family, sentence = find_family(diffusion_model)
    return (family.name if family else "model-level"), sentence


# Other step caches, by the key they register their wrappers under (ComfyUI's own nodes).
OTHER_CACHES = {"easycache": "EasyCache", "lazycache": "LazyCache"}


def other_caches(model) -> list[str]:
    """Other caching methods already on this ModelPatcher: wrappers of ComfyUI's EasyCache and
    LazyCache, and wrappers or transformer_options entries of other packs with "cache" in their key."""
    found = []
    for by_key in getattr(model, "wrappers", {}).values():
        for key in by_key:
            if not key.startswith(WRAPPER_KEY) and "cache" in key.lower() and by_key[key]:
                found.append(OTHER_CACHES.get(key, key))
    options = model.model_options.get("transformer_options", {})
    if not found:
        found += [key for key in options if "cache" in key.lower() and not key.startswith(CONFIG_KEY)]
    return sorted(set(found))


def double_caching_warning(model) -> str | None:
    others = other_caches(model)
    if not others:
        return None
    return (f"{' and '.join(others)} {'is' if len(others) == 1 else 'are'} also applied to this model. Each skips computation on its own schedule, "
            "so cached steps would be cached again (lower quality, misleading speed-ups). Remove one of them "
            "from the graph, or bypass it.")


# ---- OUTER_SAMPLE ---------------------------------------------------------------------------
_SIGMAS, _CALLBACK = 3, 5       # positions in CFGGuider.outer_sample(noise, latent, sampler, sigmas, mask, callback, ...)
# k-diffusion samplers whose second model call of step k lands exactly on sigma_{k+1} after the step's callback
CORRECTOR_AT_NEXT_SIGMA = {"sample_heun"}


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    options = guider.model_options.setdefault("transformer_options", {})
    config: ApplyConfig | None = options.get(CONFIG_KEY)
    if config is None:
        return executor(*args, **kwargs)
    args = list(args)
    sigmas = args[_SIGMAS] if len(args) > _SIGMAS else kwargs["sigmas"]
    user_callback = args[_CALLBACK] if len(args) > _CALLBACK else kwargs.get("callback")
    run = start_run(config, guider.model_patcher, sigmas)
    if config.budget is not None and config.recorder is None:     # calibration runs keep every branch
        budget = config.budget
        if config.schedule.granularity == MODEL_LEVEL and budget.kind == "auto":
            budget = Budget("minimal")
            run.stats.notes.append(SEARCHED_MODEL_LEVEL)
        run.plan_request = PlanRequest(budget, config.cache_precision, cfg_streams(guider))
    sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
    sampler_function = getattr(getattr(sampler, "sampler_function", None), "__name__", "")
    run.clock.corrector_at_next_sigma = sampler_function in CORRECTOR_AT_NEXT_SIGMA
    if run.forecast is not None:
        run.stats.notes.extend(run.forecast.use_sampler(sampler_function))
    name = sampler_name(sampler_function)
    if run.rung_check is not None and SAMPLER_KIND.get(name) in NOISY_SAMPLER_KINDS:
        run.rung_check.free()
        run.rung_check = None
        run.stats.notes.append(RUNG_CHECK_OFF.format(sampler=name, kind=SAMPLER_KIND[name]))
    warning = double_caching_warning(guider.model_patcher)     # also catches a cache added after Apply
    if warning:
        run.stats.notes.append(warning)
        log.warning("ProCache: %s", warning)
    callback = run.sampler_callback(user_callback, on_step=lambda step: events.send(events.STEP_EVENT, step_event(run, step)))
    if len(args) > _CALLBACK:
        args[_CALLBACK] = callback
    else:
        kwargs["callback"] = callback
    options[RUN_KEY] = run
    try:
        return executor(*args, **kwargs)
    except BaseException as e:        # noted for the statistics, raised on unchanged
        run.stats.ending = ending(e)
        raise
    finally:
        options.pop(RUN_KEY, None)
        stats = run.close()           # free cached tensors first, then report
        summary = stats.summary()
        LAST_RUNS.publish(summary)
        events.send(events.RUN_EVENT, summary)
        log.info(stats.line())


def cfg_streams(guider) -> int | None:
    """How many conditionings each step evaluates: the positive ones, and the negative ones unless
    cfg is 1 (ComfyUI then skips them). None when the guider does not say."""
    conds = getattr(guider, "conds", None)
    if not isinstance(conds, dict):
        return None
    cfg = getattr(guider, "cfg", None)
    count = len(conds.get("positive") or [])
    if cfg is None or abs(float(cfg) - 1.0) > 1e-9:
        count += len(conds.get("negative") or [])
    return count or None


def ending(error: BaseException) -> str:
    """How a run that raised `error` ended, for RunStats.ending."""
    if isinstance(error, comfy.model_management.InterruptProcessingException):
        return "cancelled"
    return f"failed: {type(error).__name__}: {error}"


def step_event(run: Run, step: int) -> dict:
    summary = run.stats.summary()
    event = {key: summary[key] for key in ("steps", "planned", "actual", "stream_labels", "mode", "model",
                                           "schedule", "schedule_steps")}
    return {**event, "step": step,
            "seconds": (summary["seconds_per_step"][step] or 0.0) if step < summary["steps"] else 0.0}


def start_run(config: ApplyConfig, model_patcher, sigmas: torch.Tensor) -> Run:
    sigma_list = [float(s) for s in sigmas.flatten().tolist()]
    schedule, notes = schedule_for_run(config.schedule, sigma_list, model_patcher.get_model_object("model_sampling"))
    schedule = schedule.windowed(config.start_percent, config.end_percent, config.force_last_full)
    family, sentence = find_family(model_patcher.model.diffusion_model)
    policy = SchedulePolicy(schedule, config.deep_fraction)
    if family is not None:      # before the first step: a router for another model fails here, not midway
        policy.check_units(len(family.blocks(model_patcher.model.diffusion_model)))
    run = Run(policy, StepClock(sigma_list), family,
              selector=config.selector, cache_device="cpu" if config.cache_on_cpu else None,
              model_name=model_display_name(model_patcher),
              forecaster=config.forecaster, recorder=config.recorder, eoc=config.eoc)
    run.stats.notes.extend(notes + [sentence])
    if run.eoc is not None:
        run.eoc.notes = run.stats.notes     # a prior that does not fit this run says so in the run's report
    run.stats.schedule, run.stats.schedule_steps = config.schedule.name, config.schedule.steps
    if config.check_model_level:
        run.start_rung_check()
    for note in notes:
        log.info("ProCache: %s", note)
    return run


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """What the run's cache plan needs from Apply and the guider; consumed at the first model call."""

    budget: Budget
    precision: str                  # a key of memory.PRECISIONS
    streams: int | None             # conditionings per step (cfg_streams); None: those of the first call


def plan_cache(run: Run, request: PlanRequest, diffusion_model, sigma: float, streams, device,
               call_model) -> None:
    """Before the first block computes: take the census of this run's first model call (on fake
    tensors), then pick the finest granularity that fits the budget."""
    device = run.cache.device or device
    try:
        census = run.take_census(diffusion_model, sigma, streams, call_model)
    except Exception as e:      # noqa: BLE001  (a model the census cannot trace keeps branch level)
        note = (f"no cache plan: this model could not be traced on fake tensors ({type(e).__name__}: "
                f"{str(e)[:200]}); the cache stays at branch level and its peak is measured")
        run.stats.notes.append(note)
        log.warning("ProCache: %s", note)
        return
    free = comfy.model_management.get_free_memory(device) if request.budget.kind == "auto" else None
    quantize, quantize_all = PRECISIONS[request.precision]
    plan = run.make_plan(census, request.budget, free, str(device), streams=max(request.streams or 0, len(streams)),
                         quantize=quantize, quantize_all=quantize_all)
    if free is not None:
        plan.budget_source = f"auto: {round(AUTO_SHARE * 100)}% of {format_bytes(free)} free"
    log.info("ProCache: cache plan: %s", plan.text())     # the panel and the run summary show it too
    if plan.rung.kind in ("spans", "model") and run.forecast is None and run.family is not None:
        run.stats.notes.append(SMALL_BUDGET_ADVICE)


# On the reference DiT at R = 2 (50 steps, about 3x) plain reuse lands below fewer steps at the same
# FLOPs and Taylor 1 well above it (benchmarks/results/memory_quality.md).
# Fresh noise every step (NOISY_SAMPLER_KINDS): on the reference Flux under dpmpp_sde the check switched
# to the model-level residual at 2x and 3x and landed 3.6 and 4.4 dB further from full compute than
# branch level.
RUNG_CHECK_OFF = ("model-level check off under {sampler} ({kind} sampler): fresh noise enters every step, and "
                  "one step's error does not tell which granularity lands closer")
SEARCHED_MODEL_LEVEL = ("granularity from the schedule: its search measured one model-level residual clearly "
                        "closer to full compute than branch level, so the cache keeps only that (memory_budget "
                        "auto; any other budget decides for itself)")
SMALL_BUDGET_ADVICE = ("small cache budget: no block keeps its branches, so plain reuse copies whole residuals; "
                       "Apply's forecast input at taylor 1 (its default), or a ProCache Forecaster, extrapolates "
                       "them instead and lands much closer "
                       "to full compute at the same speed (reference DiT, 2 residuals: 44 dB against 38)")


def model_display_name(model_patcher) -> str:
    """The model as ComfyUI names it in its log and model lists (its supported-model class, such as
    PixArtSigma or Flux); the transformer's class where there is none."""
    config = getattr(model_patcher.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model_patcher.model.diffusion_model).__name__


def schedule_for_run(schedule: Schedule, sigmas: list[float], model_sampling) -> tuple[Schedule, list[str]]:
    """The part of `schedule` this sampler run covers, as a schedule of the run's own length.

    A run of the schedule's own length uses it as is. A shorter run that is a slice of the
    schedule's full sigma list (KSamplerAdvanced start/end steps, a second sampler continuing the
    first) takes the matching slice. Anything else (denoise < 1 with another step count, a custom
    sigma list) gets the schedule resampled to its length. The run's first step is always full:
    its cache starts empty.
    """
    steps = len(sigmas) - 1
    notes: list[str] = []
    units = schedule.units          # a router's per-unit table follows the steps it belongs to
    if steps == schedule.steps:
        kinds = list(schedule.kinds)
    else:
        offset = _offset_in_full_schedule(schedule.steps, sigmas, model_sampling)
        if offset is not None:
            kinds = list(schedule.kinds[offset:offset + steps])
            units = units[offset:offset + steps] if units is not None else None
            notes.append(f"this sampler runs steps {offset}..{offset + steps - 1} of the {schedule.steps}-step schedule")
        else:
            resampled = schedule.resampled(steps)
            kinds, units = list(resampled.kinds), resampled.units
            notes.append(resampled.notes[-1])
    if kinds[0] != StepKind.FULL:
        kinds[0] = StepKind.FULL
    if units is not None:
        units = ((True,) * len(units[0]),) + tuple(units[1:])
    return Schedule(kinds=tuple(kinds), name=schedule.name, family=schedule.family, sampler=schedule.sampler,
                    provenance=schedule.provenance, units=units), notes


def _offset_in_full_schedule(total: int, sigmas: list[float], model_sampling) -> int | None:
    if model_sampling is None or len(sigmas) - 1 > total:
        return None
    run = torch.tensor(sigmas[:-1])          # the last sigma may have been forced to 0
    for name in comfy.samplers.SCHEDULER_NAMES:
        try:
            full = comfy.samplers.calculate_sigmas(model_sampling, name, total).float().cpu()
        except Exception:        # some schedulers need model details we do not have; skip them
            continue
        for offset in range(0, total - len(run) + 1):
            window = full[offset:offset + len(run)]
            if torch.allclose(window, run, rtol=1e-4, atol=1e-6):
                return offset
    return None


# ---- APPLY_MODEL ----------------------------------------------------------------------------
def apply_model_wrapper(executor, *args, **kwargs):
    transformer_options = kwargs.get("transformer_options")
    if transformer_options is None:
        transformer_options = args[5] if len(args) > 5 else {}
    run: Run | None = transformer_options.get(RUN_KEY)
    if run is None or run.closed:
        return executor(*args, **kwargs)
    base_model = executor.class_obj
    sigma = transformer_options.get("sigmas")
    if sigma is None:
        sigma = args[1]
    batch = args[0].shape[0]
    streams = stream_ids(transformer_options, batch)
    request = getattr(run, "plan_request", None)
    if request is not None:          # the run's first model call: plan the cache once
        run.plan_request = None
        plan_cache(run, request, base_model.diffusion_model, float(sigma.flatten()[0]), streams, args[0].device,
                   lambda: executor(*args, **kwargs))
    while True:
        try:
            with run.model_call(base_model.diffusion_model, float(sigma.flatten()[0]), streams):
                return executor(*args, **kwargs)
        except OUT_OF_MEMORY:
            pass    # recover outside the except block: its traceback still holds the failed call's tensors
        step = run.clock.step_for(float(sigma.flatten()[0]))
        if not coarsen_out_of_memory(run, step):
            break
    stop_caching_out_of_memory(run, step)
    return executor(*args, **kwargs)


def coarsen_out_of_memory(run: Run, step: int) -> bool:
    """After an allocation failure: free the cache and go on at the next coarser granularity
    (this call and the next ones compute until the new cache is filled). False when there is
    nothing coarser left."""
    previous = run.rung
    plan = run.coarsen(f"out of memory at step {step}")
    comfy.model_management.soft_empty_cache()
    if run.rung == previous:
        return False
    what = plan.text() if plan is not None else "one model-level residual"
    message = (f"out of memory while caching at step {step}: ProCache freed its cache and goes on with a smaller "
               f"one ({what}); the image still comes out. A lower memory budget in ProCache Apply plans this "
               "from the start.")
    run.stats.notes.append(message)
    log.warning("ProCache: %s", message)
    return True


def stop_caching_out_of_memory(run: Run, step: int) -> None:
    """Free the run's cache and let the rest of the run compute as if ProCache were not attached."""
    message = (f"out of memory while caching at step {step}: ProCache freed its cache and computes the rest of "
               "this run in full. Turn on 'cache_on_cpu' in ProCache Apply to keep the cache in system RAM, "
               "or cache fewer steps.")
    run.stats.notes.append(message)
    run.stats.computed_in_full_from(step, run.clock)
    run.close()
    log.warning("ProCache: %s", message)
    comfy.model_management.soft_empty_cache()


def stream_ids(transformer_options: dict, batch: int) -> tuple[str, ...]:
    """One id per batch chunk: its role (positive, negative) and ComfyUI's per-conditioning uuid, else the
    role and its position among the chunks of that role."""
    uuids = transformer_options.get("uuids")
    cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
    if uuids and len(uuids) == len(cond_or_uncond) and batch % len(uuids) == 0:
        # the role first: the panel names streams by it (procache_core.stats.stream_labels)
        return tuple(f"{'negative' if c == 1 else 'positive'}:{u}" for c, u in zip(cond_or_uncond, uuids))
    if batch % len(cond_or_uncond) == 0:
        seen: dict[int, int] = {}
        ids = []
        for c in cond_or_uncond:         # the n-th positive chunk is the same stream in every call
            seen[c] = seen.get(c, -1) + 1
            ids.append(f"{'negative' if c == 1 else 'positive'}-{seen[c]}")
        return tuple(ids)
    return ("all",)
