"""EOC-style correction of reused features: "EOC Prior Extractor" records how each cached branch
changes from step to step on the user's own graph; "EOC Correction" sets the strength and the
judgment and feeds ProCache Apply, whatever the schedule.

The prior travels inside the workflow when it is small enough (channel pooling usually is): the
extractor keeps it as text in its own `prior` widget (the web extension fills it in after a run)
and reuses that text instead of extracting again while the settings match. Larger priors are saved
as files (save_name) or extracted again, deterministically, from the same seeds.
"""
from __future__ import annotations

import hashlib
import logging

import torch
from comfy_api.latest import io

from ..procache_core import Schedule
from ..procache_core.eoc import Correction, EOCError, Prior, PriorRecorder, check_file
from . import library
from .runtime import record_full_compute, sampling_inputs
from .schedule_loader import SCHEDULE

log = logging.getLogger("procache")

EOC_PRIOR = io.Custom("PROCACHE_EOC_PRIOR")
EOC = io.Custom("PROCACHE_EOC")
MAX_WIDGET_CHARS = 2 << 20        # larger priors stay out of the workflow (files or re-extraction)
NO_FILE = "none (connect a prior)"


def prior_dir() -> str | None:
    return library.pack_dir("eoc_priors")


def saved_priors() -> dict[str, str]:
    """name -> path of the prior files in the user's folder."""
    return library.saved_files(prior_dir(), ".safetensors")


def _fingerprint(*conditionings) -> str:
    """A short hash of the conditioning tensors: another prompt means another prior."""
    digest = hashlib.sha256()
    for conditioning in conditionings:
        for tensor, extra in conditioning:
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            for key in sorted(extra):
                value = extra[key]
                if isinstance(value, torch.Tensor):
                    digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
                elif isinstance(value, (int, float, str, bool)):
                    digest.update(f"{key}={value}".encode())
    return digest.hexdigest()[:16]


