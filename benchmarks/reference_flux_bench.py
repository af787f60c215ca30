"""Caching on the second reference model (the trained tiny Flux, 256 image tokens) under ComfyUI's
own samplers, judged as the reference DiT is.

    python -m benchmarks.reference_flux_bench --comfyui ~/comfy/ComfyUI                # 40 samples, minutes
    python -m benchmarks.reference_flux_bench --comfyui ~/comfy/ComfyUI --out benchmarks/results

Every row samples the same labels from the same noise (comfy.sample.sample, CFG 2, simple
scheduler) and the judge (benchmarks/judge.py) scores the decoded digits: class accuracy, FD
against the real digits, PSNR against the full-compute image of the same seed. Rows: full
compute; fewer steps at the ProCache row's FLOPs; ProCache with the bundled paper schedule
(procache-dit-50-17full, resampled to the step count) and selective steps; the same with Taylor 1
forecasting; ComfyUI's LazyCache with its threshold bisected, on separate calibration seeds, to the
ProCache row's block work. FLOPs speedups: the run statistics' block FLOPs for ProCache's rows,
transformer-block calls of full compute over theirs for fewer steps and LazyCache.

Harness for other benchmarks (see `FluxBench`):
    bench = FluxBench(samples=40)                    # model, judge, labels 0..9 repeated
    full = bench.measure(None, steps, "euler")       # a Measured: images, flops_speedup, seconds
    row = bench.measure(attach(bench.patcher, cfg), steps, "euler")
    bench.score(row, full)                           # {"accuracy", "fd", "psnr"}
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import time

import torch

from .judge import load_judge
from .output import add_out_option, report_path
from .reference_flux import CFG_SCALE, WEIGHTS, load_comfy, load_reference_flux, read_metadata, sample, to_digits

SCHEDULE = "procache-dit-50-17full"
SEED = 0                  # noise of the reported samples
CALIBRATION_SEED = 1000   # noise of LazyCache's threshold bisection (never the reported seeds)


@dataclasses.dataclass
class Measured:
    images: torch.Tensor          # [N, 1, 16, 16] digits, judge-ready
    block_calls: int              # transformer blocks run (a reused block is not called)
    flops_speedup: float | None   # the ProCache run statistics' figure; None for uncached runs
    seconds: float


@dataclasses.dataclass
class Row:
    sampler: str
    steps: int
    method: str
    setting: str
    flops_speedup: float
    accuracy: float = math.nan
    fd: float = math.nan
    psnr: float = math.nan


class FluxBench:
    def __init__(self, samples: int = 40, calibration_samples: int = 5, patcher=None):
        self.patcher = patcher if patcher is not None else load_reference_flux()
        self.judge = load_judge()
        self.labels = torch.arange(samples) % 10
        self.cal_labels = torch.arange(calibration_samples) % 10

    def measure(self, patcher, steps: int, sampler: str, labels=None, seed: int = SEED,
                cfg: float = CFG_SCALE) -> Measured:
        """One sampling call of `patcher` (None: the plain model), counted and timed."""
        from .comfy_bench import BlockCounter
        from procache_comfyui.nodes.runtime import LAST_RUNS

        labels = self.labels if labels is None else labels
        before = LAST_RUNS.latest()
        counter = BlockCounter(self.patcher)
        started = time.process_time()
        try:
            latent = sample(patcher or self.patcher, labels, steps, sampler, cfg, seed)
        finally:
            counter.remove()
        seconds = time.process_time() - started
        latest = LAST_RUNS.latest()
        speedup = latest["flops_speedup"] if latest is not None and latest is not before else None
        return Measured(to_digits(self.patcher, latent), counter.calls, speedup, seconds)

    def score(self, result: Measured, full: Measured | None) -> dict:
        labels = self.labels[:len(result.images)]
        return self.judge.evaluate(result.images, labels, reference=None if full is None else full.images)

    def lazycache(self, threshold: float):
        import comfy_extras.nodes_easycache as easycache
        return easycache.LazyCacheNode.execute(self.patcher, threshold, 0.15, 0.95, False).result[0]

    def lazycache_threshold(self, steps: int, sampler: str, target: float, iters: int = 6) -> float:
        """LazyCache's threshold whose block-call speedup on the calibration seeds is nearest `target`."""
        full = self.measure(None, steps, sampler, self.cal_labels, CALIBRATION_SEED).block_calls
        lo, hi, best = math.log(1e-3), math.log(3.0), None
        for _ in range(iters):
            mid = (lo + hi) / 2
            calls = self.measure(self.lazycache(math.exp(mid)), steps, sampler, self.cal_labels,
                                 CALIBRATION_SEED).block_calls
            speedup = full / max(calls, 1)
            if best is None or abs(speedup - target) < abs(best[1] - target):
                best = (math.exp(mid), speedup)
            lo, hi = (mid, hi) if speedup < target else (lo, mid)
        return best[0]

    def rows(self, steps: int, sampler: str, log=print) -> list[Row]:
        from procache_comfyui.nodes import library
        from procache_comfyui.nodes.runtime import ApplyConfig, attach
        from procache_comfyui.procache_core.forecast import Taylor

        schedule = library.load(SCHEDULE)
        schedule = schedule.resampled(steps) if schedule.steps != steps else schedule
        rows: list[Row] = []
        full = self.measure(None, steps, sampler)

        def add(method, setting, result, speedup=None):
            row = Row(sampler, steps, method, setting,
                      speedup or result.flops_speedup or full.block_calls / max(result.block_calls, 1))
            row.__dict__.update(self.score(result, None if method == "full compute" else full))
            rows.append(row)
            log(f"  {sampler:9} {steps:3} steps  {method:<30} {setting:<24} flops {row.flops_speedup:5.2f}x  "
                f"acc {row.accuracy:.3f}  fd {row.fd:7.3f}  psnr {row.psnr:6.2f}  cpu {result.seconds:5.1f}s")

        add("full compute", f"{sampler} {steps}", full, 1.0)
        add("ProCache + selective", schedule.name, self.measure(attach(self.patcher, ApplyConfig(schedule=schedule)),
                                                                steps, sampler))
        target = rows[-1].flops_speedup
        add("ProCache + selective + Taylor 1", schedule.name,
            self.measure(attach(self.patcher, ApplyConfig(schedule=schedule, forecaster=Taylor(1))), steps, sampler))
        fewer = max(1, round(steps / target))
        add("fewer steps (equal FLOPs)", f"{sampler} {fewer}", self.measure(None, fewer, sampler), steps / fewer)
        threshold = self.lazycache_threshold(steps, sampler, target)
        add("LazyCache (ComfyUI)", f"threshold {threshold:.3g}", self.measure(self.lazycache(threshold), steps, sampler))
        return rows


