"""The speed-quality frontier on the trained reference DiT: every method at matched FLOPs, side by side.

    python -m benchmarks.frontier                 # 50 and 20 steps, euler, dpmpp_2m and dpmpp_sde, 2x..6x
    python -m benchmarks.frontier --quick         # a few samples, 20 steps, euler: seconds
    python -m benchmarks.frontier --comfyui ~/comfy/ComfyUI    # ComfyUI's own sampler functions
    python -m benchmarks.frontier --steps 20 --samplers euler --methods "ProCache Taylor 1"   # some rows only

Writes frontier.{md,json,png} to benchmarks/out/ (`--out benchmarks/results` updates the tracked copy).

At each target speedup S every row computes the block stack on the same number of steps,
B = round(steps / S), so their FLOPs match (the table gives each row's measured speedup):

    fewer steps           the sampler run with B steps
    ProCache ...          the engine (procache_core) on the library's generic schedule with B full
                          steps (search.generic_pattern), branch-level: plain reuse, Taylor 1, and
                          the online Chebyshev forecaster, with the pack's sampler-aware safeguards;
                          Taylor 1 and online also with the frequency split (low frequencies
                          forecast, high ones reused: procache_core/frequency.py)
    ProCache fast schedule    at 5x and 6x, the bundled schedules/procache-fast-<steps>-<x>x.json
                          (searched for Taylor 1 by benchmarks.search_fast) with Taylor 1
    ProCache Schedule Search  the pack's pattern search (procache_core.search.search, as the Schedule
                          Search node runs it: 5 drawn patterns, even spacing and the generic
                          pattern, automatic max_interval, no pre-ranking, no selective steps), each
                          candidate with Taylor 1 on 30 calibration images (seed 1000, never the
                          reported ones); the winner reported with Taylor 1. Branch level only: the
                          engine here has no memory budget (the reference Flux frontier also checks
                          one model-level residual)
    Spectrum-style        the pack's re-implementation of Spectrum, model level, B uniform steps
    FreqCa-style          the pack's re-implementation of FreqCa, model level, B uniform steps
    LazyCache-style       the pack's re-implementation of ComfyUI's LazyCache rule around the
                          denoiser (benchmarks.baselines.LazyCacheStyle), its threshold bisected on
                          this very run until it computes B steps' worth of model calls (FLOPs
                          only are matched, nothing is tuned for quality); the node's default
                          window (15 % to 95 %) where B is reachable with it, else the whole run.
                          It reuses (denoised - x) = -sigma * eps of the last computed call at a
                          smaller sigma, so on this epsilon model a reused call overshoots by
                          sigma_then / sigma_now (flow models, sigma <= 1, suffer less)

The sampling plumbing (the reference DiT as a k-diffusion epsilon denoiser, CFG 1.5, the engine's
Run told the sampler's name) is benchmarks.forecast_sampler_bench's; without ComfyUI the samplers
are benchmarks.ode_samplers' Euler, DPM-Solver++(2M) and DPM-Solver++ SDE (two model calls a step,
noise from a Brownian path fixed by the seed, the same in every row). The judge (benchmarks/judge.py) gives PSNR
against full compute with the same sampler and noise and FD against the real digits. Cache memory
is what a row holds between steps per image (both CFG streams), the engine's peak for its rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import torch

from procache_core import Schedule
from procache_core.forecast import Online, Taylor
from procache_core.reference.sampling import alphas_cumprod
from procache_core.search import SearchConstraints, auto_max_interval, generic_pattern, search

from . import ode_samplers
from .baselines import LazyCacheStyle, sigma_at_percent, calibrate_threshold
from .forecast_sampler_bench import _interp, reference_sigmas, sample
from .judge import load_judge
from .model_forecasters import FreqCaStyle, SpectrumStyle
from .output import ROOT, SCRATCH, add_out_option, write_reports
from .reference_bench import load_schedule
from .train_reference import load_reference

TARGETS = (2, 3, 4, 5, 6)
STEP_COUNTS = (50, 20)
SAMPLERS = ("euler", "dpmpp_2m", "dpmpp_sde")
# The frequency split's cutoff: on the reference DiT's 4x4 token grid only 0 (the mean) and 0.5 (all
# but Nyquist) differ; 0.5 scored higher (docs/forecast.md).
FREQUENCY_CUTOFF = 0.5
ENGINE_ROWS = (("ProCache reuse", None), ("ProCache Taylor 1", lambda: Taylor(1)),
               ("ProCache online (Chebyshev)", lambda: Online()),
               ("ProCache Taylor 1 + frequency split", lambda: Taylor(1).with_frequency_split(FREQUENCY_CUTOFF)),
               ("ProCache online + frequency split", lambda: Online().with_frequency_split(FREQUENCY_CUTOFF)))
FAST_ROW = "ProCache fast schedule + Taylor 1"
SEARCHED_ROW = "ProCache Schedule Search + Taylor 1 (calibration seeds)"
LAZYCACHE_ROW = "LazyCache-style (pack re-impl.)"
METHODS = ("full compute", "fewer steps") + tuple(name for name, _ in ENGINE_ROWS) + (FAST_ROW, SEARCHED_ROW,
    "Spectrum-style (pack re-impl.)", "FreqCa-style (pack re-impl.)", LAZYCACHE_ROW)
LAZYCACHE_WINDOW = (0.15, 0.95)      # the LazyCache node's default start_percent and end_percent
SEED = 0
CALIBRATION_SEED = 1000             # the searched row's seeds (never the reported ones)
CALIBRATION_SAMPLES = 30
SEARCH_CANDIDATES = 5                # the Schedule Search node's default K (the method's)


@dataclasses.dataclass
class Row:
    steps: int
    sampler: str
    target: float
    method: str
    setting: str
    flops_speedup: float
    cache_bytes_per_image: float
    psnr: float = math.nan
    fd: float = math.nan


def full_steps(steps: int, target: float) -> int:
    """B: the number of steps every row computes at `target`."""
    return max(1, round(steps / target))


def origin_label(candidate) -> str:
    """Where a search's winner came from, as the frontier tables' settings say it."""
    return {"uniform": "even intervals", "generic": "library generic"}.get(candidate.origin, "drawn")


def uniform_steps(steps: int, computed: int) -> list[int]:
    """`computed` evenly spaced step indices from step 0."""
    return sorted({round(i * steps / computed) for i in range(computed)})


def fast_schedule(steps: int, target: float) -> Schedule | None:
    """The bundled fast schedule for this step count and speedup, if the pack ships one."""
    name = f"procache-fast-{steps}-{target:g}x.json"
    return load_schedule(name) if os.path.exists(os.path.join(ROOT, "schedules", name)) else None


def percent_sigma(percent: float) -> float:
    """The reference DiT's sigma at a share of its training timesteps (baselines.sigma_at_percent with its schedule)."""
    return sigma_at_percent(percent, alphas_cumprod())


