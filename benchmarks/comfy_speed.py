"""Wall-clock speed of ProCache inside a real ComfyUI, on a small Flux built from ComfyUI's own classes.

    python benchmarks/comfy_speed.py --comfyui ~/comfy/ComfyUI            # or COMFYUI_PATH=...
    python benchmarks/comfy_speed.py --repeats 5 --threads 2
    python benchmarks/comfy_speed.py --quick                              # a smoke run: small model, 10 steps

Samples with ComfyUI's own sampler (comfy.sample.sample, euler, 50 steps, the simple scheduler) three
ways: the unpatched model, the model after ProCache Apply with an all-full schedule (what the
wrappers and taps cost on their own), and after ProCache Apply with the paper's 17-of-50 DiT pattern
(schedules/procache-dit-50-17full.json, Apply's default selective settings). The three run
interleaved, in a rotating order, `--repeats` times in one process; the figures are medians, and the
speedups are medians of the per-repeat ratios (each measured next to its baseline, so load from
other processes on a shared machine hits both sides alike). Random weights: the images mean
nothing, only the time and the work do.

The model: Flux (double + single stream blocks) with a 64x64 latent, patch 2, so 1024 image tokens;
width 512 and 3 + 6 blocks by default, wide enough that block compute dominates a step. Writes comfy_speed.md to benchmarks/out/
(`--out benchmarks/results` updates the figures the README quotes).
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)     # run as a script: procache_core and the ComfyUI loader of the tests

import torch  # noqa: E402

from benchmarks.output import add_out_option, report_path  # noqa: E402

SCHEDULE = "procache-dit-50-17full.json"
VARIANTS = ("unpatched", "all-full schedule", "17-of-50 schedule")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"),
                        help="a ComfyUI checkout (default: $COMFYUI_PATH)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the three runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (the schedule is resampled to them)")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="simple")
    parser.add_argument("--cfg", type=float, default=1.0,
                        help="CFG scale; Flux is guidance-distilled, 1.0 runs one model call per step")
    parser.add_argument("--latent", type=int, default=64, help="latent height and width (patch 2: (latent/2)^2 tokens)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--double", type=int, default=3, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=6, help="single-stream blocks")
    parser.add_argument("--schedule", default=SCHEDULE, help="a file in schedules/ or a path")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 steps, a 32x32 latent, width 128")
    add_out_option(parser, optional=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.latent, args.hidden, args.heads, args.double, args.single = 10, 32, 128, 2, 1, 2
    if not args.comfyui:
        parser.error("give --comfyui PATH or set COMFYUI_PATH")
    return args


def build_flux(args):
    """A Flux ModelPatcher from ComfyUI's own classes, random weights (the tests' recipe, wider)."""
    import comfy.model_patcher
    import comfy_env

    head = args.hidden // args.heads
    if head * args.heads != args.hidden or head % 16:
        raise SystemExit(f"--hidden {args.hidden} / --heads {args.heads} must give a head width divisible by 16")
    cls, unet_config = comfy_env.tiny_config("flux", "bench")
    side = 3 * head // 8      # rotary axes (index, height, width) add up to the head width: 64 -> 16, 24, 24
    unet_config.update(hidden_size=args.hidden, num_heads=args.heads, depth=args.double,
                       depth_single_blocks=args.single, axes_dim=[head - 2 * side, side, side])
    cfg = cls(unet_config)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    comfy_env._fill(model, 0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def load_schedule(core, name_or_path: str, steps: int):
    path = name_or_path if os.path.exists(name_or_path) else os.path.join(ROOT, "schedules", name_or_path)
    with open(path, encoding="utf-8") as f:
        schedule = core.Schedule.from_json(f.read(), where=path)
    return schedule if schedule.steps == steps else schedule.resampled(steps)


def run_benchmark(args, log=print) -> dict:
    os.environ["COMFYUI_PATH"] = os.path.expanduser(args.comfyui)
    import comfy_env

    version = comfy_env.load_comfy()
    comfy_env.load_pack()
    runtime = importlib.import_module(comfy_env.PACK_MODULE + ".nodes.runtime")
    core = importlib.import_module(comfy_env.PACK_MODULE + ".procache_core")
    selector_node = importlib.import_module(comfy_env.PACK_MODULE + ".nodes.selector_node")
    import comfy.sample

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        patcher = build_flux(args)
        schedule = load_schedule(core, args.schedule, args.steps)
        all_full = core.parse_pattern("1" * args.steps, name="all-full")
        defaults = selector_node.SelectorConfig(core.TokenSelector(), 0.25)    # what Apply uses without a selector
        models = {
            "unpatched": patcher,
            "all-full schedule": runtime.attach(patcher, runtime.ApplyConfig(
                schedule=all_full, selector=defaults.tokens, deep_fraction=defaults.deep_fraction)),
            "17-of-50 schedule": runtime.attach(patcher, runtime.ApplyConfig(
                schedule=schedule, selector=defaults.tokens, deep_fraction=defaults.deep_fraction)),
        }
        latent, positive, negative = comfy_env.latent_and_conds("flux", hw=args.latent)
        noise = comfy.sample.prepare_noise(latent, 0)
        tokens = (args.latent // 2) ** 2

        def sample(model, steps):
            runtime.LAST_RUNS.publish({})       # so a run without ProCache reads as no statistics
            wall, cpu = time.perf_counter(), time.process_time()
            out = comfy.sample.sample(model, noise, steps, args.cfg, args.sampler, args.scheduler, positive,
                                      negative, latent, seed=0, disable_pbar=True)
            return out, time.perf_counter() - wall, time.process_time() - cpu, runtime.LAST_RUNS.latest() or {}

        log(f"ComfyUI {version}, torch {torch.__version__}, {args.threads} thread(s); Flux width {args.hidden}, "
            f"{args.double} double + {args.single} single blocks, {tokens} image tokens; {args.sampler} "
            f"{args.steps} steps, cfg {args.cfg}; schedule {schedule.name} {schedule.pattern} "
            f"(theoretical {schedule.theoretical_speedup():.2f}x)")
        for name in VARIANTS:           # warm-up: first-call allocations and lazy imports
            sample(models[name], 2)

        walls = {n: [] for n in VARIANTS}
        cpus = {n: [] for n in VARIANTS}
        outputs, summaries = {}, {}
        for r in range(args.repeats):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]       # rotate, so no variant always runs first
            for name in order:
                outputs[name], wall, cpu, summaries[name] = sample(models[name], args.steps)
                walls[name].append(wall)
                cpus[name].append(cpu)
                log(f"  repeat {r + 1}/{args.repeats}  {name:<18} wall {wall:7.2f} s  cpu {cpu:7.2f} s")
    finally:
        torch.set_num_threads(threads)

    base = outputs["unpatched"]
    rows = {}
    for name in VARIANTS:
        stats = summaries[name]
        rows[name] = {
            "wall": statistics.median(walls[name]),
            "cpu": statistics.median(cpus[name]),
            # per-repeat ratios: each cached run against the unpatched run of the same repeat
            "wall_speedup": statistics.median(b / w for b, w in zip(walls["unpatched"], walls[name])),
            "cpu_speedup": statistics.median(b / c for b, c in zip(cpus["unpatched"], cpus[name])),
            "flops_speedup": stats.get("flops_speedup", 1.0),
            "counts": stats.get("counts"),
            "max_abs": float((outputs[name] - base).abs().max()),
            "walls": walls[name],
        }
    overhead = 1 / rows["all-full schedule"]["wall_speedup"] - 1
    return {"args": args, "version": version, "schedule": schedule, "tokens": tokens, "rows": rows,
            "all_full_overhead": overhead, "theoretical": schedule.theoretical_speedup(),
            "torch": torch.__version__}


def table(result) -> list[str]:
    lines = ["| run | wall s (median) | wall speedup | CPU-time speedup | block FLOPs speedup | full / selective / reuse "
             "| max abs diff vs unpatched | wall s per repeat |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        counts = row["counts"]
        kinds = f"{counts['full']} / {counts['selective']} / {counts['reuse']}" if counts else "-"
        lines.append(f"| {name} | {row['wall']:.2f} | {row['wall_speedup']:.3f}x | {row['cpu_speedup']:.3f}x "
                     f"| {row['flops_speedup']:.2f}x | {kinds} | {row['max_abs']:.3g} "
                     f"| {', '.join(f'{w:.2f}' for w in row['walls'])} |")
    return lines


def report(result, command: str) -> str:
    args, schedule = result["args"], result["schedule"]
    cached = result["rows"]["17-of-50 schedule"]
    return "\n".join([
        "# ProCache in a real ComfyUI: wall speed on a small Flux",
        "",
        "```",
        command,
        "```",
        "",
        f"ComfyUI {result['version']}, torch {result['torch']}, {platform.machine()} CPU, "
        f"{args.threads} torch thread(s). Flux from ComfyUI's classes with random weights: width {args.hidden}, "
        f"{args.heads} heads, {args.double} double + {args.single} single blocks, {args.latent}x{args.latent} latent "
        f"(patch 2: {result['tokens']} image tokens). ComfyUI's sampler: {args.sampler}, {args.scheduler} scheduler, "
        f"{args.steps} steps, cfg {args.cfg}. Schedule `{schedule.name}` ({schedule.pattern}), theoretical speedup "
        f"{result['theoretical']:.2f}x; Apply's default selective settings.",
        "",
        f"The three runs are interleaved in a rotating order, {args.repeats} repeats in one process; wall and CPU "
        "times are medians, speedups are medians of per-repeat ratios against the unpatched run.",
        "",
        *table(result),
        "",
        f"- 17-of-50 pattern: wall speedup **{cached['wall_speedup']:.2f}x** (theoretical "
        f"{result['theoretical']:.2f}x, counted block FLOPs {cached['flops_speedup']:.2f}x).",
        f"- All-full schedule over the unpatched model: **{100 * result['all_full_overhead']:+.1f} %** wall "
        f"(its output differs from the unpatched one by {result['rows']['all-full schedule']['max_abs']:.3g}).",
        "",
    ])


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run_benchmark(args, log=lambda line: print(line, file=sys.stderr, flush=True))
    print()
    print("\n".join(table(result)))
    cached = result["rows"]["17-of-50 schedule"]
    print(f"\n17-of-50 wall speedup {cached['wall_speedup']:.2f}x (target >= 2.4x, theoretical "
          f"{result['theoretical']:.2f}x, block FLOPs {cached['flops_speedup']:.2f}x); all-full overhead "
          f"{100 * result['all_full_overhead']:+.1f} % (target <= 3 %)")
    if args.out:
        command = "python benchmarks/comfy_speed.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        path = report_path(args.out, "comfy_speed.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(report(result, command.strip()))
        print(f"wrote {os.path.relpath(path)}")
    return result


if __name__ == "__main__":
    main()
