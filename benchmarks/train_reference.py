"""Train the reference DiT on scikit-learn's digits and write benchmarks/weights/reference_dit_digits.safetensors.

    python -m benchmarks.train_reference                # the committed weights (seed 0)
    python -m benchmarks.train_reference --iters 200    # a short smoke run

Epsilon prediction on the linear-beta 1000-step schedule that procache_core.reference.sampling
samples with; 10 % of labels are dropped to the null class so CFG works; the saved weights are an
EMA of the trained ones. Seeded and deterministic on a CPU (one seed, one result); the CPU time it
took is stored in the file's metadata.

Other scripts load the model with `load_reference()`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch

from procache_core.reference.dit import DiT, DiTConfig
from procache_core.reference.sampling import alphas_cumprod

from .digits import CLASSES, IMAGE_SIZE, load_digits_tensors

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "reference_dit_digits.safetensors")

# 16 tokens (4x4 patches of the 16x16 digit) of width 64, 8 blocks: small enough to train on two
# CPU cores, deep enough that "the deepest 25 % of blocks" (the method's selective depth) is two.
CONFIG = DiTConfig(image_size=IMAGE_SIZE, channels=1, patch=4, hidden=64, depth=8, heads=4, mlp_ratio=4.0,
                   classes=CLASSES)


def load_reference(path: str = WEIGHTS) -> DiT:
    """The trained reference DiT (eval mode, float32, CPU)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    cfg = DiTConfig(**json.loads(meta["config"])) if "config" in meta else CONFIG
    model = DiT(cfg)
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval()


def training_report(path: str = WEIGHTS) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("report", "{}"))


def train(seed: int = 0, iters: int = 4000, batch: int = 128, lr: float = 2e-3, ema: float = 0.999,
          min_snr: float = 5.0, class_init: float = 1.0, cfg: DiTConfig = CONFIG, out: str | None = WEIGHTS,
          log_every: int = 250) -> DiT:
    """min_snr: Min-SNR-gamma loss weights (Hang et al., 2023), min(SNR, gamma) / SNR for epsilon;
    they keep the nearly clean steps from dominating the loss, so the mid-noise steps, where shape
    and class are decided, train sooner. class_init: std of the class embeddings at the start, so
    the label is heard next to the timestep embedding from the first steps."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits_tensors(cfg.image_size)
    acp = alphas_cumprod().float()
    model = DiT(cfg)
    torch.nn.init.normal_(model.y_embedder.weight, std=class_init)
    snr = acp / (1 - acp)
    weights = (snr.clamp(max=min_snr) / snr) if min_snr > 0 else torch.ones_like(snr)
    ema_model = DiT(cfg)
    ema_model.load_state_dict(model.state_dict())
    ema_model.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, iters // 10)
    started, wall, losses = time.process_time(), time.perf_counter(), []
    for it in range(iters):
        # linear warm-up, then cosine decay to 10 % of lr
        frac = it / max(iters - 1, 1)
        scale = (it + 1) / warmup if it < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, scale)
        idx = torch.randint(0, len(labels), (batch,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(batch, generator=gen) < 0.1] = cfg.classes          # null label for CFG
        t = torch.randint(0, len(acp), (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = (weights[t] * (model(xt, t, y) - noise).square().flatten(1).mean(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema, (1 + it) / (10 + it))
            for p_ema, p in zip(ema_model.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if log_every and (it + 1) % log_every == 0:
            print(f"iter {it + 1}/{iters}  loss {sum(losses[-log_every:]) / log_every:.4f}  "
                  f"cpu {time.process_time() - started:.0f}s  wall {time.perf_counter() - wall:.0f}s", flush=True)
            if out:      # a snapshot to look at while training runs; not the result
                torch.save(ema_model.state_dict(), os.path.join(tempfile.gettempdir(), os.path.basename(out) + ".partial.pt"))
    report = {"seed": seed, "iters": iters, "batch": batch, "lr": lr, "ema": ema, "min_snr": min_snr,
              "class_init": class_init,
              "final_loss": round(sum(losses[-200:]) / len(losses[-200:]), 5),
              "cpu_seconds": round(time.process_time() - started, 1),
              "wall_seconds": round(time.perf_counter() - wall, 1), "threads": torch.get_num_threads()}
    if out:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(out), exist_ok=True)
        save_file({k: v.contiguous() for k, v in ema_model.state_dict().items()}, out,
                  metadata={"config": json.dumps(cfg.__dict__), "report": json.dumps(report)})
    print(json.dumps(report))
    return ema_model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iters", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-snr", type=float, default=5.0)
    parser.add_argument("--class-init", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; one is faster per CPU second for this small model")
    parser.add_argument("--out", default=WEIGHTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.seed, args.iters, args.batch, args.lr, min_snr=args.min_snr, class_init=args.class_init, out=args.out)


if __name__ == "__main__":
    main()
