"""Train a HarmoniCa router on the pack's reference DiT from the command line (SDT + IEPO, the same
trainer as the "HarmoniCa Router Trainer" node). No images: every trajectory starts from fresh noise
with uniformly drawn class labels.

    python -m benchmarks.train_router --out router.safetensors                  # DDIM 20, beta 1.5e-7
    python -m benchmarks.train_router --steps 50 --beta 2.5e-7 --lambda-mode paper --out r50.safetensors
    python -m benchmarks.train_router --out router.safetensors --resume         # continue a stopped run

Ctrl-C stops at once and keeps the last finished trajectory in `<out>.partial`; `--resume` continues
from it (the same settings are required: the state file records them). The router file loads in
"HarmoniCa Router Loader" (copy it to <ComfyUI user dir>/procache/routers/) and in
procache_core.router.Router.load.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from procache_core import find_family
from procache_core.router_training import LAMBDA_MODES, ReferenceProblem, RouterTrainer, TrainingConfig, TrainingState

from .reference_bench import CFG_SCALE
from .train_reference import load_reference


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the router file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps the router is for (one row per step)")
    parser.add_argument("--cfg", type=float, default=CFG_SCALE, help="guidance scale inside training (and sampling)")
    parser.add_argument("--trajectories", type=int, default=60, help="training trajectories (iterations = this x steps)")
    parser.add_argument("--beta", type=float, default=1.5e-7,
                        help="weight of the compute penalty (higher: more reuse; 4e-8 to 4e-7 reused 38 to 54 %%)")
    parser.add_argument("--lr", type=float, default=0.1, help="AdamW learning rate on the logits")
    parser.add_argument("--tau", type=float, default=0.1, help="a unit computes when sigmoid(logit) > tau")
    parser.add_argument("--lambda-period", type=int, default=15, help="C, in trajectories")
    parser.add_argument("--lambda-mode", choices=LAMBDA_MODES, default="code")
    parser.add_argument("--max-reuse", type=int, default=0,
                        help="a unit computes after reusing this many steps in a row (0: no limit, the method's)")
    parser.add_argument("--refresh-credit", action="store_true",
                        help="credit each compute with what its fresher cache saves at later steps")
    parser.add_argument("--batch", type=int, default=4, help="noises per trajectory (x2 for CFG)")
    parser.add_argument("--seed", type=int, default=3000, help="seed of the training noise and labels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="continue from <out>.partial")
    return parser.parse_args(argv)


def reference_config(steps: int, beta: float, lambda_mode: str, trajectories: int, lr: float, tau: float,
                     lambda_period: int, max_reuse: int = 0, refresh_credit: bool = False) -> TrainingConfig:
    """Training settings counted in trajectories (`trajectories`, `lambda_period`) as iterations."""
    return TrainingConfig(iterations=trajectories * steps, beta=beta, lr=lr, tau=tau,
                          lambda_period=lambda_period * steps, lambda_mode=lambda_mode, seed=0,
                          max_reuse=max_reuse, refresh_credit=refresh_credit)


def reference_trainer(model, config: TrainingConfig, steps: int, batch: int, seed: int, cfg: float,
                      state: TrainingState | None = None) -> RouterTrainer:
    """SDT + IEPO on the reference DiT with DDIM `steps` (the CLI's and the router benchmark's)."""
    family, _ = find_family(model)
    metadata = {"model": "reference DiT (digits)", "family": family.name, "sampler": "ddim", "steps": steps,
                "cfg": cfg, "train_seed": seed, "batch": batch}
    problem = ReferenceProblem(model, steps, cfg=cfg, batch=batch, seed=seed)
    return RouterTrainer(problem, family, config, state=state, metadata=metadata)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_reference()
    config = reference_config(args.steps, args.beta, args.lambda_mode, args.trajectories, args.lr, args.tau,
                              args.lambda_period, args.max_reuse, args.refresh_credit)
    partial = args.out + ".partial"
    state = None
    if args.resume:
        if not os.path.isfile(partial):
            print(f"nothing to resume: {partial} does not exist", file=sys.stderr)
            return 2
        with open(partial, "rb") as f:
            state, saved = TrainingState.from_bytes(f.read())
        if json.loads(saved.get("config", "{}")) != dataclasses.asdict(config):
            print(f"{partial} was written with other settings: {saved.get('config')}", file=sys.stderr)
            return 2
        print(f"resuming at iteration {state.iteration} of {config.iterations}")
    trainer = reference_trainer(model, config, args.steps, args.batch, args.seed, args.cfg, state)
    started = time.perf_counter()

    def progress(iteration, total, info):
        if iteration % args.steps == 0:         # a trajectory's last step
            print(f"  iteration {iteration}/{total}  trajectory {info['trajectory'] + 1}  loss {info['loss']:.4g}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    try:
        router = trainer.run(progress)
    except KeyboardInterrupt:
        with open(partial, "wb") as f:
            f.write(trainer.state_bytes())
        print(f"\nstopped; iteration {trainer.checkpoint.iteration} kept in {partial} (run again with --resume)")
        return 130
    router.save(args.out)
    if os.path.isfile(partial):
        os.remove(partial)
    print(f"{router.describe()}\nwrote {args.out} in {time.perf_counter() - started:.0f} s")
    print(router.heatmap())
    return 0


if __name__ == "__main__":
    sys.exit(main())
