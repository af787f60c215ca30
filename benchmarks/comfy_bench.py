"""Every caching method side by side inside a real ComfyUI, with ComfyUI's own EasyCache and
LazyCache nodes as peers, on small PixArt, Flux and Wan models built from ComfyUI's own classes.

    python benchmarks/comfy_bench.py --comfyui ~/comfy/ComfyUI        # or COMFYUI_PATH=...
    python benchmarks/comfy_bench.py --quick                          # one family, 20 steps, seconds

Each family samples one seed with ComfyUI's sampler (euler, simple scheduler, CFG 2) by every
method in one process: full compute, fewer steps at the FLOPs of the ProCache schedule, FORA every
2 and 3 steps, the ProCache schedule alone and with selective steps, EasyCache and LazyCache at
their defaults. Columns: compute speedup, wall speedup, and the final latent's error against full
compute (relative L2 and PSNR over the full latent's range).

Compute speedup: for ProCache's rows the run statistics' block FLOPs; for EasyCache and LazyCache
(which skip the whole transformer on a cached step) the number of transformer block calls of full
compute divided by theirs. Random weights: the error figures show how far each method moves the
result, not image quality (the reference DiT benchmark, benchmarks/reference_bench.py, judges
quality on a trained model). Writes comfy_bench.md to benchmarks/out/ (`--out benchmarks/results`
updates the figures the README quotes).
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
        sys.path.insert(0, path)     # run as a script: procache_core and the ComfyUI loader of the tests

import torch  # noqa: E402

from benchmarks.output import add_out_option, report_path  # noqa: E402

SCHEDULE = "procache-dit-50-17full.json"
WALL_NOTE = ("These models are tiny (one run takes a fraction of a second), so their wall speedups are mostly "
             "fixed per-step costs and timer noise: read the compute column; benchmarks/comfy_speed.py measures "
             "wall time on a Flux large enough for block compute to dominate. Random-weight blocks also change "
             "little from step to step, which flatters every cache against fewer steps.")
HW = {"pixart": 48, "flux": 32, "wan": 12}      # latent sizes: 576, 256 and 3x36 image tokens


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI checkout")
    parser.add_argument("--families", default="pixart,flux,wan")
    parser.add_argument("--steps", default="50,20", help="step counts, comma separated")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="flux only, 20 steps")
    add_out_option(parser)
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("no ComfyUI: pass --comfyui PATH or set COMFYUI_PATH")
    if args.quick:
        args.families, args.steps = "flux", "20"
    return args


def latent_error(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(relative L2, PSNR in dB over the reference's value range)."""
    diff = (out.double() - reference.double())
    rel = float(diff.norm() / reference.double().norm().clamp_min(1e-12))
    span = float(reference.max() - reference.min()) or 1.0
    mse = float(diff.square().mean())
    return rel, (math.inf if mse == 0 else 10 * math.log10(span * span / mse))


class BlockCounter:
    """Counts transformer block calls (forward pre-hooks on every block of the model's stacks)."""

    STACKS = ("blocks", "double_blocks", "single_blocks")

    def __init__(self, patcher):
        dm = patcher.model.diffusion_model
        self.calls = 0
        self._hooks = [block.register_forward_pre_hook(self._count)
                       for name in self.STACKS for block in getattr(dm, name, [])]

    def _count(self, module, args):
        self.calls += 1

    def remove(self):
        for hook in self._hooks:
            hook.remove()


