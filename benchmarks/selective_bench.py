"""When does a selective step pay? Selective steps against the same FLOPs spent on full steps, on the
reference Flux (ComfyUI's Flux class, 256 image tokens) or the reference DiT (16 tokens, DDIM).

    python -m benchmarks.selective_bench --comfyui ~/comfy/ComfyUI --samples 10 --steps 50      # minutes
    python -m benchmarks.selective_bench --model dit --samples 20                               # about 1 min
    python -m benchmarks.selective_bench --comfyui ~/comfy/ComfyUI --out benchmarks/results

A selective step recomputes the token-wise branches (on Flux: the MLPs, and the fused attention+MLP
branch of the single-stream blocks) for the top `ratio` of tokens in the deepest `deep_fraction` of
blocks and reuses the rest; its price is those recomputed tokens. The same price can buy full steps
instead. For each selector setting the sweep runs the bundled paper schedule (procache-dit-50-17full
resampled to the step count) with its selective steps, reads the FLOPs speedup from the run
statistics, and compares it with the same schedule whose selective steps are reuse steps and whose
longest reuse runs get as many extra full steps as the selective steps cost (`matched_schedule`), and
with plain fewer steps at the selective row's FLOPs. "gain" is the selective row's PSNR against full
compute minus the matched row's: positive means the selective steps paid for themselves.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import shlex
import sys
import time

import torch

from .output import add_out_option, report_path

# (label, TokenSelector fields, deep_fraction): the defaults, then one knob changed at a time, then the
# knobs that help most together.
SETTINGS = (
    ("defaults (10 %, deepest 25 %, output_norm)", {}, 0.25),
    ("ratio 25 %", {"ratio": 0.25}, 0.25),
    ("ratio 50 %", {"ratio": 0.5}, 0.25),
    ("ratio 100 %", {"ratio": 1.0}, 0.25),
    ("deepest 50 %", {}, 0.5),
    ("all blocks", {}, 1.0),
    ("score attention_received", {"score": "attention_received"}, 0.25),
    ("score cross_entropy", {"score": "cross_entropy"}, 0.25),
    ("score change", {"score": "change"}, 0.25),
    ("score random", {"score": "random"}, 0.25),
    ("ratio 50 %, all blocks", {"ratio": 0.5}, 1.0),
    ("ratio 25 %, all blocks, change", {"ratio": 0.25, "score": "change"}, 1.0),
)


def without_selective(kinds) -> list[int]:
    """The pattern with every selective step made a reuse step."""
    return [0 if int(k) == 2 else int(k) for k in kinds]


def with_extra_full(kinds, extra: int) -> list[int]:
    """`without_selective(kinds)` with `extra` reuse steps made full: each goes to the middle of the
    longest run of reuse steps (the earliest on ties), where one more refresh shortens reuse the most."""
    out = without_selective(kinds)
    for _ in range(extra):
        runs, start = [], None
        for i, k in enumerate(out + [1]):
            if k == 0 and start is None:
                start = i
            elif k != 0 and start is not None:
                runs.append((i - start, start))
                start = None
        if not runs:
            break
        length, start = max(runs, key=lambda r: (r[0], -r[1]))
        out[start + length // 2] = 1
    return out


def extra_full_steps(kinds, selective_speedup: float, reuse_speedup: float) -> int:
    """How many reuse steps must become full so that the schedule without selective steps costs what
    the selective one did. Costs in full-step units from the measured speedups (steps / speedup); a
    reuse step made full adds one full step minus what a reuse step already cost."""
    plain = without_selective(kinds)
    steps, fulls, reuses = len(plain), plain.count(1), plain.count(0)
    selective_cost, reuse_only_cost = steps / selective_speedup, steps / reuse_speedup
    per_reuse = max(0.0, (reuse_only_cost - fulls) / reuses) if reuses else 0.0
    extra = (selective_cost - reuse_only_cost) / max(1e-9, 1.0 - per_reuse)
    return max(0, min(reuses, round(extra)))


def matched_schedule(schedule, selective_speedup: float, reuse_speedup: float):
    """The schedule without selective steps, with the full steps their FLOPs buy instead."""
    extra = extra_full_steps(schedule.kinds, selective_speedup, reuse_speedup)
    return schedule.with_kinds(with_extra_full(schedule.kinds, extra), f"selective steps as {extra} full steps"), extra


@dataclasses.dataclass
class SweepRow:
    model: str
    sampler: str
    steps: int
    forecast: str
    setting: str
    flops: float
    psnr: float
    fd: float
    matched_flops: float
    matched_psnr: float
    extra_full: int
    fewer_steps: int
    fewer_psnr: float

    @property
    def gain(self) -> float:
        return self.psnr - self.matched_psnr


class FluxHarness:
    """The reference Flux under ComfyUI's euler (FluxBench), as the sweep calls it."""

    name, sampler = "reference Flux (256 tokens)", "euler"
    core = "procache_comfyui.procache_core"     # the pack as ComfyUI loaded it: its classes, not a second copy

    def __init__(self, samples: int):
        from .reference_flux_bench import FluxBench
        self.bench = FluxBench(samples)

    def schedule(self, steps: int):
        from procache_comfyui.nodes import library
        from .reference_flux_bench import SCHEDULE
        return library.load(SCHEDULE)

    def plain(self, steps: int):
        return self.bench.measure(None, steps, self.sampler).images

    def cached(self, steps: int, schedule, selector, deep_fraction: float, forecaster):
        from procache_comfyui.nodes.runtime import ApplyConfig, attach
        config = ApplyConfig(schedule=schedule, selector=selector, deep_fraction=deep_fraction, forecaster=forecaster)
        result = self.bench.measure(attach(self.bench.patcher, config), steps, self.sampler)
        return result.flops_speedup, result.images

    def score(self, images, full) -> dict:
        return self.bench.judge.evaluate(images, self.bench.labels, reference=full)