def markdown(rows: list[Row], header: str) -> str:
    lines = [header, ""]
    for sampler, steps in dict.fromkeys((r.sampler, r.steps) for r in rows):
        mine = [r for r in rows if (r.sampler, r.steps) == (sampler, steps)]
        fewer = next((r for r in mine if r.method.startswith("fewer steps")), None)
        lines += [f"**{sampler}, {steps} steps**", "",
                  "| method | schedule / setting | FLOPs speedup | FD ↓ | class acc ↑ | PSNR vs full (dB) ↑ |",
                  "|---|---|---|---|---|---|"]
        for r in mine:
            psnr = "—" if r.method == "full compute" else f"{r.psnr:.2f}"
            if fewer is not None and r.method not in ("full compute", fewer.method) and r.psnr < fewer.psnr:
                psnr += " (below fewer steps)"
            lines.append(f"| {r.method} | {r.setting} | {r.flops_speedup:.2f}× | {r.fd:.3f} | {r.accuracy:.1%} | {psnr} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=None, help="a ComfyUI checkout (default: COMFYUI_PATH)")
    parser.add_argument("--samples", type=int, default=40, help="images per row (labels 0..9 repeated)")
    parser.add_argument("--steps", default="50,20", help="step counts, comma separated")
    parser.add_argument("--samplers", default="euler,dpmpp_2m", help="ComfyUI sampler names, comma separated")
    parser.add_argument("--weights", default=WEIGHTS, help="reference Flux weights (default: the committed ones)")
    add_out_option(parser, optional=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    version = load_comfy(args.comfyui)
    started = time.perf_counter()
    bench = FluxBench(args.samples, patcher=load_reference_flux(args.weights))
    rows = []
    for sampler in args.samplers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            rows += bench.rows(steps, sampler.strip())
    report = read_metadata(args.weights).get("report", {})
    command = "python -m benchmarks.reference_flux_bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = (f"Reference Flux (ComfyUI's Flux class trained on digits, 256 image tokens; "
              f"{report.get('iters', '?')} training iterations) inside ComfyUI {version}, {args.samples} samples "
              f"({args.samples // 10} per class), CFG {CFG_SCALE}, simple scheduler, seed {SEED}; `{command.strip()}` "
              f"({(time.perf_counter() - started) / 60:.1f} min, one thread). A cache row whose PSNR is below the "
              f"fewer-steps row at the same FLOPs says so.")
    text = markdown(rows, header)
    print(text)
    if args.out:
        path = report_path(args.out, "reference_flux.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
