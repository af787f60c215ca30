"""What the 8-bit cache store costs in accuracy: round-trip error of int8 and fp8 (e4m3) codes with a
float32 scale per token, and what that does to the reference DiT's images.

    python benchmarks/cache_quantize.py                   # a minute or two on a laptop CPU

Round trips (bf16 values, relative L2 error |decoded - value| / |value|, and the worst token's):
normal activations; normal activations with 1 % of channels 20 times larger in every token (the
outlier channels of large transformers, the hard case for one scale per token); the pre-gate
attention and MLP outputs of the trained reference DiT over a whole sampling run.

Images: the reference DiT sampled with the paper's 17-of-50 schedule (reuse only, and with
selective steps) through the engine with an exact, an int8 and an fp8 cache; PSNR against full
compute. Writes cache_quantize.md into benchmarks/out/ (`--out benchmarks/results` updates the tracked copy).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)         # run as a script: procache_core and benchmarks

import torch  # noqa: E402

from benchmarks.output import add_out_option, report_path  # noqa: E402

from benchmarks.demo import CFG_SCALE, SCHEDULE, SELECTIVE, REUSE_ONLY, load_model, psnr  # noqa: E402
from procache_core import CacheStore, Schedule, SchedulePolicy, engine  # noqa: E402
from procache_core.reference.sampling import sample  # noqa: E402

FORMATS = ("int8", "fp8")


def round_trip_errors(value: torch.Tensor, quantize: str) -> tuple[float, float]:
    """(relative error of the whole tensor, of the worst token) after a put and a get."""
    store = CacheStore(quantize=quantize)
    store.put(("cond",), "value", value)
    diff = (store.get(("cond",), "value").double() - value.double())
    whole = float(diff.norm() / value.double().norm())
    tokens = diff.norm(dim=-1) / value.double().norm(dim=-1).clamp(min=1e-30)
    return whole, float(tokens.max())


def activations(model, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(2, 1024, 1536, generator=gen)
    outliers = normal.clone()
    outliers[..., torch.randperm(1536, generator=gen)[:15]] *= 20.0
    branch = {"attn": [], "mlp": []}
    hooks = [getattr(b, name).register_forward_hook(lambda m, i, o, name=name: branch[name].append(o))
             for b in model.blocks for name in branch]
    with torch.no_grad():
        sample(model, torch.arange(10) % model.cfg.classes, steps=50, cfg=CFG_SCALE, seed=seed)
    for hook in hooks:
        hook.remove()
    values = {"normal [2, 1024, 1536]": normal, "normal, 1 % outlier channels x20": outliers}
    values.update({f"reference DiT {name} outputs, 50 steps": torch.cat(v) for name, v in branch.items()})
    return {name: v.to(torch.bfloat16) for name, v in values.items()}


@contextlib.contextmanager
def engine_caches(quantize: str | None):
    """Runs of the engine keep their cache in `quantize` codes (patched here: Apply does not offer
    the choice yet)."""
    original = engine.CacheStore
    engine.CacheStore = lambda device=None: original(device, quantize=quantize)
    try:
        yield
    finally:
        engine.CacheStore = original


def image_psnr(model, samples: int, seed: int) -> dict[tuple[str, str], float]:
    with open(SCHEDULE, encoding="utf-8") as f:
        schedule = Schedule.from_json(f.read(), where=SCHEDULE)
    labels = torch.arange(samples) % model.cfg.classes
    with torch.no_grad():
        reference = sample(model, labels, schedule.steps, CFG_SCALE, seed)
        out = {}
        for selector_name, selector in (("reuse only", REUSE_ONLY), ("+ selective", SELECTIVE)):
            for quantize in (None, *FORMATS):
                with engine_caches(quantize):
                    images = sample(model, labels, schedule.steps, CFG_SCALE, seed,
                                    policy=SchedulePolicy(schedule), selector=selector)
                out[(selector_name, quantize or "exact")] = psnr(images, reference)
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=50, help="images per sampling run")
    parser.add_argument("--seed", type=int, default=0)
    add_out_option(parser, optional=True)
    args = parser.parse_args(argv)
    model, what = load_model()
    lines = [f"# 8-bit cache store: measured error ({what}; torch {torch.__version__}, CPU)", "",
             "Round trip of bf16 values through CacheStore(quantize=...): relative L2 error, whole tensor / worst token.",
             "", "| values | int8 | fp8 e4m3 |", "|---|---|---|"]
    for name, value in activations(model, args.seed).items():
        cells = [" / ".join(f"{100 * e:.2f} %" for e in round_trip_errors(value, q)) for q in FORMATS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", f"Images of the reference DiT, 17-of-50 schedule, DDIM 50 steps, CFG {CFG_SCALE}, {args.samples} "
              "images: PSNR (dB) against full compute.", "", "| schedule | exact cache | int8 | fp8 |", "|---|---|---|---|"]
    table = image_psnr(model, args.samples, args.seed)
    for selector_name in ("reuse only", "+ selective"):
        lines.append(f"| ProCache {selector_name} | " + " | ".join(
            f"{table[(selector_name, q)]:.2f}" for q in ("exact", *FORMATS)) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(report_path(args.out, "cache_quantize.md"), "w", encoding="utf-8") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
