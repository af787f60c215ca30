"""Forecasters under ComfyUI's samplers, on the trained reference DiT: how far each moves the
result from full compute at one schedule.

    COMFYUI_PATH=~/comfy/ComfyUI python benchmarks/forecast_sampler_bench.py
    ... --steps 20 --pattern 11010010010010010011 --samples 8

The reference DiT (an epsilon model) runs as a k-diffusion denoiser under ComfyUI's own sampler
functions (euler, dpmpp_2m, dpmpp_sde: an ODE, a multistep and an SDE sampler), through the
caching engine as inside ComfyUI, with the run told the sampler's name as the runtime tells it.
Each cell: relative L2 of the final images against full compute with the same sampler and noise.
"raw" rows switch both safeguards off (no sampler damping, no per-unit guard), so the table shows
what the safeguards change. Writes forecast_sampler_bench.md into benchmarks/out/ (`--out benchmarks/results` updates the tracked copy).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)     # run as a script: procache_core and the ComfyUI loader of the tests

import torch  # noqa: E402

from benchmarks.output import add_out_option, report_path  # noqa: E402

from procache_core import Schedule, SchedulePolicy, StepClock, find_family  # noqa: E402
from procache_core.engine import Run  # noqa: E402
from procache_core.forecast import Online, Taylor  # noqa: E402
from procache_core.reference.sampling import alphas_cumprod, ddim_timesteps  # noqa: E402

SAMPLERS = ("euler", "dpmpp_2m", "dpmpp_sde")
SCHEDULE = "procache-pixart-20-7full.json"
ALTERNATING = "11010101010101010101"     # every other step cached: Taylor overshoots here under dpmpp_sde
CFG = 1.5


def forecasters() -> list[tuple[str, object]]:
    """(row name, forecaster) for every row; None is plain reuse."""
    rows = [("reuse", None)]
    for name, forecaster in (("Taylor 1", Taylor(1)), ("Taylor 2", Taylor(2)), ("online d2", Online(2)),
                             ("online d2, no forgetting", Online(2, 1.0)), ("online d3", Online(3))):
        rows.append((f"{name} (raw)", forecaster.with_safeguards(False, False)))
        rows.append((name, forecaster))
    return rows


def reference_sigmas(steps: int) -> torch.Tensor:
    """The reference DiT's DDIM timesteps as k-diffusion sigmas, down to 0."""
    acp = alphas_cumprod()
    ts = ddim_timesteps(steps)
    return torch.tensor([((1 - acp[t]) / acp[t]).sqrt().item() for t in ts] + [0.0])


class _NotFlow:
    """What ComfyUI's SNR-based samplers ask of model_sampling: not a flow (CONST) model."""


def sample(model, labels: torch.Tensor, sampler: str, steps: int, seed: int, schedule: Schedule | None = None,
           forecaster=None, functions=None, wrap_denoiser=None) -> tuple[torch.Tensor, Run | None]:
    """Sample the reference DiT with `functions.sample_<sampler>` (default: ComfyUI's
    comfy.k_diffusion.sampling; benchmarks.ode_samplers needs no ComfyUI); cached per `schedule`
    when given. `model` is the DiT or anything called like it, (x, t, y), with its `cfg`.
    `wrap_denoiser(denoise)` returns what the sampler calls instead of the CFG-combined denoiser,
    as a ComfyUI PREDICT_NOISE wrapper stands between the sampler and the model (LazyCache)."""
    import importlib
    kd = functions or importlib.import_module("comfy.k_diffusion.sampling")
    acp = alphas_cumprod()
    log_sigmas = ((1 - acp) / acp).sqrt().log().float()
    sigmas = reference_sigmas(steps)
    n = labels.shape[0]
    y = torch.cat([labels, torch.full_like(labels, model.cfg.classes)])
    run = None
    if schedule is not None:
        run = Run(SchedulePolicy(schedule), StepClock(sigmas.tolist()), find_family(model)[0],
                  model_name="reference DiT", forecaster=forecaster)
        run.clock.corrector_at_next_sigma = sampler == "heun"
        if run.forecast is not None:
            run.stats.notes.extend(run.forecast.use_sampler(f"sample_{sampler}"))

    def denoise(x, sigma, **_):
        s = float(sigma.flatten()[0])
        t = _interp(torch.tensor(s).log(), log_sigmas)         # the continuous timestep of this sigma
        inp = torch.cat([x, x]) / (1 + s * s) ** 0.5
        call = run.model_call(model, s, ("cond", "uncond")) if run else contextlib.nullcontext()
        with call:
            eps = model(inp, torch.full((2 * n,), t), y)
        cond, uncond = eps.chunk(2)
        return x - s * (uncond + CFG * (cond - uncond))
    patcher = types.SimpleNamespace(get_model_object=lambda _: _NotFlow())
    denoise.inner_model = types.SimpleNamespace(model_patcher=patcher)
    if wrap_denoiser is not None:
        inner = denoise.inner_model
        denoise = wrap_denoiser(denoise)
        denoise.inner_model = inner
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, model.cfg.channels, model.cfg.image_size, model.cfg.image_size, generator=gen)
    callback = (lambda d: run.clock.step_finished(d["i"])) if run else None
    try:
        with torch.no_grad():
            out = getattr(kd, f"sample_{sampler}")(denoise, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas,
                                                   extra_args={"seed": seed}, callback=callback, disable=True)
    finally:
        if run is not None:
            run.close()
    return out, run