class DitHarness:
    """The reference DiT (16 tokens) under the pack's DDIM, with reference_bench's schedules."""

    name, sampler = "reference DiT (16 tokens)", "ddim"
    core = "procache_core"

    def __init__(self, samples: int):
        from .reference_bench import Bench
        self.bench = Bench(samples)

    def schedule(self, steps: int):
        from .reference_bench import SCHEDULES, load_schedule
        return load_schedule(SCHEDULES.get(steps, SCHEDULES[50]))

    def plain(self, steps: int):
        return self.bench.plain(steps)[0]

    def cached(self, steps: int, schedule, selector, deep_fraction: float, forecaster):
        from procache_core import SchedulePolicy
        from procache_core.reference.sampling import sample
        from .reference_bench import CFG_SCALE, SEED
        images, run = sample(self.bench.model, self.bench.labels, steps, CFG_SCALE, SEED,
                             policy=SchedulePolicy(schedule, deep_fraction=deep_fraction), selector=selector,
                             forecaster=forecaster, return_run=True)
        return run.stats.flops_speedup, images

    def score(self, images, full) -> dict:
        return self.bench.judge.evaluate(images, self.bench.labels, reference=full)


HARNESSES = {"flux": FluxHarness, "dit": DitHarness}


class SelectiveSweep:
    """Runs the sweep on one model, step count and forecast; matched and fewer-step runs are shared
    between settings."""

    def __init__(self, harness, steps: int, forecast: str, log=print):
        self.harness, self.steps, self.forecast, self.log = harness, steps, forecast, log
        schedule = harness.schedule(steps)
        self.schedule = schedule.resampled(steps) if schedule.steps != steps else schedule
        self.full = harness.plain(steps)
        self._runs: dict = {}

    def selector(self, **fields):
        return importlib.import_module(f"{self.harness.core}.tokens").TokenSelector(**fields)

    def run(self, schedule, selector=None, deep_fraction: float = 0.25):
        taylor = importlib.import_module(f"{self.harness.core}.forecast").Taylor
        key = (schedule.pattern, selector, deep_fraction)
        if key not in self._runs:
            speedup, images = self.harness.cached(self.steps, schedule, selector or self.selector(), deep_fraction,
                                                  taylor(1) if self.forecast == "taylor1" else None)
            self._runs[key] = (speedup, self.harness.score(images, self.full))
        return self._runs[key]

    def fewer(self, steps: int) -> float:
        key = ("fewer", steps)
        if key not in self._runs:
            self._runs[key] = self.harness.score(self.harness.plain(steps), self.full)["psnr"]
        return self._runs[key]

    def row(self, label: str, fields: dict, deep_fraction: float) -> SweepRow:
        reuse_speedup, _ = self.run(self.schedule.with_kinds(without_selective(self.schedule.kinds)))
        speedup, score = self.run(self.schedule, self.selector(**fields), deep_fraction)
        matched, extra = matched_schedule(self.schedule, speedup, reuse_speedup)
        matched_speedup, matched_score = self.run(matched)
        fewer = max(1, round(self.steps / speedup))
        row = SweepRow(self.harness.name, self.harness.sampler, self.steps, self.forecast, label, speedup,
                       score["psnr"], score["fd"], matched_speedup, matched_score["psnr"], extra, fewer,
                       self.fewer(fewer))
        self.log(f"  {self.harness.sampler} {self.steps:3} steps {self.forecast:7} {label:<44} flops {speedup:5.2f}x "
                 f"psnr {row.psnr:6.2f} | +{extra} full {matched_speedup:5.2f}x psnr {row.matched_psnr:6.2f} | "
                 f"gain {row.gain:+6.2f} dB")
        return row