def step_timesteps(steps: int) -> list[float]:
    """The model timestep of each step's sigma, as forecast_sampler_bench's denoiser computes it."""
    acp = alphas_cumprod()
    log_sigmas = ((1 - acp) / acp).sqrt().log().float()
    return [_interp(torch.tensor(float(s)).log(), log_sigmas) for s in reference_sigmas(steps)[:-1]]


class CallCount:
    """A denoiser that counts the sampler's calls (dpmpp_sde makes two a step, one on the last)."""

    def __init__(self, denoise):
        self.denoise, self.calls = denoise, 0

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        return self.denoise(x, sigma, **kwargs)


class Frontier:
    def __init__(self, samples: int, functions=ode_samplers, model=None):
        self.model = model if model is not None else load_reference()
        self.judge = load_judge()
        self.labels = torch.arange(samples) % 10
        self.functions = functions

    def _sample(self, model, sampler, steps, schedule=None, forecaster=None, wrap_denoiser=None):
        return sample(model, self.labels, sampler, steps, SEED, schedule, forecaster, functions=self.functions,
                      wrap_denoiser=wrap_denoiser)

    def calibration_full(self, sampler: str, steps: int) -> torch.Tensor:
        """Full compute on the calibration seeds: what the searched row's candidates are scored against."""
        return sample(self.model, torch.arange(CALIBRATION_SAMPLES) % 10, sampler, steps, CALIBRATION_SEED,
                      functions=self.functions)[0]

    def searched(self, sampler: str, steps: int, computed: int, reference: torch.Tensor) -> tuple[Schedule, str]:
        """(schedule, setting text): Schedule Search with Taylor 1 on the calibration seeds, scored
        against `reference` (calibration_full)."""
        labels = torch.arange(CALIBRATION_SAMPLES) % 10

        def run(pattern):
            return sample(self.model, labels, sampler, steps, CALIBRATION_SEED,
                          Schedule(kinds=tuple(pattern), name="candidate"), Taylor(1), functions=self.functions)[0]

        constraints = SearchConstraints(steps, computed, 0, auto_max_interval(steps, computed))
        result = search(constraints, run, reference, count=SEARCH_CANDIDATES, seed=CALIBRATION_SEED)
        return (Schedule(kinds=result.final.pattern, name=f"searched-{computed}"),
                f"{result.final.text} ({origin_label(result.final)}; calibration error {result.final.error:.3g})")

    def _counted(self, sampler, steps):
        """(images, number of denoiser calls) of a plain run."""
        made = []
        images, _ = self._sample(self.model, sampler, steps,
                                 wrap_denoiser=lambda denoise: made.append(CallCount(denoise)) or made[0])
        return images, made[0].calls

    def lazycache(self, sampler: str, steps: int, target: float):
        """(images, rule, setting) of the LazyCache-style rule calibrated to a FLOPs speedup of `target`."""
        def run(window, threshold):
            made = []

            def wrap(denoise):
                made.append(LazyCacheStyle(denoise, threshold, *map(percent_sigma, window), cost_per_call=1.0))
                return made[0]
            images, _ = self._sample(self.model, sampler, steps, wrap_denoiser=wrap)
            return made[0].stats.flops_speedup, (images, made[0])

        window = LAZYCACHE_WINDOW
        if run(window, math.inf)[0] <= target * (1 + 1e-3):    # only skipping all it may would reach the target
            window = (0.0, 1.0)
        threshold, _, (images, rule) = calibrate_threshold(lambda th: run(window, th), target, iters=12, exact=True)
        return images, rule, f"threshold {threshold:.4g}, window {window[0]:.0%}-{window[1]:.0%}"

    def rows(self, steps: int, sampler: str, targets=TARGETS, log=print, methods=METHODS) -> list[Row]:
        """Every method in `methods` (full compute always) at each target speedup."""
        n = len(self.labels)
        full, full_calls = self._counted(sampler, steps)
        out = []

        def add(target, method, setting, images, speedup, cache_bytes):
            row = Row(steps, sampler, target, method, setting, speedup, cache_bytes / n)
            scores = self.judge.evaluate(images, self.labels, reference=full)
            row.psnr, row.fd = scores["psnr"], scores["fd"]
            out.append(row)
            log(f"  {steps:>3} {sampler:<9} {target:>3g}x {method:<36} flops {speedup:5.2f}x  psnr {row.psnr:6.2f}  "
                f"fd {row.fd:7.3f}  cache {row.cache_bytes_per_image / 1024:7.1f} KiB/image")

        add(1, "full compute", f"{steps} steps", full, 1.0, 0)
        timesteps = step_timesteps(steps)
        calibration_full = None         # full compute on the calibration seeds, once, when the searched row runs
        for target in targets:
            computed = full_steps(steps, target)
            images, calls = self._counted(sampler, computed)
            if "fewer steps" in methods:
                add(target, "fewer steps", f"{computed} steps", images, full_calls / calls, 0)
            schedule = Schedule(kinds=tuple(generic_pattern(steps, steps / computed)), name=f"generic-{computed}")
            for method, make in ENGINE_ROWS:
                if method not in methods:
                    continue
                images, run = self._sample(self.model, sampler, steps, schedule, make() if make else None)
                add(target, method, schedule.pattern, images, run.stats.flops_speedup, run.stats.cache_bytes_peak)
            fast = fast_schedule(steps, target) if FAST_ROW in methods else None
            if fast is not None:
                images, run = self._sample(self.model, sampler, steps, fast, Taylor(1))
                add(target, FAST_ROW, fast.pattern, images, run.stats.flops_speedup, run.stats.cache_bytes_peak)
            if SEARCHED_ROW in methods:
                if calibration_full is None:
                    calibration_full = self.calibration_full(sampler, steps)
                searched, setting = self.searched(sampler, steps, computed, calibration_full)
                images, run = self._sample(self.model, sampler, steps, searched, Taylor(1))
                add(target, SEARCHED_ROW, setting, images, run.stats.flops_speedup, run.stats.cache_bytes_peak)
            pattern = "".join("1" if i in uniform_steps(steps, computed) else "0" for i in range(steps))
            for method, cls in (("Spectrum-style (pack re-impl.)", SpectrumStyle),
                                ("FreqCa-style (pack re-impl.)", FreqCaStyle)):
                if method not in methods:
                    continue
                wrapped = cls(self.model, uniform_steps(steps, computed), timesteps)
                images, _ = self._sample(wrapped, sampler, steps)
                add(target, method, pattern, images, wrapped.stats.flops_speedup, wrapped.cache_bytes)
            if LAZYCACHE_ROW in methods:
                images, rule, setting = self.lazycache(sampler, steps, full_calls / calls)
                add(target, LAZYCACHE_ROW, setting, images, rule.stats.flops_speedup, rule.cache_bytes)
        return out


