"""Every caching method side by side inside a real ComfyUI, with ComfyUI's own EasyCache and
LazyCache nodes as peers, on small PixArt, Flux and Wan models built from ComfyUI's own classes.

    python benchmarks/comfy_bench.py --comfyui ~/comfy/ComfyUI        # or COMFYUI_PATH=...
    python benchmarks/comfy_bench.py --quick                          # one family, 20 steps, seconds

Each family samples one seed with ComfyUI's sampler (euler, simple scheduler, CFG 2) by every
method in one process: full compute, fewer steps at the FLOPs of the ProCache schedule, FORA every
2 and 3 steps, the ProCache schedule alone and with selective steps, EasyCache and LazyCache at
their defaults. Columns: compute speedup, wall speedup, and the final latent's error against full
compute (relative L2 and PSNR over the full latent's range). Any Spectrum ComfyUI port installed in the
ComfyUI's custom-node folders (or in `--custom-nodes DIR`) adds a peer row: its MODEL patch node at its
declared defaults (benchmarks/comfy_ports.py), with a note saying whether it changed the base model in
place; a port that fails to apply or sample gets a row saying why.

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
    parser.add_argument("--custom-nodes", action="append", default=[], metavar="DIR",
                        help="an extra custom-nodes folder searched for an installed Spectrum port (repeatable)")
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


def make_base(family: str):
    import comfy_env
    return comfy_env.make_patcher(family, size="bench" if family == "flux" else "tiny")


def timed_sample(patcher, family: str, steps: int) -> tuple[torch.Tensor, float, int]:
    """(final latent, wall seconds, transformer block calls) of one sampling run."""
    import comfy_env
    counter = BlockCounter(patcher)
    started = time.perf_counter()
    try:
        out = comfy_env.sample(patcher, family, steps=steps, hw=HW[family])
    finally:
        counter.remove()
    return out, time.perf_counter() - started, counter.calls


def bench_family(family: str, steps: int, ports=(), log=print) -> list[dict]:
    import comfy_env
    from procache_comfyui.nodes.runtime import LAST_RUNS

    base = make_base(family)
    comfy_env.sample(base, family, steps=2, hw=HW[family])      # warm-up: first-call costs stay out of the table
    rows, full = [], None
    for name, patch, n_steps, counted in methods(steps):
        out, wall, calls = timed_sample(patch(base) if patch else base, family, n_steps)
        if full is None:
            full = {"out": out, "wall": wall, "blocks": calls}
        if counted == "stats":
            compute = LAST_RUNS.latest()["flops_speedup"]
        else:
            compute = full["blocks"] / max(calls, 1)
        rows.append(_row(name, compute, full["wall"] / wall, out, full["out"]))
    rows += [port_row(port, family, steps, full) for port in ports]
    for row in rows:
        log(f"  {family:6} {steps:2} steps  {row['method']:32} {_cell(row['compute'], '5.2f', 'x')} compute "
            f"{_cell(row['wall'], '5.2f', 'x')} wall rel L2 {_cell(row['rel'], '.4f')} PSNR {_cell(row['psnr'], '6.2f')}"
            + (f"  ({row['note']})" if row["note"] else ""))
    return rows


def _row(method: str, compute, wall, out, reference, note: str = "") -> dict:
    rel, psnr = latent_error(out, reference) if out is not None else (None, None)
    return {"method": method, "compute": compute, "wall": wall, "rel": rel, "psnr": psnr, "note": note}


def _cell(value, spec: str, unit: str = "") -> str:
    return "—" if value is None else format(value, spec) + unit


def port_row(port, family: str, steps: int, full: dict) -> dict:
    """An installed port's row: its patch node at its defaults on a fresh copy of the base model
    (same weights), then full compute of that base model again: a port that changes its input
    model in place moves that second result away from the first full compute."""
    from benchmarks import comfy_ports

    base = make_base(family)
    out, compute, wall, notes, stage = None, None, None, [], "applying"
    try:
        patched = comfy_ports.apply(port, base, steps)
        stage = "sampling"
        out, seconds, calls = timed_sample(patched, family, steps)
        compute, wall = (full["blocks"] / calls if calls else None), full["wall"] / seconds
        if not calls:
            notes.append("no transformer block call seen")
    except Exception as error:      # a peer that does not fit this model is a row, not a crash
        notes.append(f"{stage} failed: {comfy_ports.short_reason(error)}")
    notes.append(_in_place_note(base, family, steps, full["out"]))
    return _row(port.label, compute, wall, out, full["out"], "; ".join(notes))


def _in_place_note(base, family: str, steps: int, full_out: torch.Tensor) -> str:
    import comfy_env
    from benchmarks import comfy_ports
    try:
        again = comfy_env.sample(base, family, steps=steps, hw=HW[family])
    except Exception as error:
        return "the base model no longer samples after the port's run: " + comfy_ports.short_reason(error)
    if torch.equal(again, full_out):
        return "base model unchanged by the port"
    return f"changes the base model in place (its full compute afterwards moved by rel. L2 {latent_error(again, full_out)[0]:.3g})"


def table(family: str, steps: int, rows: list[dict]) -> list[str]:
    notes = any(r["note"] for r in rows)
    lines = [f"**{family}, {steps} steps**", "",
             "| method | compute speedup | wall speedup | rel. L2 vs full ↓ | PSNR vs full ↑ |" + (" note |" if notes else ""),
             "|---|---|---|---|---|" + ("---|" if notes else "")]
    for r in rows:
        full = r["method"] == "full compute"
        speed = [_cell(r[k], ".2f", "×") for k in ("compute", "wall")]
        error = ["—" if full else _cell(r["rel"], ".4f"), "—" if full else _cell(r["psnr"], ".2f")]
        lines.append("| " + " | ".join([r["method"], *speed, *error] + ([r["note"]] if notes else [])) + " |")
    return lines + [""]


def find_ports(extra_paths=()) -> tuple[str, list]:
    """(one line for the report, the installed Spectrum ports' patch nodes)."""
    from benchmarks import comfy_ports
    for path in extra_paths:
        comfy_ports.add_custom_nodes_path(path)
    ports, problems = comfy_ports.discover()
    where = ", ".join(comfy_ports.custom_nodes_paths())
    if ports:
        line = ("Installed Spectrum ports, each a peer row at its node's declared defaults (its `steps` set to the "
                "run's): " + ", ".join(f"{p.folder} (node {p.node_id})" for p in ports) + ".")
    else:
        line = f"No Spectrum ComfyUI port installed in {where}: no port row."
    if problems:
        line += " Not benchmarked: " + "; ".join(problems) + "."
    print(line)
    return line, ports


def main(argv=None):
    args = parse_args(argv)
    os.environ["COMFYUI_PATH"] = os.path.abspath(os.path.expanduser(args.comfyui))
    torch.set_num_threads(args.threads)
    import comfy_env
    version = comfy_env.load_comfy()
    comfy_env.load_pack()
    ports_line, ports = find_ports(args.custom_nodes)
    started = time.perf_counter()
    lines = []
    for steps in (int(s) for s in args.steps.split(",")):
        for family in args.families.split(","):
            lines += table(family, steps, bench_family(family, steps, ports))
    command = "python benchmarks/comfy_bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = [f"Caching methods inside ComfyUI {version} (tiny models from ComfyUI's own classes, random weights, "
              f"euler, CFG 2, seed 0, {args.threads} thread(s)); `{command.strip()}` "
              f"({(time.perf_counter() - started) / 60:.1f} min).", "",
              "Random weights: the error columns say how far a method moves the result from full compute, "
              "not image quality. EasyCache and LazyCache run at their node defaults (threshold 0.2, from "
              "15 % to 95 % of the run). " + WALL_NOTE, "", ports_line, ""]
    path = report_path(args.out, "comfy_bench.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(header + lines))
    print("\n".join(header + lines))
    print(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
