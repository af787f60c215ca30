"""EOC correction of reused features on the trained reference DiT: FORA N=2 (50 % of the steps
reused) with and without the correction, over pooling, strength and judgment, then the same
correction on top of two other schedules; same held-out seed as the reference benchmark.

    python -m benchmarks.eoc_bench                 # writes benchmarks/out/eoc_bench.{md,json}
    python -m benchmarks.eoc_bench --quick         # a few samples
    python -m benchmarks.eoc_bench --out benchmarks/results    # updates the figures the README quotes
    python -m benchmarks.eoc_bench --samples 1000 --prior-samples 256

The prior is the mean full-compute branch output per step, unit and CFG stream over PRIOR_SEED
runs (other noise and labels than the reported ones); the trial judgment tries each reuse step's
correction alone on TRIAL_SEED runs and keeps the steps that bring the final latents closer to
full compute. Neither ever sees the held-out seed. Every row is judged with the judge: FD against
the real digits, FD against the full-compute samples of the same seeds, PSNR against them,
accuracy. "Fewer steps" is DDIM with the same block work as the schedule.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from procache_core import Schedule, SchedulePolicy, uniform
from procache_core.eoc import Correction, PriorRecorder, judge_by_trial
from procache_core.reference.sampling import sample

from .judge import frechet_distance, load_judge
from .output import add_out_option, report_path
from .reference_bench import CFG_SCALE, SEED, load_schedule, without_selective
from .train_reference import load_reference

STEPS = 50                 # the reference benchmark's DDIM steps
PRIOR_SEED = 2000          # noise of the prior's calibration runs (never the held-out SEED)
TRIAL_SEED = 2001          # noise of the trial judgment's runs
GAMMAS = (0.25, 0.5, 1.0)
POOLINGS = ("channel", "token")
MAX_GAP = 3                # the longest reuse gap of the schedules below (ProCache's 17 of 50)


def calibration_labels(n: int) -> torch.Tensor:
    return (torch.arange(n) * 3 + 1) % 10        # other labels than the held-out ones at each index


def extract(model, pooling: str, samples: int):
    """(prior, seconds): full-compute runs on the calibration seed with a recorder attached."""
    recorder = PriorRecorder(pooling, max_gap=MAX_GAP)
    started = time.perf_counter()
    all_full = SchedulePolicy(Schedule(kinds=(1,) * STEPS))
    sample(model, calibration_labels(samples), STEPS, CFG_SCALE, PRIOR_SEED, policy=all_full, recorder=recorder)
    prior = recorder.prior({"seed": PRIOR_SEED, "samples": samples, "steps": STEPS, "cfg": CFG_SCALE})
    return prior, time.perf_counter() - started


class Trial:
    """judge_by_trial on TRIAL_SEED runs: their full-compute latents are sampled once."""

    def __init__(self, model, samples: int):
        self.model, self.labels = model, calibration_labels(samples)
        self.reference = sample(model, self.labels, STEPS, CFG_SCALE, TRIAL_SEED)

    def __call__(self, correction: Correction, schedule: Schedule):
        policy = SchedulePolicy(schedule)
        started = time.perf_counter()
        result = judge_by_trial(
            lambda c: sample(self.model, self.labels, STEPS, CFG_SCALE, TRIAL_SEED, policy=policy, eoc=c),
            self.reference, correction, schedule.kinds)
        return correction.restricted(result["steps"]), time.perf_counter() - started


class Table:
    """Samples the held-out seed and scores each row against full compute of the same seeds."""

    def __init__(self, model, judge, samples: int, log=print):
        self.model, self.judge, self.log = model, judge, log
        self.labels = torch.arange(samples) % 10
        self.full = sample(model, self.labels, STEPS, CFG_SCALE, SEED)
        self.full_features = judge.features(self.full)
        self.rows: list[dict] = []

    def add(self, schedule_name, method, images, speedup, corrected=0, seconds=0.0) -> dict:
        scores = self.judge.evaluate(images, self.labels, reference=self.full)
        # abs(): the full-compute row's own distance comes out as a tiny negative rounding error
        scores["fd_vs_full"] = abs(frechet_distance(self.judge.features(images), self.full_features))
        row = {"schedule": schedule_name, "method": method, "flops_speedup": round(speedup, 3),
               "corrected_steps": corrected, "seconds": round(seconds, 1),
               **{k: round(v, 4) for k, v in scores.items()}}
        self.rows.append(row)
        self.log(f"  {schedule_name:<16} {method:<40} {speedup:4.2f}x  fd {row['fd']:7.3f}  "
                 f"fd vs full {row['fd_vs_full']:.4f}  psnr {row['psnr']:6.2f}  acc {row['accuracy']:.3f}  "
                 f"corrected {corrected:2d}")
        return row

    def cached(self, schedule_name: str, schedule: Schedule, method: str, correction=None, seconds=0.0) -> dict:
        images, run = sample(self.model, self.labels, STEPS, CFG_SCALE, SEED, policy=SchedulePolicy(schedule),
                             eoc=correction, return_run=True)
        corrected = len(run.eoc.corrected) if run.eoc is not None else 0
        return self.add(schedule_name, method, images, run.stats.flops_speedup, corrected, seconds)

    def fewer_steps(self, schedule_name: str, schedule: Schedule) -> dict:
        n = schedule.count(1)
        images = sample(self.model, self.labels, n, CFG_SCALE, SEED)
        return self.add(schedule_name, f"fewer steps (DDIM {n}, equal FLOPs)", images, STEPS / n)


def fora_rows(table: Table, priors: dict, trial: Trial, gammas=GAMMAS) -> None:
    """FORA N=2 plain vs corrected, over pooling, gamma and judgment."""
    fora = uniform(STEPS, 2)
    table.add("FORA N=2", "full compute (DDIM 50)", table.full, 1.0)
    table.fewer_steps("FORA N=2", fora)
    table.cached("FORA N=2", fora, "plain reuse")
    for pooling in POOLINGS:
        prior = priors[pooling]
        table.cached("FORA N=2", fora, f"EOC {pooling}, gamma 0.5, every reuse step", Correction(prior, 0.5, min_gain=None))
        for gamma in gammas:
            label = f"EOC {pooling}, gamma {gamma:g}"
            table.cached("FORA N=2", fora, f"{label}, gain test", Correction(prior, gamma))
            table.cached("FORA N=2", fora, f"{label}, first half", Correction(prior, gamma, end=0.5))
            judged, seconds = trial(Correction(prior, gamma), fora)
            table.cached("FORA N=2", fora, f"{label}, trial", judged, seconds)
        # A stricter gain test: only the (step, unit) pairs expected to lose 40 % of their reuse error.
        table.cached("FORA N=2", fora, f"EOC {pooling}, gamma 1, gain test > 0.4", Correction(prior, 1.0, min_gain=0.4))


def prior_size_rows(table: Table, model, sizes) -> dict:
    """Token prior, gamma 1, first half, from fewer and more calibration samples."""
    seconds = {}
    for n in sizes:
        prior, seconds[n] = extract(model, "token", n)
        table.cached("FORA N=2", uniform(STEPS, 2), f"EOC token, gamma 1, first half, prior of {n}",
                     Correction(prior, 1.0, end=0.5), seconds[n])
    return seconds


def other_schedule_rows(table: Table, priors: dict, trial: Trial) -> None:
    """The same corrections on FORA N=3 and on ProCache's bundled DiT schedule (reuse only)."""
    for name, schedule in (("FORA N=3", uniform(STEPS, 3)),
                           ("ProCache 17/50", without_selective(load_schedule("procache-dit-50-17full.json")))):
        table.fewer_steps(name, schedule)
        table.cached(name, schedule, "plain reuse")
        table.cached(name, schedule, "EOC channel, gamma 0.5, gain test", Correction(priors["channel"], 0.5))
        table.cached(name, schedule, "EOC token, gamma 1, first half", Correction(priors["token"], 1.0, end=0.5))
        judged, seconds = trial(Correction(priors["token"], 1.0), schedule)
        table.cached(name, schedule, "EOC token, gamma 1, trial", judged, seconds)


