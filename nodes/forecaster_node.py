"""Forecasters for cached steps: "ProCache Forecaster" picks one, "ProCache Forecaster Trainer"
fits one on the user's own graph.

A fitted forecaster travels inside the workflow: the trainer keeps its coefficients as text in its
own `fitted` widget (the web extension fills it in after a run), and reuses that text instead of
calibrating again as long as the settings it was fitted for are unchanged.
"""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from ..procache_core import Schedule, ScheduleError
from ..procache_core.forecast import MAX_DEGREE, ForecastError, ForecastFitter, Online, Taylor, from_json
from . import library
from .runtime import record_full_compute, sampling_inputs
from .schedule_loader import SCHEDULE

log = logging.getLogger("procache")

FORECASTER = io.Custom("PROCACHE_FORECASTER")
BUILT_IN = {"reuse (no forecast)": None, "taylor 1": Taylor(1), "taylor 2": Taylor(2)}
ONLINE = "online (chebyshev)"
FROM_TEXT = "fitted (text below)"
FILE_PREFIX = "file: "


def forecaster_dir() -> str | None:
    return library.pack_dir("forecasters")


def saved_forecasters() -> dict[str, str]:
    """name -> path of the forecaster JSON files in the user's folder (listed names only)."""
    return library.saved_files(forecaster_dir(), ".json")


def load_forecaster(source: str, text: str, degree: int = 2, forgetting: float = 0.5):
    if source in BUILT_IN:
        return BUILT_IN[source]
    if source == ONLINE:
        return Online(degree, forgetting)
    if source == FROM_TEXT:
        if not text.strip():
            raise ForecastError("the forecaster text is empty: paste a forecaster JSON, or pick a built-in one")
        return from_json(text)
    if source.startswith(FILE_PREFIX):
        path = saved_forecasters().get(source[len(FILE_PREFIX):])
        if path is None:
            raise ForecastError(f"no saved forecaster named {source[len(FILE_PREFIX):]!r}")
        if os.path.getsize(path) > library.MAX_FILE_BYTES:
            raise ForecastError("forecaster file is larger than 1 MiB")
        with open(path, encoding="utf-8") as f:
            return from_json(f.read())
    raise ForecastError(f"unknown forecaster source {source!r}")


class ProCacheForecaster(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProCacheForecaster",
            display_name="ProCache Forecaster",
            category="ProCache/forecast",
            description="How cached steps estimate a skipped branch: copy the last full step (reuse), "
                        "extrapolate from the last two or three (Taylor), fit a curve over this run's full steps "
                        "(online), or use coefficients fitted on your model. Under SDE and ancestral samplers "
                        "cached steps reuse, and a branch whose forecasts miss more than reuse reuses (the run "
                        "report says so).",
            inputs=[
                io.Combo.Input("source", options=[*BUILT_IN, ONLINE, FROM_TEXT]
                               + [FILE_PREFIX + n for n in saved_forecasters()],
                               default="taylor 1",
                               tooltip="taylor 1 / taylor 2: extrapolation from the noise levels of the last 2 / 3 "
                                       "full steps, no training. online: a Chebyshev polynomial over the run's "
                                       "steps per branch, fitted by ridge regression on this run's full steps, no "
                                       "training. fitted: JSON from ProCache Forecaster Trainer."),
                io.String.Input("text", multiline=True, default="", optional=True,
                                tooltip="Forecaster JSON (source 'fitted (text below)'); kept in the workflow."),
                io.Int.Input("degree", default=2, min=1, max=MAX_DEGREE, optional=True,
                             tooltip="online: degree of the polynomial. Memory: degree + 2 tensors per cached "
                                     "branch and CFG stream, whatever the number of steps."),
                io.Float.Input("forgetting", default=0.5, min=0.05, max=1.0, step=0.05, optional=True,
                               tooltip="online: weight an older full step keeps at each new one. 1: all full "
                                       "steps count alike; lower follows the recent trajectory more closely."),
                io.Boolean.Input("guard", default=True, optional=True,
                                 tooltip="At every full step, compare each branch's forecast with plain reuse; a "
                                         "branch whose recent forecasts missed more reuses until they catch up."),
                io.Boolean.Input("sampler_aware", default=True, optional=True,
                                 tooltip="Reuse instead of forecasting under SDE and ancestral samplers (their "
                                         "injected noise makes extrapolation overshoot). Off: forecast the same "
                                         "under every sampler."),
                io.Float.Input("frequency_cutoff", default=1.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Forecast only the coarse detail of each image branch: its spatial "
                                       "frequencies up to this fraction of the finest the token grid holds; the "
                                       "finer detail is reused from the last full step. Lower reuses more. 1: "
                                       "every frequency is forecast (off). No extra memory. Text tokens and "
                                       "joint text + image blocks are forecast whole."),
            ],
            outputs=[FORECASTER.Output(display_name="forecaster", tooltip="Connect to ProCache Apply.")],
        )

    @classmethod
    def validate_inputs(cls, source, text="", degree=2, forgetting=0.5, guard=True,
                        sampler_aware=True, frequency_cutoff=1.0) -> bool | str:
        try:
            _configured(source, text, degree, forgetting, guard, sampler_aware, frequency_cutoff)
        except ForecastError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, source, text="", degree=2, forgetting=0.5, guard=True,
                sampler_aware=True, frequency_cutoff=1.0) -> io.NodeOutput:
        forecaster = _configured(source, text, degree, forgetting, guard, sampler_aware, frequency_cutoff)
        label = forecaster.label() if forecaster else "reuse"
        return io.NodeOutput(forecaster, ui={"text": [label]})