def _cell(row: Row, full: Row) -> str:
    return f"{row.psnr:.2f} / {row.fd / full.fd:.2f}×"


def markdown(rows: list[Row], command: str, samples: int, seconds: float, sampler_source: str) -> str:
    lines = [f"Reference DiT on digits, {samples} samples, CFG 1.5, seed {SEED}, samplers: {sampler_source}; "
             f"`{command}` ({seconds / 60:.1f} min, 2-core CPU, no GPU).", "",
             "Each cell: PSNR against full compute (dB, higher is better) / FD as a multiple of full "
             "compute's (lower is better). Every row of a column computes the block stack on the same "
             "number of steps; the FLOPs line gives the measured speedups of that column's rows (min–max). "
             "Cache: bytes held between steps per image, both CFG streams. Spectrum-style, "
             "FreqCa-style and LazyCache-style are this pack's re-implementations of the published "
             "algorithms (LazyCache: of ComfyUI's node), not the authors' code. The fast-schedule row "
             "exists only where the pack ships a schedule (5x, 6x). The Schedule Search row searched its "
             f"pattern with Taylor 1 on {CALIBRATION_SAMPLES} calibration images (seed {CALIBRATION_SEED}); "
             "the JSON's setting gives the winner.", ""]
    return "\n".join(lines + tables(rows, METHODS[1:]))


