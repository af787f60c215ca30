"""How much quality each memory budget keeps, at matched FLOPs, side by side in one run.

    python -m benchmarks.memory_quality                       # reference DiT, 50 and 20 steps
    python -m benchmarks.memory_quality --comfyui ~/comfy/ComfyUI --families flux,wan,pixart
    python -m benchmarks.memory_quality --samples 30 --steps 20 --out benchmarks/results   # update the README's figures

Budgets are counted in residuals R: one image-token x hidden tensor per CFG stream, what the
step-skipping caches keep. Every budget row runs the same ProCache schedule (with selective steps)
and so does about the same block work; the budget only changes the granularity the plan picks
(branch level, deep blocks at branch level with residual spans elsewhere, residual spans, or the
model-level residual), printed beside each row with its planned cache bytes.

Reference DiT (trained on digits, 16 tokens, DDIM, CFG 1.5): PSNR against the full-compute image of
the same seed, FD against the real digits, and the share of branch level's PSNR gain over the
model-level residual that each budget keeps, beside fewer steps and the EasyCache-, TeaCache- and
LazyCache-style rules calibrated to the same FLOPs (benchmarks/baselines.py). Rows "model-level
check" run Apply's check_model_level (procache_core/rung_check.py) on the small budgets.

Tiny ComfyUI models (random weights, euler, CFG 2): error of the final latent against full compute,
beside fewer steps and ComfyUI's own LazyCache with its threshold set by bisection to the ProCache
row's block work. Random weights say how far a method moves the result, not image quality.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

from benchmarks.baselines import LazyCacheDDIM, calibrate_threshold  # noqa: E402
from benchmarks.output import add_out_option, report_path  # noqa: E402
from procache_core import SchedulePolicy  # noqa: E402
from procache_core.forecast import Taylor  # noqa: E402
from procache_core.memory import DEFAULT_PRECISION, Budget, format_bytes  # noqa: E402
from procache_core.reference.sampling import sample  # noqa: E402

BUDGETS = ("unlimited", "16", "8", "4", "2", "1", "minimal")
CHECKED_BUDGETS = ("8", "4", "2", "1")


def budget_of(name: str) -> Budget:
    return Budget.parse(name if not name.isdigit() else f"{name} residuals")


def budget_label(name: str, precision: str = "model dtype", forecast: str = "reuse") -> str:
    label = {"unlimited": "R = unlimited", "minimal": "model-level residual"}.get(name, f"R = {name}")
    label = label if precision == "model dtype" else f"{label}, {precision}"
    return label if forecast == "reuse" else f"{label}, {FORECASTS[forecast][0]}"


# Forecast rows: the budget must also hold the forecaster's history, so a forecasting run can sit
# on a coarser rung than plain reuse at the same R.
FORECASTS = {"reuse": ("plain reuse", lambda: None), "taylor1": ("Taylor 1", lambda: Taylor(1))}


def budget_rows(forecasts, precisions):
    """(budget, precision, forecast) of every ProCache row: all budgets in model dtype, the budgets
    between unlimited and minimal in the other precisions, each with every forecast."""
    return [(name, precision, forecast) for forecast in forecasts for precision in precisions
            for name in (BUDGETS if precision == "model dtype" else BUDGETS[1:-1])]


# ---- reference DiT --------------------------------------------------------------------------------
def reference_rows(samples: int, steps: int, precisions=("model dtype",), forecasts=("reuse",),
                   log=print) -> list[dict]:
    from .reference_bench import CALIBRATION_SEED, CFG_SCALE, PROCACHE_DEEP_FRACTION, PROCACHE_SELECTOR, SCHEDULES, Bench, load_schedule
    bench = Bench(samples)
    schedule = load_schedule(SCHEDULES.get(steps, SCHEDULES[50]))
    schedule = schedule.resampled(steps) if schedule.steps != steps else schedule
    rows = []
    full, _, _, _ = bench.plain(steps)

    def add(method, setting, images, flops, plan=None, forecast="reuse"):
        row = {"method": method, "setting": setting, "flops": flops, "plan": plan, "forecast": forecast}
        row.update(bench.judge.evaluate(images, bench.labels, reference=full))
        rows.append(row)
        log(f"  {steps:>3} steps  {method:<30} {setting:<34} flops {flops:5.2f}x  psnr {row['psnr']:6.2f}  "
            f"fd {row['fd']:7.3f}  {plan['text'] if plan else ''}")

    add("full compute", f"DDIM {steps}", full, 1.0)
    for name, precision, forecast in budget_rows(forecasts, precisions):
        policy = SchedulePolicy(schedule, deep_fraction=PROCACHE_DEEP_FRACTION)
        images, run = sample(bench.model, bench.labels, steps, CFG_SCALE, 0, policy=policy,
                             selector=PROCACHE_SELECTOR, return_run=True, budget=budget_of(name),
                             precision=precision, forecaster=FORECASTS[forecast][1]())
        add("ProCache + selective", budget_label(name, precision, forecast), images, run.stats.flops_speedup,
            run.stats.plan, forecast)
    # check_model_level (rung_check.py) on the small budgets, with Apply's default precision
    for forecast in forecasts:
        for name in CHECKED_BUDGETS:
            policy = SchedulePolicy(schedule, deep_fraction=PROCACHE_DEEP_FRACTION)
            images, run = sample(bench.model, bench.labels, steps, CFG_SCALE, 0, policy=policy,
                                 selector=PROCACHE_SELECTOR, return_run=True, budget=budget_of(name),
                                 precision=DEFAULT_PRECISION, forecaster=FORECASTS[forecast][1](), rung_check=True)
            add("ProCache + selective", budget_label(name, DEFAULT_PRECISION, forecast) + ", model-level check", images,
                run.stats.flops_speedup, run.stats.plan, forecast)
    target = rows[1]["flops"]
    fewer = max(1, round(steps / target))
    images, _, _, _ = bench.plain(fewer)
    add("fewer steps (equal FLOPs)", f"DDIM {fewer}", images, steps / fewer)
    for rule, label in (("easycache", "EasyCache-style"), ("teacache", "TeaCache-style")):
        threshold = bench.calibrate(steps, rule, target)
        images, flops, _, _ = bench.dynamic(steps, rule, threshold)
        add(label, f"threshold {threshold:.4g}", images, flops)

    def lazycache(threshold, labels=bench.cal_labels, seed=CALIBRATION_SEED):
        wrapped = LazyCacheDDIM(bench.model, threshold)
        images = sample(wrapped, labels, steps, CFG_SCALE, seed)
        return wrapped.stats.flops_speedup, images
    threshold = calibrate_threshold(lazycache, target, exact=True)[0]     # on the calibration seeds
    flops, images = lazycache(threshold, bench.labels, 0)
    add("LazyCache-style", f"threshold {threshold:.4g}", images, flops)
    return rows


def gain_kept(rows: list[dict], label: str) -> float | None:
    """The share of branch level's PSNR gain over the model-level residual that the row `label`
    keeps, both ends taken with the row's own forecast."""
    by = {r["setting"]: r for r in rows if r["method"].startswith("ProCache")}
    row = by.get(label)
    forecast = row.get("forecast", "reuse") if row else "reuse"
    top, bottom = by.get(budget_label("unlimited", forecast=forecast)), by.get(budget_label("minimal", forecast=forecast))
    if not (top and bottom and row) or top["psnr"] - bottom["psnr"] <= 0:
        return None
    return (row["psnr"] - bottom["psnr"]) / (top["psnr"] - bottom["psnr"])


