"""What caching does to an image, side by side, on the pack's trained reference DiT:

    python benchmarks/before_after.py                   # writes benchmarks/out/before_after.png
    python benchmarks/before_after.py --out docs         # the README's picture

Rows, same labels and noise: full compute (DDIM 50), ProCache with the bundled 17-of-50 schedule and
its selective steps, and fewer steps at the same block work (DDIM 17), each labelled with its PSNR
against full compute; then both differences from full compute, ten times brighter.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.demo import CFG_SCALE, SCHEDULE, SELECTIVE, load_model, psnr  # noqa: E402
from benchmarks.output import add_out_option, report_path  # noqa: E402
from procache_core import Schedule, SchedulePolicy  # noqa: E402
from procache_core.reference.sampling import sample  # noqa: E402

STEPS = 50
SCALE = 8            # each 16x16 digit drawn 8x larger
LABEL_WIDTH = 230


def rows(labels: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    model, _ = load_model()
    with open(SCHEDULE, encoding="utf-8") as f:
        schedule = Schedule.from_json(f.read())
    full = sample(model, labels, STEPS, CFG_SCALE, seed=0)
    cached, run = sample(model, labels, STEPS, CFG_SCALE, seed=0, policy=SchedulePolicy(schedule),
                         selector=SELECTIVE, return_run=True)
    fewer_steps = round(STEPS / run.stats.flops_speedup)
    fewer = sample(model, labels, fewer_steps, CFG_SCALE, seed=0)
    # differences from full compute, 10x brighter, drawn on the same -1..1 scale (black: no change)
    difference = lambda images: ((images - full).abs() * 10 * 2 - 1).clamp(-1, 1)  # noqa: E731
    return [(f"full compute, DDIM {STEPS}", full),
            (f"ProCache, {run.stats.flops_speedup:.2f}x fewer FLOPs, {psnr(cached, full):.1f} dB", cached),
            (f"fewer steps, DDIM {fewer_steps}, {psnr(fewer, full):.1f} dB", fewer),
            ("ProCache - full, x10", difference(cached)),
            (f"DDIM {fewer_steps} - full, x10", difference(fewer))]


def picture(named: list[tuple[str, torch.Tensor]]) -> Image.Image:
    count, size = named[0][1].shape[0], named[0][1].shape[-1] * SCALE
    sheet = Image.new("L", (LABEL_WIDTH + count * (size + 4), len(named) * (size + 4)), 255)
    draw = ImageDraw.Draw(sheet)
    for r, (name, images) in enumerate(named):
        y = r * (size + 4)
        draw.text((8, y + size // 2 - 6), name, fill=0)
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
        for i, digit in enumerate(pixels):
            tile = Image.fromarray(digit.numpy(), mode="L").resize((size, size), Image.NEAREST)
            sheet.paste(tile, (LABEL_WIDTH + i * (size + 4), y))
    return sheet


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out_option(parser)
    parser.add_argument("--digits", type=int, default=10, help="how many labels (0, 1, 2, ...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    named = rows(torch.arange(args.digits) % 10)
    path = report_path(args.out, "before_after.png")
    picture(named).save(path)
    for name, _ in named:
        print(name)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
