"""DDIM sampling of the reference DiT, with or without a caching policy.

The model is called once per step on the [cond; uncond] batch, as DiT's own sampler does; each
half is its own cache stream, so the engine sees what it sees inside ComfyUI.
"""
from __future__ import annotations

import torch

from ..clock import StepClock
from ..engine import Run
from ..families import find_family
from ..memory import PRECISIONS
from ..policy import Policy
from ..tokens import TokenSelector
from .dit import DiT

TRAIN_STEPS = 1000


def alphas_cumprod(train_steps: int = TRAIN_STEPS) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, train_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def ddim_timesteps(steps: int, train_steps: int = TRAIN_STEPS) -> list[int]:
    """Evenly spaced timesteps, noisiest first."""
    return [int(round(t)) for t in torch.linspace(train_steps - 1, 0, steps).tolist()]


@torch.no_grad()
def sample(model: DiT, labels: torch.Tensor, steps: int = 50, cfg: float = 1.5, seed: int = 0,
           policy: Policy | None = None, selector: TokenSelector | None = None,
           noise: torch.Tensor | None = None, return_run: bool = False, forecaster=None, recorder=None, eoc=None,
           budget=None, precision: str = "model dtype", rung_check: bool = False):
    """Deterministic DDIM (eta = 0). With `policy`, blocks run through the caching engine; with a
    `budget` (memory.Budget) the run plans its cache first and takes the finest rung that fits."""
    cfg_model = model.cfg
    n = labels.shape[0]
    if noise is None:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, cfg_model.channels, cfg_model.image_size, cfg_model.image_size, generator=gen)
    x = noise.clone()
    acp = alphas_cumprod().float()
    ts = ddim_timesteps(steps)
    use_cfg = cfg != 1.0
    y = torch.cat([labels, torch.full_like(labels, cfg_model.classes)]) if use_cfg else labels
    streams = ("cond", "uncond") if use_cfg else ("cond",)
    run = None
    if policy is not None:
        family, _ = find_family(model)
        # The clock runs on timesteps: any decreasing per-step noise level works.
        run = Run(policy, StepClock([float(t) for t in ts] + [-1.0]), family, selector=selector,
                  model_name="reference DiT", forecaster=forecaster, recorder=recorder, eoc=eoc)
    try:
        for i, t in enumerate(ts):
            inp = torch.cat([x, x]) if use_cfg else x
            tt = torch.full((inp.shape[0],), t, dtype=torch.long)
            if run is None:
                eps = model(inp, tt, y)
            else:
                if budget is not None and i == 0:
                    census = run.take_census(model, float(t), streams, lambda: model(inp, tt, y))
                    quantize, quantize_all = PRECISIONS[precision]
                    run.make_plan(census, budget, free_bytes=None, device=str(inp.device), quantize=quantize,
                                  quantize_all=quantize_all)
                if rung_check and i == 0:
                    run.start_rung_check()
                with run.model_call(model, float(t), streams):
                    eps = model(inp, tt, y)
                run.clock.step_finished(i)
            if use_cfg:
                cond, uncond = eps.chunk(2)
                eps = uncond + cfg * (cond - uncond)
            a_t = acp[t]
            a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    finally:
        if run is not None:
            run.close()
    return (x, run) if return_run else x
