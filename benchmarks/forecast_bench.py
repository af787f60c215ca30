"""Forecasting cached branches on the trained reference DiT: reuse vs Taylor 1 / 2 vs fitted, each
with and without selective recompute, at 17 and 12 full steps of 50 and 7 of 20; same seeds as
the reference benchmark, with "fewer steps" at equal FLOPs beside every schedule.

    python -m benchmarks.forecast_bench            # writes benchmarks/out/forecast_bench.md
    python -m benchmarks.forecast_bench --quick    # a few samples
    python -m benchmarks.forecast_bench --out benchmarks/results    # updates the figures the README quotes

Fitted coefficients come from full-compute calibration runs on other seeds and labels than the
reported ones (CALIBRATION_SEED); the fit time printed is the whole calibration, sampling included.
"""
from __future__ import annotations

import argparse
import time

import torch

from procache_core import Schedule, SchedulePolicy, inject_selective
from procache_core.forecast import ForecastFitter, Taylor
from procache_core.reference.sampling import sample
from procache_core.search import SearchConstraints, draw_candidates

from .judge import frechet_distance
from .output import add_out_option, report_path
from .reference_bench import (CALIBRATION_SEED, CFG_SCALE, PROCACHE_DEEP_FRACTION, PROCACHE_SELECTOR, SEED,
                              Bench, load_schedule, without_selective)


def schedules() -> list[tuple[int, str, Schedule]]:
    """(steps, label, schedule without selective steps) for the three settings of the table."""
    pro50 = without_selective(load_schedule("procache-dit-50-17full.json"))
    pro20 = without_selective(load_schedule("procache-pixart-20-7full.json"))
    # 12 of 50: the first candidate of the constraint-aware generator (seeded, so the same every run).
    kinds = draw_candidates(SearchConstraints(steps=50, full_steps=12, min_interval=2, max_interval=6), 1, seed=0)[0]
    twelve = Schedule(kinds=tuple(kinds), name="cass-50-12full", provenance="constraint rule, seed 0")
    return [(50, "17 of 50", pro50), (50, "12 of 50", twelve), (20, "7 of 20", pro20)]


def fit(bench: Bench, steps: int, schedule: Schedule, samples: int, history: int = 3):
    labels = (torch.arange(samples) * 3 + 1) % 10       # other labels than the reported ones
    fitter = ForecastFitter(schedule.kinds, history=history)
    started = time.perf_counter()
    all_full = Schedule(kinds=(1,) * steps)
    sample(bench.model, labels, steps, CFG_SCALE, CALIBRATION_SEED, policy=SchedulePolicy(all_full), recorder=fitter)
    fitted = fitter.fit()
    return fitted, time.perf_counter() - started


def run(samples: int, calibration: int, log=print) -> tuple[list[str], dict]:
    bench = Bench(samples)
    lines, figures = [], {}
    for steps, label, schedule in schedules():
        full_images, _, full_wall, _ = bench.plain(steps)
        full = bench.judge.evaluate(full_images, bench.labels, reference=full_images)
        full_features = bench.judge.features(full_images)

        def judged(images):
            scores = bench.judge.evaluate(images, bench.labels, reference=full_images)
            scores["fd_vs_full"] = frechet_distance(bench.judge.features(images), full_features)
            return scores
        full["fd_vs_full"] = 0.0
        fitted, fit_seconds = fit(bench, steps, schedule, calibration)
        figures[f"fit seconds {label}"] = fit_seconds
        log(f"{label}: fitted in {fit_seconds:.1f}s on {calibration} calibration samples")
        rows = [("full compute", f"DDIM {steps}", 1.0, full_wall, full, 0)]
        with_selective = schedule.with_kinds(inject_selective(schedule.kinds), note="selective injected")
        for forecaster_name, forecaster in (("reuse", None), ("Taylor 1", Taylor(1)), ("Taylor 2", Taylor(2)),
                                            ("fitted", fitted)):
            for sel_name, sched in (("", schedule), (" + selective", with_selective)):
                policy = SchedulePolicy(sched, deep_fraction=PROCACHE_DEEP_FRACTION)
                started = time.perf_counter()
                images, run_ = sample(bench.model, bench.labels, steps, CFG_SCALE, SEED, policy=policy,
                                      selector=PROCACHE_SELECTOR, forecaster=forecaster, return_run=True)
                wall = time.perf_counter() - started
                scores = judged(images)
                rows.append((forecaster_name + sel_name, sched.pattern, run_.stats.flops_speedup, wall, scores,
                             run_.stats.cache_bytes_peak))
                log(f"  {label:9} {forecaster_name + sel_name:22} {run_.stats.flops_speedup:5.2f}x "
                    f"FD {scores['fd']:.3f} FD vs full {scores['fd_vs_full']:.3f} PSNR {scores['psnr']:.2f} (full FD {full['fd']:.3f})")
        fewer = max(1, round(steps / rows[1][2]))
        images, _, wall, _ = bench.plain(fewer)
        rows.append((f"fewer steps (DDIM {fewer})", "", steps / fewer, wall,
                     judged(images), 0))
        lines += [f"**{label}** (`{schedule.pattern}`)", "",
                  "| forecast | FLOPs speedup | wall speedup | FD ↓ | FD / full | FD vs full ↓ | class acc ↑ | PSNR vs full ↑ "
                  "| cache peak |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, _, speedup, wall, s, cache_bytes in rows:
            psnr = "—" if name == "full compute" else f"{s['psnr']:.2f}"
            lines.append(f"| {name} | {speedup:.2f}× | {full_wall / wall:.2f}× | {s['fd']:.3f} | "
                         f"{s['fd'] / full['fd']:.2f} | {s['fd_vs_full']:.3f} | {s['accuracy']:.1%} | {psnr} | "
                         f"{cache_bytes / 2**20:.1f} MiB |")
        lines.append("")
        figures[label] = rows
    return lines, figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--calibration", type=int, default=None, help="calibration samples for the fit")
    add_out_option(parser)
    args = parser.parse_args()
    samples = args.samples or (20 if args.quick else 300)
    calibration = args.calibration or (10 if args.quick else 40)
    started = time.perf_counter()
    torch.set_num_threads(1)
    lines, _ = run(samples, calibration)
    command = "python -m benchmarks.forecast_bench" + (" --quick" if args.quick else "")
    header = [f"Forecasting on the reference DiT: {samples} samples, DDIM, CFG {CFG_SCALE}, seed {SEED}; fitted on "
              f"{calibration} calibration samples (seed {CALIBRATION_SEED}); `{command}` "
              f"({(time.perf_counter() - started) / 60:.1f} min, 1 thread).", ""]
    with open(report_path(args.out, "forecast_bench.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(header + lines))
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