def _interp(log_sigma: torch.Tensor, log_sigmas: torch.Tensor) -> float:
    i = int(torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1))
    lo, hi = log_sigmas[i - 1], log_sigmas[i]
    return float(i - 1 + (log_sigma - lo) / (hi - lo))


def measure(model, labels, steps: int, schedule: Schedule, seed: int = 0, log=print) -> dict:
    errors, notes = {}, {}
    for sampler in SAMPLERS:
        full, _ = sample(model, labels, sampler, steps, seed)
        for name, forecaster in forecasters():
            out, run = sample(model, labels, sampler, steps, seed, schedule, forecaster)
            errors[(name, sampler)] = float((out - full).norm() / full.norm())
            notes[(name, sampler)] = [n for n in run.stats.notes if n.startswith("forecast")]
            log(f"{sampler:10} {name:30} rel L2 {errors[(name, sampler)]:.4f}  {notes[(name, sampler)]}")
    return {"errors": errors, "notes": notes}


def table(result: dict, steps: int, schedule: Schedule, samples: int) -> list[str]:
    lines = [f"Reference DiT (trained), {samples} samples, {steps} steps, schedule `{schedule.pattern}` "
             f"({schedule.theoretical_speedup():.2f}x), CFG {CFG:g}: relative L2 of the final images against full "
             "compute with the same sampler and noise (lower is better)", "",
             "| forecaster | " + " | ".join(SAMPLERS) + " |", "|---|" + "---|" * len(SAMPLERS)]
    for name, _ in forecasters():
        lines.append(f"| {name} | " + " | ".join(f"{result['errors'][(name, s)]:.4f}" for s in SAMPLERS) + " |")
    seen = sorted({n for notes in result["notes"].values() for n in notes})
    return lines + (["", "Run notes:", ""] + [f"- {n}" for n in seen] if seen else []) + [""]


def main(argv=None):
    from benchmarks.reference_bench import load_schedule, without_selective
    from benchmarks.train_reference import load_reference
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI checkout")
    parser.add_argument("--schedule", default=SCHEDULE, help="a schedule file (selective steps become reuse)")
    parser.add_argument("--patterns", default=ALTERNATING, help="more schedules as patterns, comma separated")
    parser.add_argument("--samples", type=int, default=8)
    add_out_option(parser)
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("no ComfyUI: pass --comfyui PATH or set COMFYUI_PATH")
    os.environ["COMFYUI_PATH"] = args.comfyui
    import comfy_env
    comfy_env.load_comfy()
    from procache_core import parse_pattern
    schedules = [without_selective(load_schedule(args.schedule))]
    schedules += [parse_pattern(p) for p in args.patterns.split(",") if p]
    torch.set_num_threads(1)
    model = load_reference()
    labels = torch.arange(args.samples) % 10
    command = "python benchmarks/forecast_sampler_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Forecasters under ComfyUI's samplers", "", f"`{command.strip()}` (2-core CPU, no GPU)", ""]
    for schedule in schedules:
        lines += table(measure(model, labels, schedule.steps, schedule), schedule.steps, schedule, args.samples)
    with open(report_path(args.out, "forecast_sampler_bench.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