def methods(steps: int):
    """(row name, how to patch the model or None, steps to sample, how compute is counted)."""
    import comfy_extras.nodes_easycache as easycache
    from procache_comfyui.nodes import library
    from procache_comfyui.nodes.runtime import ApplyConfig, attach
    from procache_comfyui.procache_core import StepKind, uniform

    procache = library.load(SCHEDULE[:-5])
    if procache.steps != steps:
        procache = procache.resampled(steps)
    alone = procache.with_kinds([StepKind.REUSE if k == StepKind.SELECTIVE else k for k in procache.kinds],
                                note="selective steps turned into reuse")
    fewer = max(1, round(steps / alone.theoretical_speedup()))

    def schedule(s):
        return lambda mp: attach(mp, ApplyConfig(schedule=s))

    def peer(node):
        return lambda mp: node.execute(mp, 0.2, 0.15, 0.95, False).result[0]

    return [
        ("full compute", None, steps, "blocks"),
        (f"fewer steps ({fewer})", None, fewer, "blocks"),
        ("FORA N=2", schedule(uniform(steps, 2)), steps, "stats"),
        ("FORA N=3", schedule(uniform(steps, 3)), steps, "stats"),
        ("ProCache schedule", schedule(alone), steps, "stats"),
        ("ProCache schedule + selective", schedule(procache), steps, "stats"),
        ("EasyCache (ComfyUI, defaults)", peer(easycache.EasyCacheNode), steps, "blocks"),
        ("LazyCache (ComfyUI, defaults)", peer(easycache.LazyCacheNode), steps, "blocks"),
    ]


def bench_family(family: str, steps: int, log=print) -> list[dict]:
    import comfy_env
    from procache_comfyui.nodes.runtime import LAST_RUNS

    base = comfy_env.make_patcher(family, size="bench" if family == "flux" else "tiny")
    comfy_env.sample(base, family, steps=2, hw=HW[family])      # warm-up: first-call costs stay out of the table
    rows, full = [], None
    for name, patch, n_steps, counted in methods(steps):
        patcher = patch(base) if patch else base
        counter = BlockCounter(base)
        started = time.perf_counter()
        try:
            out = comfy_env.sample(patcher, family, steps=n_steps, hw=HW[family])
        finally:
            counter.remove()
        wall = time.perf_counter() - started
        if full is None:
            full = {"out": out, "wall": wall, "blocks": counter.calls}
        if counted == "stats":
            compute = LAST_RUNS.latest()["flops_speedup"]
        else:
            compute = full["blocks"] / max(counter.calls, 1)
        rel, psnr = latent_error(out, full["out"])
        row = {"method": name, "compute": compute, "wall": full["wall"] / wall, "rel": rel, "psnr": psnr}
        rows.append(row)
        log(f"  {family:6} {steps:2} steps  {name:32} {compute:5.2f}x compute {row['wall']:5.2f}x wall "
            f"rel L2 {rel:.4f} PSNR {psnr:6.2f}")
    return rows


def table(family: str, steps: int, rows: list[dict]) -> list[str]:
    lines = [f"**{family}, {steps} steps**", "",
             "| method | compute speedup | wall speedup | rel. L2 vs full ↓ | PSNR vs full ↑ |", "|---|---|---|---|---|"]
    for r in rows:
        psnr = "—" if r["method"] == "full compute" else f"{r['psnr']:.2f}"
        rel = "—" if r["method"] == "full compute" else f"{r['rel']:.4f}"
        lines.append(f"| {r['method']} | {r['compute']:.2f}× | {r['wall']:.2f}× | {rel} | {psnr} |")
    return lines + [""]


def main(argv=None):
    args = parse_args(argv)
    os.environ["COMFYUI_PATH"] = os.path.abspath(os.path.expanduser(args.comfyui))
    torch.set_num_threads(args.threads)
    import comfy_env
    version = comfy_env.load_comfy()
    comfy_env.load_pack()
    started = time.perf_counter()
    lines = []
    for steps in (int(s) for s in args.steps.split(",")):
        for family in args.families.split(","):
            lines += table(family, steps, bench_family(family, steps))
    command = "python benchmarks/comfy_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = [f"Caching methods inside ComfyUI {version} (tiny models from ComfyUI's own classes, random weights, "
              f"euler, CFG 2, seed 0, {args.threads} thread(s)); `{command.strip()}` "
              f"({(time.perf_counter() - started) / 60:.1f} min).", "",
              "Random weights: the error columns say how far a method moves the result from full compute, "
              "not image quality. EasyCache and LazyCache run at their node defaults (threshold 0.2, from "
              "15 % to 95 % of the run). " + WALL_NOTE, ""]
    path = report_path(args.out, "comfy_bench.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(header + lines))
    print("\n".join(header + lines))
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