def markdown(rows: list[SweepRow], header: str) -> str:
    lines = [header, ""]
    for group in dict.fromkeys((r.model, r.sampler, r.steps, r.forecast) for r in rows):
        model, sampler, steps, forecast = group
        lines += [f"**{model}, {sampler}, {steps} steps, {'Taylor 1' if forecast == 'taylor1' else 'plain reuse'}**", "",
                  "| selective setting | FLOPs speedup | PSNR ↑ | FD ↓ | same FLOPs as full steps: extra full, speedup | "
                  "PSNR ↑ | gain (dB) | fewer steps: n, PSNR |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if (r.model, r.sampler, r.steps, r.forecast) == group):
            lines.append(f"| {r.setting} | {r.flops:.2f}× | {r.psnr:.2f} | {r.fd:.1f} | +{r.extra_full}, {r.matched_flops:.2f}× | "
                         f"{r.matched_psnr:.2f} | {r.gain:+.2f} | {r.fewer_steps}, {r.fewer_psnr:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(HARNESSES), default="flux",
                        help="flux: the reference Flux in ComfyUI (euler); dit: the reference DiT (the pack's DDIM)")
    parser.add_argument("--comfyui", default=None, help="a ComfyUI checkout (default: COMFYUI_PATH; --model flux)")
    parser.add_argument("--samples", type=int, default=20, help="images per row (labels 0..9 repeated)")
    parser.add_argument("--steps", default="50,20", help="step counts, comma separated")
    parser.add_argument("--forecasts", default="reuse,taylor1", help="reuse and/or taylor1, comma separated")
    parser.add_argument("--settings", default="", help="indices into SETTINGS, comma separated (default: all)")
    add_out_option(parser, optional=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    where = ""
    if args.model == "flux":
        from .reference_flux import load_comfy
        where = f" inside ComfyUI {load_comfy(args.comfyui)}"
    started = time.perf_counter()
    chosen = [SETTINGS[int(i)] for i in args.settings.split(",")] if args.settings else list(SETTINGS)
    harness = HARNESSES[args.model](args.samples)
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for forecast in (f.strip() for f in args.forecasts.split(",")):
            sweep = SelectiveSweep(harness, steps, forecast)
            rows += [sweep.row(*setting) for setting in chosen]
    command = "python -m benchmarks.selective_bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = (f"Selective steps at matched FLOPs on the {harness.name}{where}, {harness.sampler}, {args.samples} "
              f"samples; `{command.strip()}` ({(time.perf_counter() - started) / 60:.1f} min, one thread). PSNR "
              f"against full compute of the same seed. The matched row turns the selective steps into reuse and "
              f"spends their FLOPs on extra full steps; gain = selective PSNR − matched PSNR.")
    text = markdown(rows, header)
    print(text)
    if args.out:
        path = report_path(args.out, f"selective_bench_{args.model}.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
