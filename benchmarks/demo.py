"""ProCache on the pack's reference DiT, no ComfyUI needed:

    pip install torch safetensors
    python benchmarks/demo.py                 # 50 DDIM steps, the bundled 17-of-50 schedule
    python benchmarks/demo.py --steps 20      # the schedule resampled to 20 steps

Samples the same labels from the same noise four ways: full compute (no engine), the engine with an
all-full schedule (must give the identical image), the bundled ProCache DiT schedule with its
selective steps as plain reuse, and the schedule as the method runs it (selective steps recompute
the top tokens' MLP in the deepest 25 % of blocks). Prints wall speedup (median of interleaved
repeats, measured side by side in this run), block FLOPs speedup (the engine's RunStats) and the
difference from the full-compute result (max abs, mean PSNR).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)     # run as a script from a fresh clone: `procache_core` sits at the root

import torch  # noqa: E402

from procache_core import Schedule, SchedulePolicy, StepKind, TokenSelector  # noqa: E402
from procache_core.reference.dit import DiT, DiTConfig  # noqa: E402
from procache_core.reference.sampling import sample  # noqa: E402

SCHEDULE = os.path.join(ROOT, "schedules", "procache-dit-50-17full.json")
CFG_SCALE = 1.5

# Selective steps as the reference benchmark runs them (benchmarks/reference_bench.py): ToCa's ratio
# schedule from 7 % of tokens, ranked by attention received, with staleness and spatial bonuses.
SELECTIVE = TokenSelector(ratio=0.07, ratio_schedule="toca", modules=("mlp",), score="attention_received",
                          staleness_weight=0.25, staleness_norm=4.0, spatial_grid=2, spatial_bonus=0.6)
# ratio 0: a selective step recomputes no tokens, so it is a plain reuse step.
REUSE_ONLY = TokenSelector(ratio=0.0)


def load_model() -> tuple[DiT, str]:
    """The trained reference DiT when its weights load, else a fixed-seed untrained one."""
    try:
        from benchmarks.train_reference import load_reference
        return load_reference(), "trained reference DiT (benchmarks/weights/reference_dit_digits.safetensors)"
    except (ImportError, OSError, KeyError, RuntimeError) as err:
        torch.manual_seed(0)
        model = DiT(DiTConfig(image_size=16, channels=1, patch=4, hidden=64, depth=8, heads=4, mlp_ratio=4.0,
                              classes=10))
        model.reset_parameters(zero_gates=False)   # adaLN-Zero's zero gates would make every block the identity
        return model.eval(), f"fixed-seed untrained DiT, since the trained one did not load ({type(err).__name__}: {err})"


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-sample PSNR (dB) in [-1, 1] (peak-to-peak 2); identical images count as 100 dB."""
    mse = (images.clamp(-1, 1) - reference.clamp(-1, 1)).double().square().flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse.clamp(min=1e-300))).clamp(max=100.0).mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (the schedule is resampled to them)")
    parser.add_argument("--samples", type=int, default=50, help="images per sampling call (one batch)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats; the median is shown")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(threads)


def _demo(args) -> dict:
    model, what = load_model()
    with open(SCHEDULE, encoding="utf-8") as f:
        schedule = Schedule.from_json(f.read(), where=SCHEDULE)
    if schedule.steps != args.steps:
        schedule = schedule.resampled(args.steps)
    all_full = schedule.with_kinds([StepKind.FULL] * schedule.steps, note="all full")
    labels = torch.arange(args.samples) % model.cfg.classes

    rows = {   # name -> (policy, selector); None: the model runs without the engine
        "full compute": (None, None),
        "all-full schedule": (SchedulePolicy(all_full), REUSE_ONLY),
        "ProCache schedule, reuse only": (SchedulePolicy(schedule), REUSE_ONLY),
        "ProCache schedule + selective": (SchedulePolicy(schedule), SELECTIVE),
    }

    def run(name):
        policy, selector = rows[name]
        started = time.perf_counter()
        if policy is None:
            images, stats = sample(model, labels, args.steps, CFG_SCALE, args.seed), None
        else:
            images, engine = sample(model, labels, args.steps, CFG_SCALE, args.seed, policy=policy,
                                    selector=selector, return_run=True)
            stats = engine.stats
        return images, stats, time.perf_counter() - started

    print(f"model: {what}")
    print(f"schedule: {schedule.name}, {schedule.steps} steps, {schedule.count(StepKind.FULL)} full / "
          f"{schedule.count(StepKind.SELECTIVE)} selective / {schedule.count(StepKind.REUSE)} reuse, "
          f"theoretical speedup {schedule.theoretical_speedup():.2f}x")
    print(f"pattern:  {schedule.pattern}")
    print(f"sampling: DDIM {args.steps} steps, CFG {CFG_SCALE}, {args.samples} images, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats} interleaved repeats")

    run("full compute")   # warm-up: first-call allocations would count against the baseline
    images, stats, walls = {}, {}, {name: [] for name in rows}
    for _ in range(max(1, args.repeats)):
        for name in rows:
            images[name], stats[name], seconds = run(name)
            walls[name].append(seconds)

    base_images = images["full compute"]
    base_wall = statistics.median(walls["full compute"])
    results = {}
    print()
    print(f"{'':<32}{'wall s':>8}{'wall x':>8}{'FLOPs x':>9}{'max abs':>10}{'PSNR dB':>9}")
    for name in rows:
        wall = statistics.median(walls[name])
        flops = stats[name].flops_speedup if stats[name] is not None else 1.0
        diff = float((images[name] - base_images).abs().max())
        db = psnr(images[name], base_images)
        results[name] = {"wall_seconds": wall, "wall_speedup": base_wall / wall, "flops_speedup": flops,
                         "max_abs": diff, "psnr": db}
        print(f"{name:<32}{wall:8.3f}{base_wall / wall:7.2f}x{flops:8.2f}x{diff:10.4f}{db:9.2f}")
    print()
    print("wall x and FLOPs x: against full compute; max abs and PSNR: against the full-compute images "
          "(same labels, same noise). FLOPs count block work.")
    return {"model": what, "schedule": schedule, "rows": results}


if __name__ == "__main__":
    main()
