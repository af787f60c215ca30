"""Train the second reference model (ComfyUI's Flux class, 256 image tokens) on scikit-learn's digits
and write benchmarks/weights/reference_flux_digits.safetensors.

    COMFYUI_PATH=~/comfy/ComfyUI python -m benchmarks.train_reference_flux              # the committed weights
    COMFYUI_PATH=~/comfy/ComfyUI python -m benchmarks.train_reference_flux --iters 300  # a smoke run

Flow matching as ComfyUI's Flux model sampling defines it (comfy/model_sampling.py, ModelSamplingFlux
with CONST): a noise level sigma = model_sampling.sigma(u) for u uniform in (0, 1] (the shift 1.15
the sampler's sigmas use), x_t = (1 - sigma) * x0 + sigma * noise, the model called with timestep
sigma, and its output trained towards the velocity noise - x0, so that ComfyUI's denoised
x_t - sigma * output is x0. x0 is the digit in the model's own latent space (benchmarks/
reference_flux.py `encode`), i.e. after the latent format's process_in, which is what the sampler
hands the model. 10 % of labels train as the null class, so CFG works; guidance_embed is off.
The saved weights are an EMA of the trained ones. Seeded and deterministic on one CPU thread;
the config and the CPU time it took are in the file's metadata.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time

import torch

from .digits import load_digits_tensors
from .reference_flux import (CONTEXT_PREFIX, LATENT_SIZE, NULL_CLASS, POOLED_PREFIX, UNET_CONFIG, WEIGHTS,
                             ClassConditioning, build_patcher, encode, load_comfy)


def initialise(model: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip weight init (they expect a checkpoint): normal(0.02) weights, zero
    biases, unit norm scales, and zero modulation and output layers (adaLN-zero, as DiT), so every
    block starts as the identity and the first steps train the embeddings."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif name.endswith("scale"):       # RMSNorm of the query/key norms
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, module in model.named_modules():
            if name.endswith(("mod.lin", "modulation.lin", "adaLN_modulation.1")) or name == "final_layer.linear":
                module.weight.zero_()


def _rope_with_backward(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Flux's rotary embedding in plain torch ops (the same math as comfy.ldm.flux.math's fallback)."""
    def rotate(x):
        pairs = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
        return (freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]).reshape(x.shape).type_as(x)
    return rotate(xq), rotate(xk)


@contextlib.contextmanager
def trainable_flux():
    """ComfyUI's Flux is written for inference: 0.8.0 applies RoPE with a comfy_kitchen kernel that
    has no backward (swapped for the plain-torch version while training; sampling uses ComfyUI's
    own), and its blocks add residuals in place into tensors LayerNorm saved for the backward
    (allow_mutation_on_saved_tensors keeps a copy of those)."""
    import comfy.ldm.flux.math as flux_math
    original = flux_math.apply_rope
    flux_math.apply_rope = _rope_with_backward
    try:
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            yield
    finally:
        flux_math.apply_rope = original


def train(seed: int = 0, iters: int = 1300, batch: int = 24, lr: float = 2e-3, ema: float = 0.999,
          config: dict = UNET_CONFIG, out: str | None = WEIGHTS, log_every: int = 100, log=print) -> dict:
    """Returns the report (losses per log interval, CPU time); writes the EMA weights to `out`."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    digits, labels = load_digits_tensors(size=LATENT_SIZE)
    patcher = build_patcher(config)
    model = patcher.model.diffusion_model
    sampling = patcher.model.model_sampling
    initialise(model, seed)
    classes = ClassConditioning(config)
    params = list(model.parameters()) + list(classes.parameters())
    ema_params = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    warmup = min(100, iters // 10)
    started, wall, losses, curve = time.process_time(), time.perf_counter(), [], []
    for it in range(iters):
        frac = it / max(iters - 1, 1)     # linear warm-up, then cosine decay to 10 % of lr
        scale = (it + 1) / warmup if it < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, scale)
        idx = torch.randint(0, len(labels), (batch,), generator=gen)
        x0, y = encode(digits[idx]), labels[idx].clone()
        y[torch.rand(batch, generator=gen) < 0.1] = NULL_CLASS
        u = 1.0 - torch.rand(batch, generator=gen)                 # (0, 1]
        sigma = sampling.sigma(u).float()
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        context, pooled = classes(y)
        opt.zero_grad(set_to_none=True)
        with trainable_flux():
            velocity = model(xt, sigma, context=context, y=pooled, transformer_options={})
            loss = (velocity - (noise - x0)).square().mean()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema, (1 + it) / (10 + it))
            for p_ema, p in zip(ema_params, params):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if log_every and (it + 1) % log_every == 0:
            curve.append(round(sum(losses[-log_every:]) / log_every, 5))
            log(f"iter {it + 1}/{iters}  loss {curve[-1]:.4f}  cpu {time.process_time() - started:.0f}s  "
                f"wall {time.perf_counter() - wall:.0f}s")
            if out:     # a snapshot to sample while training runs; not the result
                save(snapshot_path(out), model, classes, ema_params, params, config, {"iters": it + 1})
    report = {"seed": seed, "iters": iters, "batch": batch, "lr": lr, "ema": ema, "losses": losses,
              "loss_curve": curve, "cpu_seconds": round(time.process_time() - started, 1),
              "wall_seconds": round(time.perf_counter() - wall, 1), "threads": torch.get_num_threads()}
    if out:
        save(out, model, classes, ema_params, params, config, report)
    return report


def snapshot_path(out: str) -> str:
    return os.path.join(tempfile.gettempdir(), os.path.basename(out) + ".partial.safetensors")


def save(out, model, classes, ema_params, params, config, report) -> None:
    from safetensors.torch import save_file

    by_id = {id(p): e for p, e in zip(params, ema_params)}
    state = {f"diffusion_model.{k}": by_id[id(p)].contiguous() for k, p in model.named_parameters()}
    state.update({f"diffusion_model.{k}": b.contiguous() for k, b in model.named_buffers()})
    state[CONTEXT_PREFIX] = by_id[id(classes.context)].contiguous()
    state[POOLED_PREFIX] = by_id[id(classes.pooled)].contiguous()
    summary = {k: v for k, v in report.items() if k != "losses"}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(state, out, metadata={"config": json.dumps(config), "report": json.dumps(summary)})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=None, help="a ComfyUI checkout (default: COMFYUI_PATH)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=1300)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the committed weights: 1)")
    parser.add_argument("--out", default=WEIGHTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_comfy(args.comfyui)
    report = train(args.seed, args.iters, args.batch, args.lr, out=args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "losses"}))


if __name__ == "__main__":
    main()