class EOCPriorExtractor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProCacheEOCPriorExtractor",
            display_name="EOC Prior Extractor",
            category="ProCache/eoc",
            description="Samples your graph at full compute on several seeds and records, per step and cached "
                        "branch, the mean branch output (the prior EOC corrects reused features with).",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model the prior is for (the same one Apply gets)."),
                io.Conditioning.Input("positive", tooltip="Your prompt: the prior is taken on your own conditioning."),
                io.Conditioning.Input("negative", tooltip="Your negative prompt (used when cfg > 1)."),
                io.Latent.Input("latent_image", tooltip="Same size as the latent you will sample."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="First seed of the extraction runs; the others follow it. Use other seeds "
                                     "than your final image's: the prior should describe any seed."),
                io.Int.Input("samples", default=8, min=1, max=256,
                             tooltip="Full-compute runs to average (each costs one normal sampling run). More "
                                     "seeds: a prior that fits new seeds better."),
                *sampling_inputs(),
                io.Combo.Input("pooling", options=["channel", "token"], default="channel",
                               tooltip="channel: one mean vector per step and branch (small, fits in the workflow). "
                                       "token: a mean per token (as the paper; much larger, tied to the resolution)."),
                SCHEDULE.Input("schedule", optional=True,
                               tooltip="The schedule you will cache with: the statistics the judgment uses then "
                                       "cover its own reuse gaps. Without it: gaps of 1 and 2 steps."),
                io.String.Input("save_name", default="", optional=True,
                                tooltip="Also save as <user>/procache/eoc_priors/<name>.safetensors (letters, digits, - _ .)."),
                io.String.Input("prior", multiline=True, default="", optional=True,
                                tooltip="Filled in after a run when the prior is small enough: kept in the workflow "
                                        "and used without extracting again while the settings match."),
            ],
            outputs=[
                EOC_PRIOR.Output(display_name="prior", tooltip="Connect to EOC Correction."),
                io.String.Output(display_name="summary", tooltip="What the prior holds."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, samples, sampler_name, scheduler, steps, cfg,
                pooling, schedule: Schedule | None = None, save_name="", prior="") -> io.NodeOutput:
        if save_name:
            library.check_name(save_name, "prior", EOCError)     # before the runs, not after them
        if schedule is not None and schedule.steps != steps:
            schedule = schedule.resampled(steps)
        settings = {"model": type(model.model.diffusion_model).__name__, "sampler": sampler_name,
                    "scheduler": scheduler, "steps": steps, "cfg": cfg, "seed": seed, "samples": samples,
                    "pooling": pooling, "latent": list(latent_image["samples"].shape),
                    "conditioning": _fingerprint(positive, negative),
                    "pattern": schedule.pattern if schedule is not None else ""}
        result = _reusable(prior, settings)
        if result is None:
            result = extract(model, positive, negative, latent_image, settings,
                             schedule.kinds if schedule is not None else None)
        text = result.to_json()
        if save_name:
            path = _save(save_name, result)
            log.info("ProCache: EOC prior saved to %s", path)
        summary = result.describe()
        ui = {"text": [summary]}
        if len(text) <= MAX_WIDGET_CHARS:
            ui["prior"] = [text]
        else:
            summary += ("\nToo large to keep in the workflow: save it (save_name) and load it in EOC Correction, "
                        "or let the graph extract it again (same seeds, same prior).")
        return io.NodeOutput(result, summary, ui=ui)


def _reusable(text: str, settings: dict) -> Prior | None:
    def parse(text):
        prior = Prior.from_json(text)
        return prior, prior.metadata.get("settings")
    return library.stored_result(text, parse, settings, "EOC prior", "extracting")


def extract(model, positive, negative, latent_image, settings: dict, kinds=None) -> Prior:
    """Full-compute runs with a prior recorder attached; returns the prior."""
    recorder = PriorRecorder(settings["pooling"], kinds=kinds)
    record_full_compute(model, recorder, settings, positive, negative, latent_image, "EOC prior extraction")
    if not recorder.means:
        raise EOCError(f"{settings['model']} runs without a branch-level family (model-level fallback or a UNet): "
                       "EOC corrects branch outputs and has nothing to record here")
    return recorder.prior({"settings": settings})


def _save(name: str, prior: Prior) -> str:
    return library.save_user_file(prior_dir(), name, ".safetensors", prior.to_bytes(), "prior", EOCError)


def load_saved(name: str) -> Prior:
    path = saved_priors().get(name)
    if path is None:
        raise EOCError(f"no saved EOC prior named {name!r}")
    return Prior.load(path)


class EOCCorrection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProCacheEOCCorrection",
            display_name="EOC Correction",
            category="ProCache/eoc",
            description="Corrects reused branch outputs with the prior's change since they were cached: "
                        "reused = cached + gamma x (prior now - prior then), on the reuse steps the judgment picks. "
                        "Works with any schedule.",
            inputs=[
                EOC_PRIOR.Input("prior", optional=True, tooltip="From EOC Prior Extractor."),
                io.Combo.Input("saved_prior", options=[NO_FILE, *saved_priors()], default=NO_FILE,
                               tooltip="Or a prior saved by the extractor (used when nothing is connected)."),
                io.Float.Input("gamma", default=0.5, min=0.0, max=2.0, step=0.05,
                               tooltip="Correction strength. 0: plain reuse. 1: the full prior drift (best when "
                                       "the prior was taken on the very same seed; below 1 for new seeds)."),
                io.Float.Input("threshold", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Correct only where the prior changed by at least this share since the "
                                       "cached step (0: wherever the gain test passes)."),
                io.Float.Input("min_gain", default=0.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="Correct only where the calibration runs say the correction removes more "
                                       "than this share of the reuse error (0: wherever it is expected to help)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Correct only the reuse steps before this share of the run."),
            ],
            outputs=[EOC.Output(display_name="eoc", tooltip="Connect to ProCache Apply.")],
        )

    @classmethod
    def validate_inputs(cls, saved_prior=NO_FILE) -> bool | str:
        if saved_prior == NO_FILE:
            return True
        path = saved_priors().get(saved_prior)
        if path is None:
            return f"no saved EOC prior named {saved_prior!r}"
        try:
            check_file(path)            # size and header only: the tensors are read when the node runs
        except EOCError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, saved_prior, gamma, threshold, min_gain, end_percent, prior: Prior | None = None) -> io.NodeOutput:
        if prior is None:
            if saved_prior == NO_FILE:
                raise EOCError("connect an EOC Prior Extractor, or pick a saved prior")
            prior = load_saved(saved_prior)
        if not isinstance(prior, Prior):
            raise EOCError(f"the prior input got {type(prior).__name__}: connect EOC Prior Extractor")
        correction = Correction(prior, gamma, threshold, min_gain, end=end_percent)
        return io.NodeOutput(correction, ui={"text": [correction.describe()]})