def tables(rows: list[Row], methods) -> list[str]:
    """One markdown table per step count and sampler: a row per method in `methods` that has rows,
    a column per target speedup, and the measured FLOPs speedups of each column (min–max)."""
    lines = []
    for steps in sorted({r.steps for r in rows}, reverse=True):
        for sampler in dict.fromkeys(r.sampler for r in rows if r.steps == steps):
            mine = [r for r in rows if r.steps == steps and r.sampler == sampler]
            full = next(r for r in mine if r.method == "full compute")
            targets = sorted({r.target for r in mine if r.method != "full compute"})
            lines += [f"**{steps} steps, {sampler}** (full compute FD {full.fd:.3f})", "",
                      "| method | cache KiB/image | " + " | ".join(f"~{t:g}x" for t in targets) + " |",
                      "|---|---|" + "---|" * len(targets)]
            speedups = []
            for t in targets:
                at = [r.flops_speedup for r in mine if r.target == t]
                speedups.append(f"{min(at):.2f}–{max(at):.2f}×" if max(at) - min(at) > 0.005 else f"{at[0]:.2f}×")
            lines.append("| FLOPs speedup | | " + " | ".join(speedups) + " |")
            for method in methods:
                cells = {r.target: r for r in mine if r.method == method}
                if not cells:       # a run of some rows only (--methods)
                    continue
                memory = max(r.cache_bytes_per_image for r in cells.values()) / 1024
                lines.append(f"| {method} | {memory:.1f} | "
                             + " | ".join(_cell(cells[t], full) if t in cells else "–" for t in targets) + " |")
            lines.append("")
    return lines


