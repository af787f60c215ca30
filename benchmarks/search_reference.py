"""Schedule search on the trained reference DiT: does a searched schedule beat uniform intervals?

    python -m benchmarks.search_reference            # 50 steps, 17 full steps (FORA N=3's count)
    python -m benchmarks.search_reference --quick    # a few samples, seconds

The search (procache_core.search, the same code the ComfyUI node runs) sees only the search seeds:
it samples full compute once (which is also the profiling run), pre-ranks every allowed pattern
by the output change it would skip, runs the best K, and keeps the one whose final images are
closest to full compute. Every schedule is then judged on held-out seeds (the reference bench's
own seed) by FD against the real digits, class accuracy and PSNR against full compute. Writes
search_reference.{md,json} to benchmarks/out/ (`--out benchmarks/results` updates the tracked figures).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from procache_core import Schedule, SchedulePolicy, StepKind, uniform
from procache_core.profiling import FeatureProfile, step_weights
from procache_core.reference.sampling import alphas_cumprod, ddim_timesteps, sample
from procache_core.search import SearchConstraints, count_partitions, generic_pattern, search

from .judge import frechet_distance, load_judge
from .output import add_out_option
from .reference_bench import CFG_SCALE, PROCACHE_DEEP_FRACTION, PROCACHE_SELECTOR, SEED, load_schedule
from .train_reference import load_reference

SEARCH_SEED = 2000        # noise of the search runs; never the held-out SEED


class Recording(torch.nn.Module):
    """The model, recording its output at each step into a profile (the sampler calls it once a step)."""

    def __init__(self, model, profile: FeatureProfile):
        super().__init__()
        self.model, self.profile, self.cfg, self.step = model, profile, model.cfg, 0

    def forward(self, *args):
        out = self.model(*args)
        self.profile.record(self.step, out)
        self.step += 1
        return out


def ddim_weights(steps: int) -> list[float]:
    """Per-step weights from DDIM's noise levels sigma = sqrt((1 - a) / a), ending at 0."""
    acp = alphas_cumprod()
    sigmas = [float(((1 - acp[t]) / acp[t]).sqrt()) for t in ddim_timesteps(steps)] + [0.0]
    return step_weights(sigmas)


