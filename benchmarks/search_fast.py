"""The fast schedule family (5x and 6x at 20, 28, 30 and 50 steps), searched with Taylor 1 on the reference DiT.

    python -m benchmarks.search_fast --steps 20 28 30     # search and judge; a few minutes per step count
    python -m benchmarks.search_fast --steps 50 --write   # ... and write schedules/procache-fast-50-*.json

At 5x-6x the pack runs with a forecaster (Taylor 1 is its best there on the reference DiT,
benchmarks/results/frontier.md), so the search scores its candidates with Taylor 1, as the
schedule will be used: benchmarks.search_reference.run_search (profile the full-compute run on
the search seed, pre-rank every allowed pattern by the output change it skips, run the best K,
keep the closest to full compute). Every searched schedule is then judged on the held-out seed
under euler and dpmpp_2m (the frontier's plumbing) against the generic pattern with the same
number of full steps (procache_core.search.generic_pattern, also with Taylor 1) and against
fewer steps. `--write` ships, per step count and speedup, whichever of searched and generic
has the higher mean PSNR over both samplers, with provenance saying which and why.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from procache_core import Schedule
from procache_core.forecast import Taylor
from procache_core.search import SearchConstraints, count_partitions, generic_pattern

from .frontier import Frontier
from .output import ROOT, SCRATCH, add_out_option, report_path
from .reference_bench import CFG_SCALE
from .search_reference import SEARCH_SEED, run_search
from .train_reference import load_reference

SPEEDUPS = (5, 6)
STEP_COUNTS = (20, 28, 30, 50)
MAX_INTERVAL = 9            # reuse runs up to 9 steps: the generic 6x pattern at 20 steps needs 8
SAMPLERS = ("euler", "dpmpp_2m")
FORECASTER = "Taylor 1"


def family_name(steps: int, speedup: int) -> str:
    return f"procache-fast-{steps}-{speedup}x"


@dataclasses.dataclass
class Judged:
    steps: int
    speedup: int
    method: str               # "fewer steps", "generic + Taylor 1", "searched + Taylor 1"
    sampler: str
    pattern: str
    flops_speedup: float
    psnr: float
    fd_ratio: float           # FD against the real digits, as a multiple of full compute's


def search_one(model, steps: int, speedup: int, search_samples: int, count: int, pool: int, log=print):
    constraints = SearchConstraints.for_speedup(steps, speedup, 0, MAX_INTERVAL)
    space = count_partitions(constraints)
    log(f"{family_name(steps, speedup)}: {constraints.full_steps} full steps, {space} patterns allowed")
    labels = torch.arange(search_samples) % 10
    result = run_search(model, constraints, labels, count, min(pool, space), forecaster=Taylor(1),
                        log=lambda line: None)
    return constraints, space, result


def judge(bench: Frontier, steps: int, speedup: int, patterns: dict[str, str], log=print) -> list[Judged]:
    """Each pattern with Taylor 1, and fewer steps, on the held-out seed under every sampler."""
    rows = []
    budget = next(iter(patterns.values())).count("1")
    for sampler in SAMPLERS:
        full, _ = bench._sample(bench.model, sampler, steps)
        full_fd = bench.judge.fd(full)

        def add(method, pattern, images, flops):
            scores = bench.judge.evaluate(images, bench.labels, reference=full)
            rows.append(Judged(steps, speedup, method, sampler, pattern, flops, scores["psnr"], scores["fd"] / full_fd))
            log(f"  {steps:>3} {speedup}x {sampler:<9} {method:<22} flops {flops:5.2f}x  psnr {scores['psnr']:6.2f}  "
                f"fd {scores['fd'] / full_fd:5.2f}x full")

        images, _ = bench._sample(bench.model, sampler, budget)
        add("fewer steps", f"{budget} steps", images, steps / budget)
        for label, pattern in patterns.items():
            schedule = Schedule(kinds=tuple(int(k) for k in pattern))
            images, run = bench._sample(bench.model, sampler, steps, schedule, Taylor(1))
            add(f"{label} + {FORECASTER}", pattern, images, run.stats.flops_speedup)
    return rows


def mean_psnr(rows: list[Judged], method: str) -> float:
    mine = [r.psnr for r in rows if r.method == method]
    return sum(mine) / len(mine)


def schedule_document(steps: int, speedup: int, searched, generic: str, rows: list[Judged], space: int,
                      search_samples: int, held_out: int) -> dict:
    """The shipped schedule: the searched pattern, or the generic one where that judged better."""
    searched_psnr, generic_psnr = mean_psnr(rows, f"searched + {FORECASTER}"), mean_psnr(rows, f"generic + {FORECASTER}")
    where = (f"on the trained reference DiT for {FORECASTER} (benchmarks/search_fast.py: DDIM {steps} steps, "
           f"CFG {CFG_SCALE:g}, seed {SEARCH_SEED}, {search_samples} samples; {space} patterns with reuse runs 0..{MAX_INTERVAL} "
           f"pre-ranked by the output change they skip, {len(searched.candidates)} run with {FORECASTER} (the pre-rank's best "
           f"and the even-interval pattern), kept the closest to full compute)")
    judged = (f"held-out seed 0, {held_out} samples, euler and dpmpp_2m: mean PSNR vs full {searched_psnr:.2f} dB searched, "
              f"{generic_psnr:.2f} dB generic")
    if searched_psnr >= generic_psnr:
        pattern, provenance = searched.best.text, f"searched {where}; {judged}. Use with {FORECASTER}"
    else:
        pattern = generic
        provenance = (f"generic pattern (procache_core.search.generic_pattern, not searched): the search {where} "
                      f"found {searched.best.text}, which judged worse ({judged}). Use with {FORECASTER}")
    return {"format": "procache.schedule", "version": 1, "name": family_name(steps, speedup), "family": "any",
            "steps": steps, "sampler": "any", "provenance": provenance, "pattern": [int(k) for k in pattern]}


def markdown(rows: list[Judged], command: str, samples: int, seconds: float) -> str:
    lines = [f"# Fast schedules (5x-6x) with {FORECASTER} on the reference DiT", "",
             f"`{command}` ({seconds / 60:.1f} min, 2-core CPU, no GPU). Held-out seed 0, {samples} samples, CFG "
             f"{CFG_SCALE:g}; searched on seed {SEARCH_SEED}. Each cell: PSNR against full compute (dB) / FD as a "
             "multiple of full compute's. Every row of a group computes the same number of steps.", "",
             "| steps | target | method | FLOPs | " + " | ".join(SAMPLERS) + " | pattern |",
             "|---|---|---|---|" + "---|" * len(SAMPLERS) + "---|"]
    for key in dict.fromkeys((r.steps, r.speedup, r.method) for r in rows):
        mine = {r.sampler: r for r in rows if (r.steps, r.speedup, r.method) == key}
        first = next(iter(mine.values()))
        cells = " | ".join(f"{mine[s].psnr:.2f} / {mine[s].fd_ratio:.2f}×" for s in SAMPLERS)
        lines.append(f"| {key[0]} | {key[1]}x | {key[2]} | {first.flops_speedup:.2f}× | {cells} | `{first.pattern}` |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS), choices=STEP_COUNTS)
    parser.add_argument("--samples", type=int, default=100, help="held-out images per row")
    parser.add_argument("--search-samples", type=int, default=40, help="images per candidate run in the search")
    parser.add_argument("--candidates", type=int, default=24, help="K, candidates run per schedule")
    parser.add_argument("--pool", type=int, default=5000, help="pre-rank pool (capped at the number of patterns)")
    parser.add_argument("--write", action="store_true", help="write schedules/procache-fast-<steps>-<x>x.json")
    add_out_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    model = load_reference()
    bench = Frontier(args.samples, model=model)
    rows, record = [], []
    for steps in args.steps:
        for speedup in SPEEDUPS:
            constraints, space, result = search_one(model, steps, speedup, args.search_samples, args.candidates, args.pool)
            generic = "".join(map(str, generic_pattern(steps, speedup)))
            judged = judge(bench, steps, speedup, {"searched": result.best.text, "generic": generic})
            rows += judged
            record.append({"steps": steps, "speedup": speedup, "full_steps": constraints.full_steps, "space": space,
                           "searched": result.best.text, "search_error": result.best.error,
                           "generic": generic, "uniform_search_error": result.uniform.error if result.uniform else None,
                           "rows": [dataclasses.asdict(r) for r in judged]})
            if args.write:
                doc = schedule_document(steps, speedup, result, generic, judged, space, args.search_samples, args.samples)
                path = os.path.join(ROOT, "schedules", f"{doc['name']}.json")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(doc, f, indent=1)
                    f.write("\n")
                print(f"wrote {os.path.relpath(path)}: {doc['provenance'][:60]}...")
    seconds = time.perf_counter() - started
    command = "python -m benchmarks.search_fast " + " ".join(argv if argv is not None else sys.argv[1:])
    tag = "-".join(map(str, args.steps))
    with open(report_path(args.out or SCRATCH, f"search_fast_{tag}.md"), "w", encoding="utf-8") as f:
        f.write(markdown(rows, command.strip(), args.samples, seconds))
    with open(report_path(args.out or SCRATCH, f"search_fast_{tag}.json"), "w", encoding="utf-8") as f:
        json.dump({"command": command.strip(), "samples": args.samples, "seconds": round(seconds, 1),
                   "schedules": record}, f, indent=1)
    print(markdown(rows, command.strip(), args.samples, seconds))


if __name__ == "__main__":
    main()