def markdown(doc: dict, command: str) -> list[str]:
    lines = [f"# EOC correction on the reference DiT (DDIM {STEPS}, CFG {CFG_SCALE})", "",
             f"`{command}`: {doc['samples']} held-out samples (seed {SEED}), {doc['minutes']:.1f} min on one CPU "
             f"thread. Priors: mean full-compute branch outputs of {doc['prior_samples']} calibration samples "
             f"(seed {PRIOR_SEED}), extracted in {doc['extract_seconds']['channel']:.1f} s (channel) and "
             f"{doc['extract_seconds']['token']:.1f} s (token). Trial judgment on {doc['trial_samples']} samples "
             f"(seed {TRIAL_SEED}); its time is in the seconds column.", "",
             "Judgment: *every reuse step* corrects all of them; *gain test* (the node's default) corrects where "
             "the calibration statistics expect a gain; *gain test > 0.4* asks for at least 40 % of the reuse error removed; *first half* adds end 0.5; *trial* keeps the reuse steps "
             "whose correction alone lowers the final error on the trial samples. FD: Fréchet distance to the "
             "real digits in the judge's features; FD vs full: to the full-compute samples of the same seeds; "
             "PSNR against them. Corrected: reuse steps where at least one branch was corrected.", ""]
    lines += doc.get("findings", [])
    for schedule in dict.fromkeys(r["schedule"] for r in doc["rows"]):
        lines += ["", f"**{schedule}**", "",
                  "| method | FLOPs speedup | FD ↓ | FD vs full ↓ | PSNR vs full ↑ | accuracy ↑ | corrected | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in doc["rows"] if r["schedule"] == schedule):
            psnr = "—" if r["method"].startswith("full compute") else f"{r['psnr']:.2f}"
            seconds = f"{r['seconds']:.1f}" if r["seconds"] else ""
            lines.append(f"| {r['method']} | {r['flops_speedup']:.2f}× | {r['fd']:.3f} | {r['fd_vs_full']:.4f} | "
                         f"{psnr} | {r['accuracy']:.1%} | {r['corrected_steps']} | {seconds} |")
    return lines


def findings(rows: list[dict]) -> list[str]:
    """The must-show comparison in words, from the rows themselves."""
    def get(schedule, method):
        return next(r for r in rows if r["schedule"] == schedule and r["method"] == method)
    plain = get("FORA N=2", "plain reuse")
    full = get("FORA N=2", "full compute (DDIM 50)")
    eoc = [r for r in rows if r["schedule"] == "FORA N=2" and r["method"].startswith("EOC")]
    by_fd = min(eoc, key=lambda r: r["fd"])
    by_full = min(eoc, key=lambda r: r["fd_vs_full"])
    note = []
    if plain["fd"] < full["fd"]:
        note = ["- on this model plain reuse already has a lower FD than full compute, so a lower FD is not by "
                "itself a smaller caching error: FD vs full and PSNR measure that error."]
    return ["Findings (FORA N=2, 2.00× FLOPs):", "", *note,
            f"- plain reuse: FD {plain['fd']:.3f}, FD vs full {plain['fd_vs_full']:.4f}, PSNR {plain['psnr']:.2f} dB "
            f"(full compute: FD {full['fd']:.3f}).",
            f"- lowest FD with EOC: {by_fd['method']}: FD {by_fd['fd']:.3f}, FD vs full {by_fd['fd_vs_full']:.4f}, "
            f"PSNR {by_fd['psnr']:.2f} dB.",
            f"- closest to full compute with EOC: {by_full['method']}: FD {by_full['fd']:.3f}, FD vs full "
            f"{by_full['fd_vs_full']:.4f}, PSNR {by_full['psnr']:.2f} dB.",
            f"- EOC rows with a lower FD than plain reuse: {sum(r['fd'] < plain['fd'] for r in eoc)} of {len(eoc)}; "
            f"closer to full compute (FD vs full): {sum(r['fd_vs_full'] < plain['fd_vs_full'] for r in eoc)} of "
            f"{len(eoc)}; higher PSNR: {sum(r['psnr'] > plain['psnr'] for r in eoc)} of {len(eoc)}."]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few samples")
    parser.add_argument("--samples", type=int, default=None, help="held-out samples (default 300)")
    parser.add_argument("--prior-samples", type=int, default=None, help="calibration samples of the prior (default 64)")
    parser.add_argument("--trial-samples", type=int, default=None, help="samples of the trial judgment (default 32)")
    parser.add_argument("--gammas", default=None, help="comma-separated strengths for FORA N=2 (default 0.25,0.5,1)")
    add_out_option(parser)
    args = parser.parse_args(argv)
    gammas = tuple(float(g) for g in args.gammas.split(",")) if args.gammas else ((1.0,) if args.quick else GAMMAS)
    samples = args.samples or (20 if args.quick else 300)
    prior_samples = args.prior_samples or (8 if args.quick else 64)
    trial_samples = args.trial_samples or (4 if args.quick else 32)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, judge = load_reference(), load_judge()
        priors, extract_seconds = {}, {}
        for pooling in POOLINGS:
            priors[pooling], extract_seconds[pooling] = extract(model, pooling, prior_samples)
            print(f"{priors[pooling].describe()}; extracted in {extract_seconds[pooling]:.1f} s")
        table, trial = Table(model, judge, samples), Trial(model, trial_samples)
        fora_rows(table, priors, trial, gammas)
        prior_size_rows(table, model, (max(2, prior_samples // 4), prior_samples * 4))
        other_schedule_rows(table, priors, trial)
    finally:
        torch.set_num_threads(threads)
    command = "python -m benchmarks.eoc_bench" + (" --quick" if args.quick else "")
    doc = {"steps": STEPS, "cfg": CFG_SCALE, "held_out_seed": SEED, "samples": samples, "prior_seed": PRIOR_SEED,
           "prior_samples": prior_samples, "trial_seed": TRIAL_SEED, "trial_samples": trial_samples,
           "extract_seconds": {k: round(v, 1) for k, v in extract_seconds.items()},
           "minutes": round((time.perf_counter() - started) / 60, 2), "rows": table.rows}
    doc["findings"] = findings(table.rows)
    with open(report_path(args.out, "eoc_bench.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    lines = markdown(doc, command)
    with open(report_path(args.out, "eoc_bench.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return doc


if __name__ == "__main__":
    main()