def run_search(model, constraints, labels, count, pool, draw_seed=0, forecaster=None, log=print):
    """Profile, pre-rank, run `count` candidates, keep the closest to full compute. With a
    `forecaster` (procache_core.forecast), candidates run with it, as the schedule will be used;
    the pre-rank still predicts plain reuse's error (the profile records output change only)."""
    profile = FeatureProfile(constraints.steps, constraints.max_interval + 1, weights=ddim_weights(constraints.steps))
    profile.begin_run()
    start = time.perf_counter()
    reference = sample(Recording(model, profile), labels, constraints.steps, CFG_SCALE, SEARCH_SEED)
    full_seconds = time.perf_counter() - start

    def run(pattern):
        policy = SchedulePolicy(Schedule(kinds=tuple(pattern)))
        return sample(model, labels, constraints.steps, CFG_SCALE, SEARCH_SEED, policy=policy, forecaster=forecaster)

    result = search(constraints, run, reference, count=count, seed=draw_seed,
                    profile=profile if pool > count else None, pool=pool, full_seconds=full_seconds)
    for cand in sorted(result.candidates, key=lambda c: c.error):
        log(f"    search error {cand.error:.5f}  predicted {cand.predicted if cand.predicted is None else round(cand.predicted, 4)}"
            f"  {cand.origin:<8} {cand.text}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--full-steps", type=int, default=17, help="the budget B (FORA N=3 at 50 steps has 17)")
    parser.add_argument("--samples", type=int, default=300, help="held-out samples")
    parser.add_argument("--search-samples", type=int, default=40, help="samples per candidate run in the search")
    parser.add_argument("--candidates", type=int, default=5, help="K")
    parser.add_argument("--pool", type=int, default=1000, help="pre-rank pool (capped at the number of patterns)")
    parser.add_argument("--quick", action="store_true")
    add_out_option(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.search_samples = 40, 10
    torch.set_num_threads(1)
    model, judge = load_reference(), load_judge()
    steps, budget = args.steps, args.full_steps
    search_labels = torch.arange(args.search_samples) % 10
    labels = torch.arange(args.samples) % 10
    rows, searched = [], {}

    for tag, lo, hi, pool in (("pre-ranked, intervals 0..5", 0, 5, args.pool),
                              ("random draw (CASS), intervals 0..5", 0, 5, 0),
                              ("pre-ranked, intervals 1..3 (paper's DiT bounds)", 1, 3, args.pool)):
        c = SearchConstraints(steps, budget, lo, hi)
        print(f"search {tag}: {count_partitions(c)} patterns allowed, K={args.candidates}")
        start = time.perf_counter()
        result = run_search(model, c, search_labels, args.candidates, min(pool, count_partitions(c)))
        searched[tag] = (result, time.perf_counter() - start)

    full = sample(model, labels, steps, CFG_SCALE, SEED)

    def judge_row(name, schedule, selective=False):
        policy = SchedulePolicy(schedule, deep_fraction=PROCACHE_DEEP_FRACTION)
        images, run = sample(model, labels, steps, CFG_SCALE, SEED, policy=policy,
                             selector=PROCACHE_SELECTOR if selective else None, return_run=True)
        scores = judge.evaluate(images, labels, reference=full)
        scores["fd_vs_full"] = frechet_distance(judge.features(images), full_features)
        row = {"schedule": name, "pattern": schedule.pattern, "full_steps": schedule.count(StepKind.FULL),
               "flops_speedup": round(run.stats.flops_speedup, 3), **{k: round(v, 4) for k, v in scores.items()}}
        rows.append(row)
        print(f"  {name:<58} full {row['full_steps']:>2}  flops {row['flops_speedup']:.2f}x  fd {row['fd']:.4f}  "
              f"fd vs full {row['fd_vs_full']:.4f}  "
              f"acc {row['accuracy']:.3f}  psnr {row['psnr']:.2f}")

    full_scores = judge.evaluate(full, labels, reference=full)
    full_features = judge.features(full)
    full_scores["fd_vs_full"] = 0.0
    rows.append({"schedule": "full compute", "pattern": "1" * steps, "full_steps": steps, "flops_speedup": 1.0,
                 **{k: round(v, 4) for k, v in full_scores.items()}})
    print(f"held-out seed {SEED}, {args.samples} samples; full compute fd {full_scores['fd']:.4f} "
          f"acc {full_scores['accuracy']:.3f}")
    fora = uniform(steps, 3) if budget == -(-steps // 3) else Schedule(kinds=tuple(searched[next(iter(searched))][0].uniform.pattern))
    judge_row("uniform intervals (FORA N=3)", fora)
    for tag, (result, _) in searched.items():
        judge_row(f"searched: {tag}", Schedule(kinds=result.best.pattern))
    generic = Schedule(kinds=tuple(generic_pattern(steps, steps / budget)))
    if generic.count(StepKind.FULL) == budget:
        judge_row("generic (constraint rule)", generic)
    if steps == 50 and budget == 17:
        paper = load_schedule("procache-dit-50-17full.json")
        plain = paper.with_kinds([StepKind.REUSE if k == StepKind.SELECTIVE else k for k in paper.kinds])
        judge_row("paper's released DiT pattern, selective off", plain)
        judge_row("paper's released DiT pattern + selective", paper, selective=True)
    best = searched[next(iter(searched))][0]
    from procache_core.schedule import inject_selective
    judge_row("FORA N=3 + selective (injected)", fora.with_kinds(inject_selective(fora.kinds)), selective=True)
    judge_row("searched (pre-ranked 0..5) + selective (injected)",
              Schedule(kinds=tuple(inject_selective(best.best.pattern))), selective=True)

    os.makedirs(args.out, exist_ok=True)
    doc = {"steps": steps, "full_steps": budget, "held_out_seed": SEED, "held_out_samples": args.samples,
           "search_seed": SEARCH_SEED, "search_samples": args.search_samples, "candidates": args.candidates,
           "searches": {tag: {"seconds": round(sec, 2), "pool": len(r.pool), "run": len(r.candidates),
                              "winner": r.best.text, "winner_search_error": r.best.error,
                              "uniform_search_error": r.uniform.error if r.uniform else None}
                        for tag, (r, sec) in searched.items()},
           "rows": rows}
    suffix = "_quick" if args.quick else ""
    with open(os.path.join(args.out, f"search_reference{suffix}.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# Schedule search on the reference DiT ({steps} steps, {budget} full steps)", "",
             f"Searched on seed {SEARCH_SEED} ({args.search_samples} samples), judged on held-out seed {SEED} "
             f"({args.samples} samples).", "",
             "FD: Fréchet distance to the real digits in the judge's features; FD vs full: the same distance to "
             "the full-compute samples of the same seeds (fidelity to the uncached model).", "",
             "| schedule | full steps | FLOPs speedup | FD ↓ | FD vs full ↓ | accuracy ↑ | PSNR vs full ↑ | pattern |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['schedule']} | {r['full_steps']} | {r['flops_speedup']:.2f}x | {r['fd']:.4f} | {r['fd_vs_full']:.4f} | "
                     f"{r['accuracy']:.3f} | {r.get('psnr', float('nan')):.2f} | `{r['pattern']}` |")
    with open(os.path.join(args.out, f"search_reference{suffix}.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
