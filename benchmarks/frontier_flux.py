"""The speed-quality frontier on the second reference model (the trained tiny Flux, ComfyUI's own
Flux class, 256 image tokens) under ComfyUI's samplers: every method at matched FLOPs, side by side.

    python -m benchmarks.frontier_flux --comfyui ~/comfy/ComfyUI --samples 10 --steps 50 --samplers euler
    python -m benchmarks.frontier_flux --steps 20 --targets 2 3 --rows benchmarks/out/frontier_flux.json

As benchmarks.frontier does on the reference DiT: at each target speedup S every row computes the
block stack on B = round(steps / S) steps (frontier.full_steps), so their FLOPs match:

    fewer steps                 the sampler run with B steps
    ProCache reuse / Taylor 1 / online (Chebyshev)
                                ProCache Apply on the library's generic schedule with B full steps
                                (search.generic_pattern), branch level (budget unlimited)
    ProCache model-level ...    the same schedule with budget "minimal": one model-level residual
                                (in the model's dtype), forecast by Taylor 1 or by the pack's online
                                Chebyshev forecaster. The latter is Spectrum-like in spirit (a
                                Chebyshev basis fitted online over the run's own full steps) but is
                                not a re-implementation of Spectrum, which forecasts the final-block
                                feature. With the frequency split (procache_core/frequency.py: the low
                                spatial frequencies forecast, the high ones reused), Taylor 1 on one
                                residual is FreqCa-like in the same sense.
    ProCache Taylor 1, granularity chosen on calibration images
                                Schedule Search's rule (search.prefer_model_level): Taylor 1 at branch
                                level and with one model-level residual on 5 calibration images (seed
                                1000, never the reported ones), the one clearly closer to full compute
                                kept for the reported images
    ProCache Schedule Search + Taylor 1 (calibration images)
                                the pack's own pattern search as the Schedule Search node runs it, on
                                the same 5 calibration images: 5 drawn patterns, even intervals and the
                                generic pattern, each with Taylor 1 at branch level; the winner once
                                more with one model-level residual, kept where clearly closer. No
                                selective steps, no pre-ranking; the node's automatic max_interval
    ProCache Taylor 1 + model-level check
                                branch level with Apply's check_model_level on: the run measures
                                whether one model-level residual lands closer and switches to it
    ProCache fast schedule + Taylor 1   at 5x and 6x, schedules/procache-fast-<steps>-<x>x.json
    Spectrum-style, FreqCa-style    the pack's re-implementations of the two published model-level
                                forecasters (benchmarks/comfy_model_forecasters.py), computing the
                                stack on B evenly spaced steps, as on the reference DiT
    LazyCache (ComfyUI)         ComfyUI's own LazyCache node, its threshold bisected on this very run
                                until it runs B steps' worth of transformer blocks (FLOPs only are
                                matched, nothing is tuned for quality); the node's default window
                                (15 % to 95 %) where B is reachable with it, else the whole run.

Cells: PSNR against full compute / FD as a multiple of full compute's (benchmarks/judge.py). Cache:
the ProCache run's peak (run statistics' cache_bytes_peak) per image; LazyCache's from its code (one
latent-sized output difference and two latents subsampled by 8 per side). Each call adds its rows to
the `--rows` JSON file (replacing rows of the same step count, sampler, target and method) and writes
the markdown of all rows there, so a long sweep can run as several short commands.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time

import torch

from .baselines import calibrate_threshold
from .comfy_model_forecasters import FluxStackForecast, FreqCaState, SpectrumState
from .frontier import Row, fast_schedule, full_steps, origin_label, plot, tables, uniform_steps
from .output import add_out_option, report_path
from .reference_flux import LATENT_SIZE
from .reference_flux_bench import CALIBRATION_SEED, SEED

TARGETS = (2, 3, 4, 5, 6)
STEP_COUNTS = (50, 20)
SAMPLERS = ("euler", "dpmpp_2m")
FEWER = "fewer steps"
BRANCH_ROWS = (("ProCache reuse", None), ("ProCache Taylor 1", "taylor"), ("ProCache online (Chebyshev)", "online"))
CHECK_ROW = "ProCache Taylor 1 + model-level check"     # branch level, Apply's check_model_level on
CHOSEN_ROW = "ProCache Taylor 1, granularity chosen on calibration images"    # Schedule Search's rule
SEARCHED_ROW = "ProCache Schedule Search + Taylor 1 (calibration images)"    # the pack's own pattern search
SEARCH_CANDIDATES = 5                # Schedule Search's default K (the method's)
MODEL_ROWS = (("ProCache model-level residual + Taylor 1", "taylor"),
              ("ProCache model-level residual + online Chebyshev (Spectrum-like, not Spectrum)", "online"),
              ("ProCache model-level residual + Taylor 1 + frequency split (FreqCa-like, not FreqCa)", "taylor split"))
# The split's cutoff on the 16x16 token grid: frequencies up to half of Nyquist are forecast.
FREQUENCY_CUTOFF = 0.5
SPECTRUM_ROW = "Spectrum-style (pack re-impl.)"
FREQCA_ROW = "FreqCa-style (pack re-impl.)"
FAST_ROW = "ProCache fast schedule + Taylor 1"
LAZYCACHE_ROW = "LazyCache (ComfyUI node)"
METHODS = (FEWER,) + tuple(n for n, _ in BRANCH_ROWS) + (CHECK_ROW, CHOSEN_ROW, SEARCHED_ROW) \
    + tuple(n for n, _ in MODEL_ROWS) + (FAST_ROW, SPECTRUM_ROW, FREQCA_ROW, LAZYCACHE_ROW)
# the plot's lines (the table has every row): the pack's default, calibrated and searched paths against the peers
PLOTTED = (FEWER, "ProCache reuse", "ProCache Taylor 1", CHOSEN_ROW, SEARCHED_ROW, SPECTRUM_ROW, FREQCA_ROW,
           LAZYCACHE_ROW)
LAZYCACHE_WINDOW = (0.15, 0.95)      # the node's default start_percent and end_percent
LAZYCACHE_SUBSAMPLE = 8              # the node's subsample_factor


def lazycache_bytes_per_image(latent_shape) -> float:
    """What ComfyUI's LazyCache holds between steps per image: the output difference (latent-sized)
    and the previous input and output subsampled by LAZYCACHE_SUBSAMPLE per side, float32."""
    elements = math.prod(latent_shape)
    return 4.0 * elements * (1 + 2 / LAZYCACHE_SUBSAMPLE ** 2)


class FluxFrontier:
    def __init__(self, samples: int, bench=None):
        from .reference_flux_bench import FluxBench
        self.bench = bench if bench is not None else FluxBench(samples)

    def forecaster(self, kind):
        from procache_comfyui.procache_core.forecast import Online, Taylor
        return {None: lambda: None, "taylor": lambda: Taylor(1), "online": lambda: Online(),
                "taylor split": lambda: Taylor(1).with_frequency_split(FREQUENCY_CUTOFF)}[kind]()

    def procache(self, steps, sampler, kinds, name, forecaster, budget, check_model_level=False, labels=None,
                 seed=SEED):
        """(Measured, cache bytes peak) of ProCache Apply on a schedule of `kinds`."""
        from procache_comfyui.nodes.runtime import LAST_RUNS, ApplyConfig, attach
        from procache_comfyui.procache_core import Schedule
        from procache_comfyui.procache_core.memory import Budget

        config = ApplyConfig(schedule=Schedule(kinds=tuple(kinds), name=name), forecaster=self.forecaster(forecaster),
                             budget=Budget.parse(budget), cache_precision="model dtype",
                             check_model_level=check_model_level)
        result = self.bench.measure(attach(self.bench.patcher, config), steps, sampler, labels, seed)
        return result, LAST_RUNS.latest()["cache_bytes_peak"]

    def chosen_granularity(self, steps, sampler, kinds, name, calibration_full) -> tuple[str, str]:
        """(budget, setting text): Schedule Search's rule (search.prefer_model_level) on the
        calibration images: branch level against one model-level residual, both with Taylor 1."""
        from procache_comfyui.procache_core.search import output_error, prefer_model_level
        errors = {}
        for budget in ("unlimited", "minimal"):
            result, _ = self.procache(steps, sampler, kinds, name, "taylor", budget, labels=self.bench.cal_labels,
                                      seed=CALIBRATION_SEED)
            errors[budget] = output_error(result.images, calibration_full.images)
        model_level = prefer_model_level(errors["unlimited"], errors["minimal"])
        return ("minimal" if model_level else "unlimited",
                f"{'model level' if model_level else 'branch level'} (calibration error: branch "
                f"{errors['unlimited']:.3g}, model level {errors['minimal']:.3g})")

    def searched(self, steps, sampler, computed, calibration_full):
        """(pattern, budget, setting text): Schedule Search as its node runs it, on the calibration
        images: K drawn patterns, the even-interval one and the generic one, each sampled with Taylor 1 at branch
        level and scored against full compute; the winner then once more with one model-level
        residual, kept where prefer_model_level says so. No selective steps (they would add FLOPs)
        and no pre-ranking profile; the node's automatic max_interval (twice the mean interval)."""
        from procache_comfyui.procache_core.search import (SearchConstraints, auto_max_interval, output_error,
                                                          prefer_model_level, search)
        constraints = SearchConstraints(steps, computed, 0, auto_max_interval(steps, computed))

        def run(budget):
            return lambda pattern: self.procache(steps, sampler, pattern, "searched", "taylor", budget,
                                                 labels=self.bench.cal_labels, seed=CALIBRATION_SEED)[0].images

        result = search(constraints, run("unlimited"), calibration_full.images, count=SEARCH_CANDIDATES,
                        seed=CALIBRATION_SEED)
        pattern = list(result.final.pattern)
        model_error = output_error(run("minimal")(pattern), calibration_full.images)
        model_level = prefer_model_level(result.final.error, model_error)
        granularity = "model level" if model_level else "branch level"
        return pattern, "minimal" if model_level else "unlimited", (
            f"{''.join(map(str, pattern))} ({origin_label(result.final)}; {granularity}, "
            f"calibration error: branch {result.final.error:.3g}, model level {model_error:.3g})")

    def sigmas(self, steps: int) -> list[float]:
        """The sampler's noise levels for `steps` steps of the bench's scheduler."""
        import comfy.samplers
        from .reference_flux import SCHEDULER
        sampling = self.bench.patcher.get_model_object("model_sampling")
        return comfy.samplers.calculate_sigmas(sampling, SCHEDULER, steps).tolist()

    def lazycache(self, steps, sampler, full_calls, target):
        """(Measured, setting) of ComfyUI's LazyCache with its threshold bisected to `target` block work."""
        import comfy_extras.nodes_easycache as easycache

        def run(window, threshold):
            patcher = easycache.LazyCacheNode.execute(self.bench.patcher, threshold, *window, False).result[0]
            result = self.bench.measure(patcher, steps, sampler)
            return full_calls / max(1, result.block_calls), result

        window = LAZYCACHE_WINDOW
        if run(window, 1e6)[0] <= target * (1 + 1e-3):       # only skipping all it may would reach the target
            window = (0.0, 1.0)
        threshold, _, result = calibrate_threshold(lambda th: run(window, th), target, low=1e-3, high=50.0,
                                                   iters=8, exact=True)
        return result, f"threshold {threshold:.4g}, window {window[0]:.0%}-{window[1]:.0%}"

    def rows(self, steps: int, sampler: str, targets=TARGETS, log=print, methods=METHODS) -> list[Row]:
        from procache_comfyui.procache_core.search import generic_pattern

        n = len(self.bench.labels)
        full = self.bench.measure(None, steps, sampler)
        out = []

        def add(target, method, setting, result, speedup, cache_bytes):
            row = Row(steps, sampler, target, method, setting, speedup, cache_bytes / n)
            scores = self.bench.score(result, None if method == "full compute" else full)
            row.psnr, row.fd = scores.get("psnr", math.nan), scores["fd"]
            out.append(row)
            log(f"  {steps:>3} {sampler:<9} {target:>3g}x {method[:44]:<44} flops {speedup:5.2f}x  psnr {row.psnr:6.2f}  "
                f"fd {row.fd:7.2f}  cache {row.cache_bytes_per_image / 1024:7.1f} KiB/image")

        add(1, "full compute", f"{steps} steps", full, 1.0, 0)
        calibration = []                # full compute on the calibration images, once, when a row needs it

        def calibration_full():
            if not calibration:
                calibration.append(self.bench.measure(None, steps, sampler, self.bench.cal_labels, CALIBRATION_SEED))
            return calibration[0]

        for target in targets:
            computed = full_steps(steps, target)
            if FEWER in methods:
                fewer = self.bench.measure(None, computed, sampler)
                add(target, FEWER, f"{computed} steps", fewer, full.block_calls / fewer.block_calls, 0)
            kinds = generic_pattern(steps, steps / computed)
            for rows_, budget in ((BRANCH_ROWS, "unlimited"), (MODEL_ROWS, "minimal")):
                for method, forecaster in rows_:
                    if method in methods:
                        result, peak = self.procache(steps, sampler, kinds, f"generic-{computed}", forecaster, budget)
                        add(target, method, "".join(map(str, kinds)), result, result.flops_speedup, peak)
            if CHOSEN_ROW in methods:
                chosen, setting = self.chosen_granularity(steps, sampler, kinds, f"generic-{computed}",
                                                          calibration_full())
                result, peak = self.procache(steps, sampler, kinds, f"generic-{computed}", "taylor", chosen)
                add(target, CHOSEN_ROW, setting, result, result.flops_speedup, peak)
            if SEARCHED_ROW in methods:
                pattern, budget, setting = self.searched(steps, sampler, computed, calibration_full())
                result, peak = self.procache(steps, sampler, pattern, "searched", "taylor", budget)
                add(target, SEARCHED_ROW, setting, result, result.flops_speedup, peak)
            if CHECK_ROW in methods:
                result, peak = self.procache(steps, sampler, kinds, f"generic-{computed}", "taylor", "unlimited",
                                             check_model_level=True)
                add(target, CHECK_ROW, "".join(map(str, kinds)), result, result.flops_speedup, peak)
            fast = fast_schedule(steps, target) if FAST_ROW in methods else None
            if fast is not None:
                result, peak = self.procache(steps, sampler, [int(k) for k in fast.kinds], fast.name, "taylor",
                                             "unlimited")
                add(target, FAST_ROW, fast.pattern, result, result.flops_speedup, peak)
            for method, make_state in ((SPECTRUM_ROW, SpectrumState), (FREQCA_ROW, FreqCaState)):
                if method in methods:
                    compute = uniform_steps(steps, computed)
                    forecast = FluxStackForecast(make_state, compute, self.sigmas(steps))
                    result = self.bench.measure(forecast.patch(self.bench.patcher), steps, sampler)
                    add(target, method, "".join("1" if i in compute else "0" for i in range(steps)), result,
                        full.block_calls / max(1, result.block_calls), forecast.cache_bytes)
            if LAZYCACHE_ROW in methods:
                result, setting = self.lazycache(steps, sampler, full.block_calls, steps / computed)
                add(target, LAZYCACHE_ROW, setting, result, full.block_calls / max(1, result.block_calls),
                    lazycache_bytes_per_image((16, LATENT_SIZE, LATENT_SIZE)) * n)
        return out


