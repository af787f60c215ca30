"""When does a selective step pay? Selective steps against the same FLOPs spent on full steps, on the
reference Flux (ComfyUI's Flux class, 256 image tokens).

    python -m benchmarks.selective_bench --comfyui ~/comfy/ComfyUI --samples 20                 # minutes
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


class SelectiveSweep:
    """Runs the sweep on one FluxBench; matched and fewer-step runs are shared between settings."""

    def __init__(self, bench, steps: int, sampler: str, forecast: str, log=print):
        from procache_comfyui.nodes import library
        from .reference_flux_bench import SCHEDULE

        self.bench, self.steps, self.sampler, self.forecast, self.log = bench, steps, sampler, forecast, log
        schedule = library.load(SCHEDULE)
        self.schedule = schedule.resampled(steps) if schedule.steps != steps else schedule
        self.full = bench.measure(None, steps, sampler)
        self._runs: dict = {}

    def run(self, schedule, selector=None, deep_fraction: float = 0.25):
        from procache_comfyui.nodes.runtime import ApplyConfig, attach
        from procache_comfyui.procache_core.forecast import Taylor
        from procache_comfyui.procache_core.tokens import TokenSelector

        key = (schedule.pattern, selector, deep_fraction)
        if key not in self._runs:
            config = ApplyConfig(schedule=schedule, selector=selector or TokenSelector(), deep_fraction=deep_fraction,
                                 forecaster=Taylor(1) if self.forecast == "taylor1" else None)
            result = self.bench.measure(attach(self.bench.patcher, config), self.steps, self.sampler)
            self._runs[key] = (result.flops_speedup, self.bench.score(result, self.full))
        return self._runs[key]

    def fewer(self, steps: int) -> float:
        key = ("fewer", steps)
        if key not in self._runs:
            self._runs[key] = self.bench.score(self.bench.measure(None, steps, self.sampler), self.full)["psnr"]
        return self._runs[key]

    def row(self, label: str, fields: dict, deep_fraction: float) -> SweepRow:
        from procache_comfyui.procache_core.tokens import TokenSelector

        reuse_speedup, _ = self.run(self.schedule.with_kinds(without_selective(self.schedule.kinds)))
        speedup, score = self.run(self.schedule, TokenSelector(**fields), deep_fraction)
        matched, extra = matched_schedule(self.schedule, speedup, reuse_speedup)
        matched_speedup, matched_score = self.run(matched)
        fewer = max(1, round(self.steps / speedup))
        row = SweepRow(self.steps, self.forecast, label, speedup, score["psnr"], score["fd"], matched_speedup,
                       matched_score["psnr"], extra, fewer, self.fewer(fewer))
        self.log(f"  {self.steps:3} steps {self.forecast:7} {label:<44} flops {speedup:5.2f}x psnr {row.psnr:6.2f} | "
                 f"+{extra} full {matched_speedup:5.2f}x psnr {row.matched_psnr:6.2f} | gain {row.gain:+6.2f} dB")
        return row


def markdown(rows: list[SweepRow], header: str) -> str:
    lines = [header, ""]
    for steps, forecast in dict.fromkeys((r.steps, r.forecast) for r in rows):
        lines += [f"**euler, {steps} steps, {'Taylor 1' if forecast == 'taylor1' else 'plain reuse'}**", "",
                  "| selective setting | FLOPs speedup | PSNR ↑ | FD ↓ | same FLOPs as full steps: extra full, speedup | "
                  "PSNR ↑ | gain (dB) | fewer steps: n, PSNR |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if (r.steps, r.forecast) == (steps, forecast)):
            lines.append(f"| {r.setting} | {r.flops:.2f}× | {r.psnr:.2f} | {r.fd:.1f} | +{r.extra_full}, {r.matched_flops:.2f}× | "
                         f"{r.matched_psnr:.2f} | {r.gain:+.2f} | {r.fewer_steps}, {r.fewer_psnr:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=None, help="a ComfyUI checkout (default: COMFYUI_PATH)")
    parser.add_argument("--samples", type=int, default=20, help="images per row (labels 0..9 repeated)")
    parser.add_argument("--steps", default="50,20", help="step counts, comma separated")
    parser.add_argument("--forecasts", default="reuse,taylor1", help="reuse and/or taylor1, comma separated")
    parser.add_argument("--settings", default="", help="indices into SETTINGS, comma separated (default: all)")
    add_out_option(parser, optional=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from .reference_flux import load_comfy
    from .reference_flux_bench import FluxBench

    version = load_comfy(args.comfyui)
    started = time.perf_counter()
    chosen = [SETTINGS[int(i)] for i in args.settings.split(",")] if args.settings else list(SETTINGS)
    bench = FluxBench(args.samples)
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        for forecast in (f.strip() for f in args.forecasts.split(",")):
            sweep = SelectiveSweep(bench, steps, "euler", forecast)
            rows += [sweep.row(*setting) for setting in chosen]
    command = "python -m benchmarks.selective_bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = (f"Selective steps at matched FLOPs on the reference Flux (256 image tokens) inside ComfyUI {version}, "
              f"euler, {args.samples} samples, CFG 2, schedule procache-dit-50-17full resampled; `{command.strip()}` "
              f"({(time.perf_counter() - started) / 60:.1f} min, one thread). PSNR against full compute of the same "
              f"seed. The matched row turns the selective steps into reuse and spends their FLOPs on extra full "
              f"steps; gain = selective PSNR − matched PSNR.")
    text = markdown(rows, header)
    print(text)
    if args.out:
        path = report_path(args.out, "selective_bench.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