def table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    """Markdown rows: method, setting, `columns` (header, row key; a float key is printed with 2 or 4
    decimals), the share of branch level's gain kept and the cache plan."""
    head = ["method", "setting", *[h for h, _ in columns], "branch-level gain kept", "cache plan"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kept = gain_kept(rows, r["setting"]) if r["method"].startswith("ProCache") else None
        cells = [r["method"], r["setting"]]
        for header, key in columns:
            first = r["method"] == "full compute" and key in ("psnr", "rel")
            cells.append("—" if first else f"{r[key]:.4f}" if key == "rel" else
                         f"{r[key]:.2f}×" if key in ("flops", "compute") else f"{r[key]:.2f}" if key == "psnr" else
                         f"{r[key]:.3f}")
        cells.append("—" if kept is None else format(kept, ".0%"))
        plan = r["plan"]
        cells.append("—" if not plan else plan["granularity"] + ", " + format_bytes(plan["bytes"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def reference_table(rows: list[dict], steps: int) -> list[str]:
    return table(f"Reference DiT, {steps} steps", rows,
                 [("FLOPs speedup", "flops"), ("PSNR vs full ↑", "psnr"), ("FD ↓", "fd")])


# ---- tiny ComfyUI models --------------------------------------------------------------------------
HW = {"pixart": 48, "flux": 32, "wan": 12}
SCHEDULE = "procache-dit-50-17full"


def comfy_rows(family: str, steps: int, precisions=("model dtype",), forecasts=("reuse",), log=print) -> list[dict]:
    import comfy_env
    import comfy_extras.nodes_easycache as easycache
    from procache_comfyui.nodes import library
    from procache_comfyui.nodes.runtime import LAST_RUNS, ApplyConfig, attach
    from .comfy_bench import BlockCounter, latent_error

    schedule = library.load(SCHEDULE)
    schedule = schedule.resampled(steps) if schedule.steps != steps else schedule
    base = comfy_env.make_patcher(family, size="bench" if family == "flux" else "tiny")
    rows, full = [], {}

    def run(patcher, n_steps=steps):
        counter = BlockCounter(base)
        try:
            out = comfy_env.sample(patcher, family, steps=n_steps, hw=HW[family])
        finally:
            counter.remove()
        return out, counter.calls

    def add(method, setting, out, compute, plan=None, forecast="reuse"):
        rel, psnr = latent_error(out, full["out"]) if full else (0.0, math.inf)
        rows.append({"method": method, "setting": setting, "compute": compute, "rel": rel, "psnr": psnr, "plan": plan,
                     "forecast": forecast})
        log(f"  {family:6} {steps:2} steps  {method:<30} {setting:<22} {compute:5.2f}x  rel L2 {rel:.4f}  "
            f"psnr {psnr:6.2f}  {plan['text'] if plan else ''}")

    out, calls = run(base)
    full.update(out=out, calls=calls)
    add("full compute", f"{steps} steps", out, 1.0)
    for name, precision, forecast in budget_rows(forecasts, precisions):
        out, _ = run(attach(base, ApplyConfig(schedule=schedule, budget=budget_of(name), cache_precision=precision,
                                              forecaster=FORECASTS[forecast][1]())))
        latest = LAST_RUNS.latest()
        add("ProCache + selective", budget_label(name, precision, forecast), out, latest["flops_speedup"],
            latest["plan"], forecast)
    target = rows[1]["compute"]
    fewer = max(1, round(steps / target))
    out, calls = run(base, fewer)
    add("fewer steps (equal FLOPs)", f"{fewer} steps", out, full["calls"] / max(calls, 1))

    def lazy(threshold):
        patched = easycache.LazyCacheNode.execute(base, threshold, 0.15, 0.95, False).result[0]
        out, calls = run(patched)
        return full["calls"] / max(calls, 1), out
    # LazyCache's threshold whose block work matches the ProCache row's
    threshold, compute, out = calibrate_threshold(lazy, target, low=1e-3, high=3.0)
    add("LazyCache (ComfyUI)", f"threshold {threshold:.3g}", out, compute)
    return rows


# ---- the second reference model (a trained tiny Flux in ComfyUI's own class) --------------------
def reference_flux_rows(samples: int, steps: int, precisions=("model dtype",), forecasts=("reuse",),
                        sampler: str = "euler", log=print) -> list[dict]:
    from procache_comfyui.nodes import library
    from procache_comfyui.nodes.runtime import LAST_RUNS, ApplyConfig, attach
    from .reference_flux_bench import SCHEDULE as FLUX_SCHEDULE, FluxBench

    bench = FluxBench(samples)
    schedule = library.load(FLUX_SCHEDULE)
    schedule = schedule.resampled(steps) if schedule.steps != steps else schedule
    rows = []
    full = bench.measure(None, steps, sampler)

    def add(method, setting, result, flops, forecast="reuse", plan=None):
        row = {"method": method, "setting": setting, "flops": flops, "plan": plan, "forecast": forecast}
        row.update(bench.score(result, None if method == "full compute" else full))
        rows.append(row)
        row.setdefault("psnr", math.inf)
        log(f"  flux {steps:>3} steps  {method:<26} {setting:<48} flops {flops:5.2f}x  psnr {row['psnr']:6.2f}  "
            f"fd {row['fd']:7.3f}  {plan['text'] if plan else ''}")

    def procache(name, precision, forecast, check=False):
        config = ApplyConfig(schedule=schedule, budget=budget_of(name), cache_precision=precision,
                             forecaster=FORECASTS[forecast][1](), check_model_level=check)
        result = bench.measure(attach(bench.patcher, config), steps, sampler)
        label = budget_label(name, precision, forecast) + (", model-level check" if check else "")
        add("ProCache + selective", label, result, result.flops_speedup, forecast, LAST_RUNS.latest()["plan"])

    add("full compute", f"{sampler} {steps}", full, 1.0)
    for name, precision, forecast in budget_rows(forecasts, precisions):
        procache(name, precision, forecast)
    for forecast in forecasts:
        for name in CHECKED_BUDGETS:
            procache(name, DEFAULT_PRECISION, forecast, check=True)
    target = rows[1]["flops"]
    fewer = max(1, round(steps / target))
    add("fewer steps (equal FLOPs)", f"{sampler} {fewer}", bench.measure(None, fewer, sampler), steps / fewer)
    threshold = bench.lazycache_threshold(steps, sampler, target)
    result = bench.measure(bench.lazycache(threshold), steps, sampler)
    add("LazyCache (ComfyUI)", f"threshold {threshold:.3g}", result, full.block_calls / max(result.block_calls, 1))
    return rows


def reference_flux_table(rows: list[dict], steps: int) -> list[str]:
    return table(f"Reference Flux (trained, 256 tokens, euler), {steps} steps", rows,
                 [("FLOPs speedup", "flops"), ("PSNR vs full ↑", "psnr"), ("FD ↓", "fd")])


def comfy_table(family: str, steps: int, rows: list[dict]) -> list[str]:
    return table(f"{family} (tiny, random weights), {steps} steps", rows,
                 [("compute speedup", "compute"), ("rel. L2 vs full ↓", "rel"), ("PSNR vs full ↑", "psnr")])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=100, help="reference DiT images per row")
    parser.add_argument("--steps", default="50,20")
    parser.add_argument("--comfyui", default=None, help="a ComfyUI checkout: also bench its tiny models")
    parser.add_argument("--families", default="flux,wan,pixart")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference DiT")
    parser.add_argument("--flux-samples", type=int, default=20,
                        help="images per row of the reference Flux (with --comfyui; 0 skips it)")
    parser.add_argument("--precisions", default="model dtype,8-bit when needed",
                        help="cache_precision settings of the budget rows (memory.PRECISIONS), comma-separated")
    parser.add_argument("--forecasts", default="reuse,taylor1",
                        help=f"forecasts of the budget rows ({', '.join(FORECASTS)}), comma-separated")
    add_out_option(parser, optional=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    lines = []
    steps_list = [int(s) for s in args.steps.split(",")]
    precisions = [p.strip() for p in args.precisions.split(",")]
    forecasts = [f.strip() for f in args.forecasts.split(",")]
    if not args.no_reference:
        for steps in steps_list:
            lines += reference_table(reference_rows(args.samples, steps, precisions, forecasts), steps)
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = os.path.abspath(os.path.expanduser(args.comfyui))
        import comfy_env
        comfy_env.load_comfy()
        comfy_env.load_pack()
        for steps in steps_list if args.flux_samples else ():
            lines += reference_flux_table(reference_flux_rows(args.flux_samples, steps, precisions, forecasts), steps)
        for steps in steps_list if args.families else ():
            for family in args.families.split(","):
                lines += comfy_table(family, steps, comfy_rows(family, steps, precisions, forecasts))
    command = "python -m benchmarks.memory_quality " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = [f"Quality per memory budget at matched FLOPs; `{command.strip()}` "
              f"({(time.perf_counter() - started) / 60:.1f} min, one thread).", ""]
    text = "\n".join(header + lines)
    print(text)
    if args.out:
        with open(report_path(args.out, "memory_quality.md"), "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
