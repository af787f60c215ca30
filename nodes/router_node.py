"""HarmoniCa routers in ComfyUI: "HarmoniCa Router Trainer" learns a per-step, per-unit compute
table on the connected model (no images: SDT + IEPO on the user's conditioning and seeds), and
"HarmoniCa Router Loader" reads a saved one. Both output a schedule for ProCache Apply.

Training runs inside one ComfyUI sampling call with a sampler of its own, so ComfyUI prepares the
conditioning, guidance and model loading exactly as for a KSampler; within it the trainer starts a
fresh trajectory per training seed. The trained router travels inside the workflow: the trainer
keeps it as text in its own `router` widget (the web extension fills it in after a run) and uses
that text instead of training again while the settings it was trained with are unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..procache_core import ScheduleError, find_family
from ..procache_core.router import MAX_ROUTER_BYTES, Router
from ..procache_core.router_training import LAMBDA_MODES, RouterTrainer, SigmaProblem, TrainingConfig, TrainingState
from . import library
from .runtime import plain_clone
from .schedule_loader import SCHEDULE, describe

log = logging.getLogger("procache")

TRAINING_SAMPLERS = {"euler": "euler", "ddim": "euler", "dpmpp_2m": "dpmpp_2m"}   # ComfyUI's ddim is euler
FROM_TEXT = "router text (below)"
TRAINABLE_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
FILE_PREFIX = "file: "
MAX_STATE_BYTES = 4 * MAX_ROUTER_BYTES      # logits plus the optimiser's two moments and the step weights


def router_dir() -> str | None:
    return library.pack_dir("routers")


def saved_routers() -> dict[str, str]:
    """name -> path of the router files in the user's folder (.partial files of interrupted runs not listed)."""
    return library.saved_files(router_dir(), ".safetensors")


def load_router(source: str, text: str) -> Router:
    if source == FROM_TEXT:
        if not (text or "").strip():
            raise ScheduleError("the router text is empty: paste the text of a HarmoniCa Router Trainer, or pick a file")
        return Router.from_text(text)
    if source.startswith(FILE_PREFIX):
        path = saved_routers().get(source[len(FILE_PREFIX):])
        if path is None:
            raise ScheduleError(f"no saved router named {source[len(FILE_PREFIX):]!r}")
        return Router.load(path)
    raise ScheduleError(f"unknown router source {source!r}")


def report(router: Router) -> str:
    schedule = router.to_schedule()
    meta = router.metadata
    trained = ", ".join(f"{k} {meta[k]}" for k in ("model", "sampler", "scheduler", "steps", "cfg", "beta", "lambda_mode")
                        if meta.get(k))
    return f"{router.describe()}\ntrained on: {trained or 'unknown'}\n{describe(schedule)}\n{router.heatmap()}"


class HarmoniCaRouterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProCacheHarmoniCaRouterLoader",
            display_name="HarmoniCa Router Loader",
            category="ProCache/harmonica",
            description="A trained HarmoniCa router (which attention and MLP units compute at each step) as a "
                        "schedule for ProCache Apply.",
            inputs=[
                io.Combo.Input("source", options=[FROM_TEXT] + [FILE_PREFIX + n for n in saved_routers()],
                               default=FROM_TEXT,
                               tooltip="A router saved by HarmoniCa Router Trainer (<user>/procache/routers), or "
                                       "the router text below."),
                io.String.Input("text", multiline=True, default="", optional=True,
                                tooltip="Router text from HarmoniCa Router Trainer; kept in the workflow."),
            ],
            outputs=[SCHEDULE.Output(display_name="schedule", tooltip="Connect to ProCache Apply."),
                     io.String.Output(display_name="report", tooltip="Cache usage and the unit map per step.")],
        )

    @classmethod
    def validate_inputs(cls, source, text="") -> bool | str:
        try:
            load_router(source, text or "")
        except ScheduleError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, source, text="") -> io.NodeOutput:
        router = load_router(source, text or "")
        text_out = report(router)
        return io.NodeOutput(router.to_schedule(), text_out, ui={"text": [text_out]})


class HarmoniCaRouterTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProCacheHarmoniCaRouterTrainer",
            display_name="HarmoniCa Router Trainer",
            category="ProCache/harmonica",
            description="Learns which attention and MLP units of each block to compute at each step (HarmoniCa: "
                        "step-wise denoising training with the image-error-proxy objective). No images: it samples "
                        "your conditioning from fresh noise per seed. Slow: about three model calls per iteration.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model the router is for (the same one Apply gets). Needs "
                                                "fp16/bf16/fp32 weights: gradients flow through the blocks."),
                io.Conditioning.Input("positive", tooltip="Your prompt(s): training uses your own conditioning."),
                io.Conditioning.Input("negative", tooltip="Your negative prompt (used when cfg > 1)."),
                io.Latent.Input("latent_image", tooltip="Same size as the latent you will sample."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Noise of the first training trajectory; trajectory j uses seed + j."),
                io.Combo.Input("sampler_name", options=list(TRAINING_SAMPLERS), default="euler",
                               tooltip="Train with the sampler you will use (ddim is ComfyUI's euler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="As in your KSampler."),
                io.Int.Input("steps", default=20, min=2, max=1000,
                             tooltip="A router is valid for this step count (one row per step)."),
                io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1,
                               tooltip="As in your KSampler: a router is trained for one guidance scale."),
                io.Int.Input("iterations", default=1000, min=1, max=1_000_000,
                             tooltip="Training steps (each sampler step of a trajectory is one; the first step of "
                                     "each trajectory runs without gradients). The paper used 20000 at 10 steps."),
                # tiny values: step 1e-8 and no rounding, so the authors' 7e-8 survives the widget
                io.Float.Input("beta", default=7e-8, min=0.0, max=1.0, step=1e-8, round=False,
                               tooltip="Weight of the compute penalty: higher caches more units (faster, less exact). "
                                       "The only speed/quality knob; its scale depends on the model. The authors used "
                                       "7e-8; on the pack's reference DiT 4e-8 to 4e-7 reused 38 to 54 % of the "
                                       "units, and 1e-5 almost all of them."),
                io.Float.Input("learning_rate", default=0.01, min=1e-6, max=10.0, step=0.001,
                               tooltip="AdamW on the router logits (the authors: 0.01 with 20000 iterations; "
                                       "raise it for short runs)."),
                io.Float.Input("tau", default=0.1, min=0.01, max=0.99, step=0.01,
                               tooltip="A unit computes when sigmoid(logit) > tau; the same at training and inference."),
                io.Int.Input("lambda_period", default=500, min=1, max=1_000_000,
                             tooltip="C: iterations between refreshes of the per-step weights lambda (each refresh "
                                     "costs steps x steps model calls without gradients)."),
                io.Combo.Input("lambda_mode", options=list(LAMBDA_MODES), default="code",
                               tooltip="code: caching switched on step by step, as the released code does. paper: "
                                       "leave-one-step-out, as the paper defines lambda."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue an interrupted run with the same settings from its last saved "
                                         "trajectory instead of starting over."),
                io.String.Input("save_name", default="", optional=True,
                                tooltip="Also save as <user>/procache/routers/<name>.safetensors (letters, digits, - _ .)."),
                io.String.Input("router", multiline=True, default="", optional=True,
                                tooltip="Filled in after a run: the trained router, kept in the workflow. While the "
                                        "settings match, it is used without training again."),
                # beyond the paper (docs/harmonica.md): off by default; last, so older workflows keep their values
                io.Int.Input("max_reuse", default=0, min=0, max=1000, optional=True,
                             tooltip="0: the method as published. N > 0: a unit computes after reusing N steps in a "
                                     "row (in training and in the router), so no cache goes stale for long. On the "
                                     "reference DiT it helped the published loss at 55-65 % reuse, not refresh_credit."),
                io.Boolean.Input("refresh_credit", default=False, optional=True,
                                 tooltip="Off: the method as published. On: each step's compute is also credited "
                                         "with what its fresher cache saves at the steps that reuse it. On the "
                                         "reference DiT it gave routers that beat evenly spaced reuse at the same "
                                         "cache usage (best with lambda_mode paper); the published loss did not. "
                                         "Memory: one more cache-sized "
                                         "tensor per unit for each step it reuses in a row (max_reuse bounds it)."),
            ],
            outputs=[
                SCHEDULE.Output(display_name="schedule", tooltip="Connect to ProCache Apply."),
                io.String.Output(display_name="router", tooltip="The trained router as text."),
                io.String.Output(display_name="report", tooltip="Cache usage, loss and the unit map per step."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, sampler_name, scheduler, steps, cfg, iterations,
                beta, learning_rate, tau, lambda_period, lambda_mode, resume=True, save_name="", router="",
                max_reuse=0, refresh_credit=False) -> io.NodeOutput:
        if save_name:
            library.check_name(save_name, "router")     # before the training, not after it
        settings = {"seed": seed, "sampler": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg,
                    "iterations": iterations, "beta": beta, "lr": learning_rate, "tau": tau,
                    "lambda_period": lambda_period, "lambda_mode": lambda_mode,
                    "latent": list(latent_image["samples"].shape)}
        # only when set, so a router trained before these options existed still matches its settings
        if max_reuse:
            settings["max_reuse"] = max_reuse
        if refresh_credit:
            settings["refresh_credit"] = True
        trained = _reusable(router, settings)
        note = "router text reused (settings unchanged)"
        if trained is None:
            config = TrainingConfig(iterations=iterations, beta=beta, lr=learning_rate, tau=tau,
                                    lambda_period=lambda_period, lambda_mode=lambda_mode, seed=seed % (2 ** 31),
                                    max_reuse=max_reuse, refresh_credit=bool(refresh_credit))
            trained, note = train(model, positive, negative, latent_image, settings, config, resume)
        if save_name:
            _save(save_name, trained)
        text = trained.to_text()
        summary = f"{note}\n{report(trained)}"
        return io.NodeOutput(trained.to_schedule(), text, summary, ui={"text": [summary], "router": [text]})


def _save(name: str, router: Router) -> str:
    return library.save_user_file(router_dir(), name, ".safetensors", router.to_bytes(), "router")


def _reusable(text: str, settings: dict) -> Router | None:
    def parse(text):
        router = Router.from_text(text)
        return router, router.metadata.get("settings")      # kept as JSON text (safetensors metadata)
    return library.stored_result(text, parse, json.dumps(settings, sort_keys=True), "HarmoniCa router", "training")


def _partial_path(settings: dict, model) -> str | None:
    folder = router_dir()
    if folder is None:
        return None
    key = json.dumps({"settings": settings, "model": type(model.model.diffusion_model).__name__}, sort_keys=True)
    return os.path.join(folder, f".partial-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors")


def _trainable(module: torch.nn.Module) -> None:
    # Weights loaded while ComfyUI runs under inference_mode are inference tensors, which autograd
    # may not save; swap each for an ordinary copy of itself (same values, one tensor at a time).
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


def _rope1(x, freqs_cis):
    # ComfyUI's plain-torch rotary embedding (comfy/ldm/flux/math.py without comfy_kitchen)
    x_ = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _rope(xq, xk, freqs_cis):
    return _rope1(xq, freqs_cis), _rope1(xk, freqs_cis)


@contextlib.contextmanager
def _differentiable_rope():
    """comfy_kitchen's fused rotary embedding (ComfyUI >= 0.4) has no backward: while training,
    the model modules that imported it use the plain-torch formula instead (restored after)."""
    try:
        import comfy.quant_ops
        kitchen = {"apply_rope": comfy.quant_ops.ck.apply_rope, "apply_rope1": comfy.quant_ops.ck.apply_rope1}
    except Exception:           # older ComfyUI: plain torch already
        yield
        return
    plain = {"apply_rope": _rope, "apply_rope1": _rope1}
    swapped = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("comfy.ldm"):
            continue
        for attr, op in kitchen.items():
            if getattr(module, attr, None) is op:
                setattr(module, attr, plain[attr])
                swapped.append((module, attr, op))
    try:
        yield
    finally:
        for module, attr, op in swapped:
            setattr(module, attr, op)


def _copies_for_backward():
    """Several ComfyUI blocks add into their residual stream in place (Flux: `img += ...`), which
    autograd refuses for a tensor it saved; the backward keeps its own copy of each saved
    activation instead (weights are kept as they are)."""
    def pack(t):
        return t if isinstance(t, torch.nn.Parameter) else t.clone()
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


class _TrainingSampler(comfy.samplers.KSAMPLER):
    """A ComfyUI sampler whose body is the whole training: it gets ComfyUI's guided model call."""

    def __init__(self, body):
        super().__init__(self._function)
        self.body = body
        self.start = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        sampling = model_wrap.inner_model.model_sampling
        max_denoise = self.max_denoise(model_wrap, sigmas)
        self.start = lambda n: sampling.noise_scaling(sigmas[0], n, latent_image, max_denoise)
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    def _function(self, model, x, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        self.body(model, x, sigmas, extra_args or {}, self.start)
        return x


def train(model, positive, negative, latent_image, settings: dict, config: TrainingConfig, resume: bool):
    """Train a router on `model`; returns (router, note)."""
    diffusion_model = model.model.diffusion_model
    family, sentence = find_family(diffusion_model)
    if family is None:
        raise ScheduleError(f"{sentence}: a HarmoniCa router needs a model with branch-level caching")
    stored = {p.dtype for p in diffusion_model.parameters()}
    if not stored <= TRAINABLE_DTYPES:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in stored - TRAINABLE_DTYPES))
        raise ScheduleError(f"router training needs fp32, fp16 or bf16 weights (gradients flow through every block); "
                            f"this model stores {names}: load it with weight_dtype 'default' from an fp16/bf16 file")
    patched = plain_clone(model)      # training routes the blocks itself
    latent = comfy.sample.fix_empty_latent_channels(patched, latent_image["samples"])
    sigmas = comfy.samplers.calculate_sigmas(patched.get_model_object("model_sampling"), settings["scheduler"],
                                             settings["steps"]).cpu()
    partial = _partial_path(settings, model)
    state, note = None, "trained"
    if resume and partial and library.inside(os.path.dirname(partial), partial):
        try:
            with open(partial, "rb") as f:
                data = f.read(MAX_STATE_BYTES + 1)
            if len(data) > MAX_STATE_BYTES:
                raise ScheduleError(f"{partial} is larger than {MAX_STATE_BYTES >> 20} MiB")
            state, _ = TrainingState.from_bytes(data)
            note = f"resumed at iteration {state.iteration}"
        except Exception as e:      # a damaged partial file only costs the progress it held
            log.warning("ProCache: could not resume router training (%s); starting over", e)
    metadata = {"model": type(diffusion_model).__name__, "family": family.name, "sampler": settings["sampler"],
                "scheduler": settings["scheduler"], "steps": settings["steps"], "cfg": settings["cfg"],
                "sigmas": json.dumps([round(float(s), 6) for s in sigmas]),
                "settings": json.dumps(settings, sort_keys=True)}
    bar = comfy.utils.ProgressBar(config.iterations)
    holder = {}

    def progress(iteration, total, info):
        bar.update_absolute(min(iteration, total), total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    def body(guided, x, run_sigmas, extra_args, start):
        with torch.inference_mode(False):
            _trainable(diffusion_model)
            s_in = x.new_ones([x.shape[0]])

            def denoise(x, sigma):
                return guided(x, sigma * s_in, **extra_args)

            def start_trajectory(j):
                noise = comfy.sample.prepare_noise(latent, settings["seed"] + j).to(x.device, x.dtype)
                return start(noise).clone()

            problem = SigmaProblem(diffusion_model, denoise, run_sigmas.cpu(), start_trajectory,
                                   sampler=TRAINING_SAMPLERS[settings["sampler"]])
            trainer = RouterTrainer(problem, family, config, state=state, metadata=metadata,
                                    grad_context=_copies_for_backward)
            holder["trainer"] = trainer
            bar.update_absolute(trainer.state.iteration, config.iterations)
            holder["router"] = trainer.run(progress)

    noise = comfy.sample.prepare_noise(latent, settings["seed"])
    try:
        with _differentiable_rope():
            comfy.sample.sample_custom(patched, noise, settings["cfg"], _TrainingSampler(body), sigmas, positive,
                                       negative, latent, seed=settings["seed"], disable_pbar=True)
    except BaseException:
        trainer = holder.get("trainer")
        if partial and trainer is not None and trainer.checkpoint.iteration > 0:
            try:
                os.makedirs(os.path.dirname(partial), exist_ok=True)
                library.write_inside(os.path.dirname(partial), partial, trainer.state_bytes(), "router training state")
                log.info("ProCache: router training stopped at iteration %d; run again with resume on to continue",
                         trainer.checkpoint.iteration)
            except (OSError, ScheduleError) as e:     # the stop's own cause is what the user must see
                log.warning("ProCache: router training progress not kept (%s)", e)
        raise
    if partial and os.path.isfile(partial):
        os.remove(partial)
    trainer = holder["trainer"]
    losses = trainer.state.losses
    if losses:
        note += f"; loss per trajectory {losses[0]:.4g} -> {losses[-1]:.4g} over {len(losses)} trajectories"
    return holder["router"], note