def merge(old: list[dict], new: list[Row]) -> list[dict]:
    """`old` rows with those of `new` added, a new row replacing an old one of the same column and method."""
    key = lambda r: (r["steps"], r["sampler"], r["target"], r["method"])
    fresh = {key(dataclasses.asdict(r)): dataclasses.asdict(r) for r in new}
    return [r for r in old if key(r) not in fresh] + list(fresh.values())


def markdown(rows: list[Row], commands: list[str], header: str) -> str:
    lines = [header, "", "Commands (2-core CPU, no GPU, one torch thread):", ""]
    lines += [f"    {c}" for c in commands] + [""]
    lines += ["Each cell: PSNR against full compute (dB, higher is better) / FD as a multiple of full compute's "
              "(lower is better; from few samples it ranks only roughly). Every row of a column computes the "
              "block stack on the same number of steps; the FLOPs line gives the measured speedups of that "
              "column's rows (min–max). Cache: bytes held between steps per image (both CFG streams for "
              "ProCache), the run's peak. The model-level online row is the pack's model-level Chebyshev "
              "forecaster: Spectrum-like in spirit, not a re-implementation of Spectrum (which forecasts the "
              "final-block feature); with the frequency split it is FreqCa-like in the same sense. "
              "Spectrum-style and FreqCa-style are this pack's re-implementations of the published "
              "algorithms (benchmarks/comfy_model_forecasters.py), not the authors' code. The model-level "
              "check row is branch level with Apply's check_model_level on; the calibration row applies "
              "Schedule Search's granularity rule on 5 calibration images and says what it chose; the Schedule "
              "Search row searches the pattern too, on the same images, and gives the winner and its "
              "granularity in the JSON's setting. LazyCache "
              "is ComfyUI's own node. The fast-schedule row exists only where the pack ships a schedule "
              "(5x, 6x).", ""]
    return "\n".join(lines + tables(rows, METHODS))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=None, help="a ComfyUI checkout (default: COMFYUI_PATH)")
    parser.add_argument("--samples", type=int, default=10, help="images per row (labels 0..9 repeated)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS))
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), help="ComfyUI sampler names")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="target speedups")
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS, metavar="METHOD",
                        help=f"only these rows besides full compute (all: {', '.join(METHODS)})")
    parser.add_argument("--rows", default=None,
                        help="JSON file the rows are added to (default: frontier_flux.json in --out)")
    add_out_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from .reference_flux import load_comfy
    version = load_comfy(args.comfyui)
    started = time.perf_counter()
    bench = FluxFrontier(args.samples)
    rows = []
    for steps in args.steps:
        for sampler in args.samplers:
            rows += bench.rows(steps, sampler, args.targets, methods=args.methods or METHODS)
    command = "python -m benchmarks.frontier_flux " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    path = args.rows or report_path(args.out, "frontier_flux.json")
    record = {"samples": args.samples, "commands": [], "rows": []}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record["samples"] != args.samples:
            raise SystemExit(f"{path} holds rows of {record['samples']} samples, this run has {args.samples}: "
                             f"give another --rows file")
    record["rows"] = merge(record["rows"], rows)
    record["commands"].append(f"{command.strip()}  # {(time.perf_counter() - started) / 60:.1f} min")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    header = (f"# Speed-quality frontier, reference Flux\n\nReference Flux (ComfyUI's Flux class trained on digits, "
              f"256 image tokens) inside ComfyUI {version}, {args.samples} samples, CFG 2, simple scheduler, "
              f"seed 0; ComfyUI's samplers.")
    all_rows = [Row(**r) for r in record["rows"]]
    text = markdown(all_rows, record["commands"], header)
    folder = os.path.dirname(path) or "."
    with open(report_path(folder, "frontier_flux.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plot(all_rows, report_path(folder, "frontier_flux.png"), PLOTTED, model="reference Flux")
    print(text)


if __name__ == "__main__":
    main()