def plot(rows: list[Row], path: str, methods=None, model: str = "reference DiT") -> None:
    """PSNR against FLOPs speedup, one line per method (default: every method of this frontier), one
    panel per step count (rows of panels) and sampler (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = METHODS[1:] if methods is None else methods
    step_counts = list(dict.fromkeys(r.steps for r in rows))
    samplers = list(dict.fromkeys(r.sampler for r in rows))
    fig, axes = plt.subplots(len(step_counts), len(samplers), figsize=(5.2 * len(samplers), 4.4 * len(step_counts)),
                             squeeze=False)
    for axes_row, steps in zip(axes, step_counts):
        for ax, sampler in zip(axes_row, samplers):
            for method in methods:
                mine = sorted((r for r in rows if (r.steps, r.sampler, r.method) == (steps, sampler, method)),
                              key=lambda r: r.flops_speedup)
                if not mine:
                    continue
                ours = method.startswith("ProCache")
                ax.plot([r.flops_speedup for r in mine], [r.psnr for r in mine], marker="*" if ours else "o",
                        ls="-" if ours else "--", label=method)
            ax.set_title(f"{model}, {sampler}, {steps} steps")
            ax.set_xlabel("FLOPs speedup (block work)")
            ax.set_ylabel("PSNR vs full compute (dB)")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_frontier(samples: int, step_counts=STEP_COUNTS, samplers=SAMPLERS, targets=TARGETS,
                 functions=ode_samplers, out: str | None = SCRATCH, command: str = "python -m benchmarks.frontier",
                 model=None, log=print, methods=METHODS) -> list[Row]:
    started = time.perf_counter()
    bench = Frontier(samples, functions, model)
    rows = []
    for steps in step_counts:
        for sampler in samplers:
            rows += bench.rows(steps, sampler, targets, log, methods)
    seconds = time.perf_counter() - started
    if out:
        source = "ComfyUI's k-diffusion functions" if functions is not ode_samplers else "benchmarks.ode_samplers"
        write_reports(out, "frontier", "# Speed-quality frontier\n\n" + markdown(rows, command, samples, seconds, source),
                      {"command": command, "samples": samples, "seconds": round(seconds, 1),
                       "rows": [dataclasses.asdict(r) for r in rows]}, lambda path: plot(rows, path), log)
    log(f"done in {seconds / 60:.1f} min")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 samples, 20 steps, euler, 2x and 4x")
    parser.add_argument("--samples", type=int, default=None, help="images per row (default 150)")
    parser.add_argument("--steps", type=int, nargs="+", default=None)
    parser.add_argument("--targets", type=float, nargs="+", default=None, help="target speedups (default 2 3 4 5 6)")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS[1:], metavar="METHOD",
                        help=f"only these rows besides full compute, e.g. 'ProCache Taylor 1' (all: {', '.join(METHODS[1:])})")
    parser.add_argument("--comfyui", default=None,
                        help="a ComfyUI checkout: sample with its k-diffusion functions instead of benchmarks.ode_samplers")
    add_out_option(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    functions, samplers = ode_samplers, tuple(args.samplers)
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = args.comfyui
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        import comfy_env
        comfy_env.load_comfy()
        import comfy.k_diffusion.sampling as functions
    if args.quick:
        samplers = samplers[:1]
    command = "python -m benchmarks.frontier " + " ".join(argv if argv is not None else sys.argv[1:])
    run_frontier(args.samples or (8 if args.quick else 150), args.steps or ([20] if args.quick else list(STEP_COUNTS)),
                 samplers, args.targets or ((2, 4) if args.quick else TARGETS), functions, args.out, command.strip(),
                 methods=("full compute", *args.methods) if args.methods else METHODS)


if __name__ == "__main__":
    main()