def default_forecaster():
    """What ProCache Apply forecasts with when nothing is connected to its forecaster input: this
    node's defaults (Taylor 1, guard on, sampler-aware, no frequency split). On the reference models
    it is what lifts ~3x schedules above fewer steps at the same FLOPs, where plain reuse falls below."""
    return _configured("taylor 1", "", 2, 0.5, True, True, 1.0)


def _configured(source, text, degree, forgetting, guard, sampler_aware, frequency_cutoff=1.0):
    forecaster = load_forecaster(source, text or "", degree, forgetting)
    if forecaster is None:      # reuse: nothing is forecast, so there is nothing to split
        return None
    return forecaster.with_safeguards(guard, sampler_aware).with_frequency_split(frequency_cutoff)


class ProCacheForecasterTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProCacheForecasterTrainer",
            display_name="ProCache Forecaster Trainer",
            category="ProCache/forecast",
            description="Runs a few full-compute samples of your graph, records each cached branch along the "
                        "schedule and fits forecast coefficients per step by least squares (seconds after sampling).",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model the forecaster is for (the same one Apply gets)."),
                io.Conditioning.Input("positive", tooltip="Your prompt: calibration uses your own conditioning."),
                io.Conditioning.Input("negative", tooltip="Your negative prompt (used when cfg > 1)."),
                io.Latent.Input("latent_image", tooltip="Same size as the latent you will sample."),
                SCHEDULE.Input("schedule", tooltip="The schedule the forecaster will serve: its full steps feed "
                                                   "the history, its cached steps are the fit targets."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="First calibration seed; the others follow it."),
                io.Int.Input("samples", default=2, min=1, max=16,
                             tooltip="Full-compute calibration runs. Each costs one normal sampling run."),
                *sampling_inputs(),
                io.Int.Input("history", default=2, min=1, max=3,
                             tooltip="How many past full-step values each forecast combines (memory: this many "
                                     "tensors per cached branch and CFG stream)."),
                io.Combo.Input("grouping", options=["role", "role+depth"], default="role",
                               tooltip="role: one set of coefficients per step and branch kind. role+depth: "
                                       "separate ones for shallow, middle and deep blocks."),
                io.String.Input("save_name", default="", optional=True,
                                tooltip="Also save as <user>/procache/forecasters/<name>.json (letters, digits, - _ .)."),
                io.String.Input("fitted", multiline=True, default="", optional=True,
                                tooltip="Filled in after a run: the fitted coefficients, kept in the workflow. "
                                        "While the settings match, they are used without calibrating again."),
            ],
            outputs=[
                FORECASTER.Output(display_name="forecaster", tooltip="Connect to ProCache Apply."),
                io.String.Output(display_name="json", tooltip="The fitted forecaster as JSON."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, schedule: Schedule, seed, samples, sampler_name,
                scheduler, steps, cfg, history, grouping, save_name="", fitted="") -> io.NodeOutput:
        if save_name:
            library.check_name(save_name, "forecaster", ForecastError)     # before the runs, not after them
        if steps != schedule.steps:
            schedule = schedule.resampled(steps)
        settings = {"pattern": schedule.pattern, "sampler": sampler_name, "scheduler": scheduler, "steps": steps,
                    "cfg": cfg, "seed": seed, "samples": samples, "history": history, "grouping": grouping}
        forecaster = _reusable(fitted, settings)
        if forecaster is None:
            forecaster = calibrate(model, positive, negative, latent_image, schedule, settings)
        text = forecaster.to_json()
        if save_name:
            _save(save_name, text)
        return io.NodeOutput(forecaster, text, ui={"text": [forecaster.describe()], "fitted": [text]})


def _reusable(fitted: str, settings: dict):
    def parse(text):
        forecaster = from_json(text)
        return forecaster, getattr(forecaster, "metadata", {}).get("settings")
    return library.stored_result(fitted, parse, settings, "fitted forecaster", "calibrating")


def calibrate(model, positive, negative, latent_image, schedule: Schedule, settings: dict):
    """Full-compute runs with a recorder attached; returns the fitted forecaster."""
    fitter = ForecastFitter(schedule.kinds, history=settings["history"], grouping=settings["grouping"])
    record_full_compute(model, fitter, settings, positive, negative, latent_image, "calibration")
    if fitter.samples == 0:
        raise ScheduleError("the schedule has no cached steps (or the model runs at model level): nothing to fit")
    return fitter.fit({"settings": settings, "model": type(model.model.diffusion_model).__name__})


def _save(name: str, text: str) -> str:
    return library.save_user_file(forecaster_dir(), name, ".json", text + "\n", "forecaster", ForecastError)
