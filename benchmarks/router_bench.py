"""HarmoniCa routers on the trained reference DiT: learned per-unit reuse vs uniform reuse (FORA)
and vs sampling with fewer steps, at the same cache usage ratio, on held-out seeds.

    python -m benchmarks.router_bench                  # DDIM 20, a few betas, minutes on one CPU thread
    python -m benchmarks.router_bench --quick          # seconds: tiny training, few samples
    python -m benchmarks.router_bench --steps 50 --betas 1e-7 --paper-betas 2e-7

Training (procache_core.router_training, the code the ComfyUI node runs) sees only its own
trajectories: labels and noise drawn from TRAIN_SEED. Every row is judged on the reference
bench's held-out seed (benchmarks.reference_bench.SEED) with the judge: FD against the real
digits, FD against the full-compute samples of the same seeds, PSNR against them, accuracy.
CUR (cache usage ratio) = reused units / all units of the run, the first step included; FORA
with a full step every N steps reuses every unit of the other steps. "Fewer steps" is DDIM with
round(T * (1 - CUR)) steps: about the same block work as caching that share of units.
Writes router_bench.{md,json} and the routers it trained to benchmarks/out/ (`--out benchmarks/results`
updates the figures the README quotes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from procache_core import Schedule, SchedulePolicy, uniform
from procache_core.reference.sampling import sample
from procache_core.router import Router

from .judge import frechet_distance, load_judge
from .output import add_out_option
from .reference_bench import CFG_SCALE, SEED
from .train_reference import load_reference
from .train_router import reference_config, reference_trainer

TRAIN_SEED = 3000        # trajectories the routers are trained on; never the held-out SEED


def train(model, steps, beta, args, lambda_mode="code", refresh_credit=False, log=print) -> tuple[Router, float]:
    config = reference_config(steps, beta, lambda_mode, args.trajectories, args.lr, args.tau, args.lambda_period,
                              args.max_reuse, refresh_credit)
    trainer = reference_trainer(model, config, steps, args.batch, TRAIN_SEED, CFG_SCALE)
    start = time.perf_counter()
    router = trainer.run()
    seconds = time.perf_counter() - start
    log(f"  trained beta {beta:g} ({lambda_mode}) in {seconds:.0f} s: {router.describe()}; "
        f"loss {trainer.state.losses[0]:.3g} -> {trainer.state.losses[-1]:.3g}")
    return router, seconds


def is_uniform(row) -> bool:
    return row["method"].startswith(("FORA", "uniform reuse"))


def is_fewer(row) -> bool:
    return row["method"].startswith("fewer steps")


def at_usage(rows, cur, kind) -> dict | None:
    """PSNR and FD vs full of a baseline at cache usage `cur`: linear between the nearest rows of
    that kind below and above it (None when no row lies on one side)."""
    points = sorted((r["cur"], r) for r in rows if kind(r))
    below = [p for p in points if p[0] <= cur]
    above = [p for p in points if p[0] >= cur]
    if not below or not above:
        return None
    (c0, r0), (c1, r1) = below[-1], above[0]
    t = 0.0 if c1 == c0 else (cur - c0) / (c1 - c0)
    return {key: r0[key] + t * (r1[key] - r0[key]) for key in ("psnr", "fd_vs_full")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    # lambda is a mean squared error of the final latent, as in the authors' code, so useful betas
    # sit near their 7e-8 (a sweep: 1e-8 reuses almost nothing, 1e-6 about 70 %, 1e-5 about 80 %)
    parser.add_argument("--betas", default="4e-8,1.5e-7", help="comma-separated sparsity weights, code lambda")
    parser.add_argument("--paper-betas", default="1e-7,2.5e-7,4e-7", help="the same for lambda_mode='paper'")
    parser.add_argument("--trajectories", type=int, default=200, help="training trajectories per router")
    parser.add_argument("--lambda-period", type=int, default=15, help="C in trajectories")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=4, help="noises per training trajectory (x2 for CFG)")
    parser.add_argument("--samples", type=int, default=300, help="held-out samples")
    parser.add_argument("--credit-betas", default="3e-8,5e-8,1e-7,2.5e-7",
                        help="the same for lambda_mode='paper' with refresh credit (an option beyond the paper)")
    parser.add_argument("--max-reuse", type=int, default=0, help="train every router with this reuse limit (0: none)")
    parser.add_argument("--quick", action="store_true")
    add_out_option(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.trajectories, args.lambda_period = 40, 3, 2
    torch.set_num_threads(1)
    model, judge = load_reference(), load_judge()
    steps = args.steps
    labels = torch.arange(args.samples) % 10
    full = sample(model, labels, steps, CFG_SCALE, SEED)
    full_features = judge.features(full)
    rows = []

    def judge_row(method, setting, images, cur, flops_speedup):
        scores = judge.evaluate(images, labels, reference=full)
        scores["fd_vs_full"] = frechet_distance(judge.features(images), full_features)
        row = {"method": method, "setting": setting, "cur": round(cur, 4), "flops_speedup": round(flops_speedup, 3),
               **{k: round(v, 4) for k, v in scores.items()}}
        rows.append(row)
        print(f"  {method:<48} {setting:<26} CUR {100 * cur:5.1f}%  flops {flops_speedup:4.2f}x  fd {row['fd']:.4f}  "
              f"fd vs full {row['fd_vs_full']:.4f}  psnr {row['psnr']:6.2f}  acc {row['accuracy']:.3f}")
        return row

    def scheduled(schedule):
        images, run = sample(model, labels, steps, CFG_SCALE, SEED, policy=SchedulePolicy(schedule), return_run=True)
        return images, run.stats.flops_speedup

    fewer_done = set()

    def bracket(cur):
        """The step counts just above and below a cache usage (one, when it falls on a step)."""
        exact = steps * (1 - cur)
        return sorted({max(1, math.floor(exact)), max(1, math.ceil(exact))})

    def fewer(cur):
        for n in bracket(cur):
            if n in fewer_done or n == steps:
                continue
            fewer_done.add(n)
            judge_row("fewer steps", f"DDIM {n}", sample(model, labels, n, CFG_SCALE, SEED), 1 - n / steps, steps / n)

    spread_done = set()

    def spread(cur):
        """Uniform reuse around the router's cache usage: as many full steps, evenly spaced (FORA
        with a fractional interval), the first step full; the counts just above and below it."""
        for n in bracket(cur):
            if n in spread_done or n == steps or steps % n == 0:      # steps / n whole: a FORA row
                continue
            spread_done.add(n)
            full_at = {(j * steps) // n for j in range(n)}
            schedule = Schedule(kinds=tuple(1 if k in full_at else 0 for k in range(steps)), name=f"evenly {n}")
            images, speedup = scheduled(schedule)
            judge_row(f"uniform reuse, {n} full steps", schedule.pattern, images, 1 - n / steps, speedup)

    print(f"reference DiT, DDIM {steps}, cfg {CFG_SCALE}; held-out seed {SEED}, {args.samples} samples")
    judge_row("full compute", f"DDIM {steps}", full, 0.0, 1.0)
    for n in (2, 3, 4):
        schedule = uniform(steps, n)
        cur = schedule.count(0) / steps
        judge_row(f"FORA N={n}", schedule.pattern, *(lambda r: (r[0], cur, r[1]))(scheduled(schedule)))
        fewer(cur)

    routers, trained = [], []
    for mode, credit, betas in (("code", False, args.betas), ("paper", False, args.paper_betas),
                                ("paper", True, args.credit_betas)):
        for beta in [float(b) for b in betas.split(",") if b.strip()]:
            trained.append((mode, credit, beta) + train(model, steps, beta, args, mode, refresh_credit=credit))
    os.makedirs(args.out, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    for mode, credit, beta, router, seconds in trained:
        images, speedup = scheduled(router.to_schedule())
        cur = router.cache_usage_ratio()
        method = f"HarmoniCa router ({mode} lambda{', refresh credit' if credit else ''})"
        if args.max_reuse:
            method += f", max reuse {args.max_reuse}"
        row = judge_row(method, f"beta {beta:g}", images, cur, speedup)
        row["train_seconds"] = round(seconds, 1)
        row["heatmap"] = router.heatmap()
        name = f"router_bench_T{steps}_{mode}{'_credit' if credit else ''}_beta{beta:g}{suffix}.safetensors"
        router.save(os.path.join(args.out, name))
        routers.append(name)
        fewer(cur)
        spread(cur)

    doc = {"steps": steps, "cfg": CFG_SCALE, "held_out_seed": SEED, "held_out_samples": args.samples,
           "train_seed": TRAIN_SEED, "training": {k: getattr(args, k) for k in
                                                  ("trajectories", "lambda_period", "lr", "tau", "batch", "max_reuse")},
           "routers": routers, "rows": rows}
    with open(os.path.join(args.out, f"router_bench{suffix}.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# HarmoniCa routers on the reference DiT (DDIM {steps}, cfg {CFG_SCALE})", "",
             f"Routers trained by SDT + IEPO on {args.trajectories} trajectories of {args.batch} noises each "
             f"(seed {TRAIN_SEED}, labels drawn uniformly), lr {args.lr}, tau {args.tau}, lambda refreshed every "
             f"{args.lambda_period} trajectories; judged on held-out seed {SEED} ({args.samples} samples).", "",
             "CUR: reused units / all units (first step included). FD: Fréchet distance to the real digits in the "
             "judge's features; FD vs full: to the full-compute samples of the same seeds; PSNR against them.", "",
             "Refresh credit (an option beyond the paper, docs/harmonica.md): each step's compute is also credited "
             "with what its fresher cache saves at the later steps that reuse it."
             + (f" Every router here was trained with max_reuse {args.max_reuse}." if args.max_reuse else ""), "",
             "| method | setting | CUR | FLOPs speedup | FD ↓ | FD vs full ↓ | PSNR vs full ↑ | accuracy ↑ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["cur"], r["method"])):
        lines.append(f"| {r['method']} | {r['setting']} | {100 * r['cur']:.1f}% | {r['flops_speedup']:.2f}x | "
                     f"{r['fd']:.4f} | {r['fd_vs_full']:.4f} | {r['psnr']:.2f} | {r['accuracy']:.3f} |")
    lines += ["", "Each router against uniform reuse (FORA and evenly spaced full steps) and fewer steps at its own "
              "cache usage, read off the straight line between the two rows of each that bracket it:", "",
              "| router | CUR | PSNR: router / uniform / fewer | FD vs full: router / uniform / fewer |",
              "|---|---|---|---|"]
    for r in rows:
        if "heatmap" in r:
            uniform_at, fewer_at = at_usage(rows, r["cur"], is_uniform), at_usage(rows, r["cur"], is_fewer)
            cells = [" / ".join(f"{v:.{d}f}" if v is not None else "–" for v in
                                (r[key], (uniform_at or {}).get(key), (fewer_at or {}).get(key)))
                     for key, d in (("psnr", 2), ("fd_vs_full", 3))]
            lines.append(f"| {r['method']}, {r['setting']} | {100 * r['cur']:.1f}% | {cells[0]} | {cells[1]} |")
    lines += ["", "Router masks ('#' computes, '.' reuses; per step: attention, MLP of blocks 0..7):", ""]
    for r in rows:
        if "heatmap" in r:
            lines += [f"{r['method']}, {r['setting']} (trained in {r['train_seconds']:.0f} s):", "```",
                      r["heatmap"], "```"]
    with open(os.path.join(args.out, f"router_bench{suffix}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:len(rows) + 9]))


if __name__ == "__main__":
    main()
