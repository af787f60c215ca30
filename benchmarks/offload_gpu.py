"""What a cached step costs when the cache lives on the GPU, in pinned host memory with prefetch,
and in host memory without it (ProCache Apply's `cache_on_cpu`), on real-size blocks.

    python benchmarks/offload_gpu.py                      # needs a CUDA GPU; about a minute on an H100
    python benchmarks/offload_gpu.py --blocks 4 --repeats 7 --models flux-double,wan-14b
    python benchmarks/offload_gpu.py --cpu-smoke          # tiny sizes on the CPU: checks the script only

Blocks are built at the real widths with random weights (bf16): a FLUX.1 double-stream and a
single-stream block (hidden 3072, 24 heads, 4096 image + 512 text tokens, a 1024x1024 image) and a
Wan 2.1 block at 1.3B (hidden 1536) and 14B (hidden 5120) with 32760 video tokens (832x480, 81
frames) and 512 text tokens; one CFG stream. A stack of `--blocks` blocks first runs a full step,
which fills one cache store per variant with every branch's pre-gate output. Then a cached step
(every branch of every block: residual + gate * cached branch) is timed with:

  GPU cache          the store on the GPU, as without cache_on_cpu;
  CPU + prefetch     the store in pinned host memory; while block i applies its branches, block
                     i+1's are copied to the GPU on a side stream (CacheStore.prefetch);
  CPU                the store in host memory, each branch copied when it is needed;
  CPU int8 + prefetch  as CPU + prefetch with 8-bit codes (half the bytes over PCIe).

The variants run interleaved, `--repeats` times in one process; figures are medians and ratios are
medians of per-repeat ratios. The full step's time is printed beside them: a cached step that
costs less than a full one still saves time. Every variant's cached step must give the GPU
cache's output (exactly; int8 within its measured error), or the script fails.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)         # run as a script: procache_core

import torch  # noqa: E402

from benchmarks.output import add_out_option, report_path  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from procache_core.cache import CacheStore  # noqa: E402

STREAMS = ("cond",)
VARIANTS = ("GPU cache", "CPU + prefetch", "CPU", "CPU int8 + prefetch")
INT8_BOUND = 0.05            # relative error of int8 codes on activations (tests/test_core_cache.py)


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    kind: str                # "flux-double", "flux-single" or "wan"
    hidden: int
    heads: int
    tokens: int              # image / video tokens
    text: int                # text tokens
    mlp: int                 # MLP inner width


SHAPES = {
    "flux-double": Shape("FLUX.1 double block, 1024x1024", "flux-double", 3072, 24, 4096, 512, 12288),
    "flux-single": Shape("FLUX.1 single block, 1024x1024", "flux-single", 3072, 24, 4096, 512, 12288),
    "wan-1.3b": Shape("Wan 2.1 1.3B block, 832x480x81", "wan", 1536, 12, 32760, 512, 8960),
    "wan-14b": Shape("Wan 2.1 14B block, 832x480x81", "wan", 5120, 40, 32760, 512, 13824),
}
SMOKE = {name: dataclasses.replace(s, name=f"{s.name.split(',')[0]}, tiny", hidden=64, heads=2, tokens=48, text=8, mlp=128)
         for name, s in SHAPES.items()}


# ---- blocks: the branch layout of each family, random weights ----------------------------------
def _attention(q, k, v, heads):
    b, n, c = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, c)


class Block(nn.Module):
    """One transformer block reduced to what a step does with it: `branches` lists
    (branch name, residual stream it feeds); `forward` computes every branch output in order,
    adding each into its stream as the model would, and returns them."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.shape, c, m = shape, shape.hidden, shape.mlp
        if shape.kind == "flux-double":
            self.branches = (("img_attn", "img"), ("txt_attn", "txt"), ("img_mlp", "img"), ("txt_mlp", "txt"))
            for s in ("img", "txt"):
                self.add_module(f"{s}_qkv", nn.Linear(c, 3 * c))
                self.add_module(f"{s}_proj", nn.Linear(c, c))
                self.add_module(f"{s}_mlp", nn.Sequential(nn.Linear(c, m), nn.GELU("tanh"), nn.Linear(m, c)))
        elif shape.kind == "flux-single":
            self.branches = (("fused", "x"),)
            self.linear1, self.linear2 = nn.Linear(c, 3 * c + m), nn.Linear(c + m, c)
        else:
            self.branches = (("self_attn", "x"), ("cross_attn", "x"), ("ffn", "x"))
            self.qkv, self.o = nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.cross_q, self.cross_kv, self.cross_o = nn.Linear(c, c), nn.Linear(c, 2 * c), nn.Linear(c, c)
            self.ffn = nn.Sequential(nn.Linear(c, m), nn.GELU("tanh"), nn.Linear(m, c))
        self.gates = nn.ParameterDict({name: nn.Parameter(torch.randn(c) * 0.1) for name, _ in self.branches})

    def forward(self, state: dict, context: torch.Tensor) -> dict:
        out, heads = {}, self.shape.heads

        def add(name, stream, value):
            out[name] = value
            state[stream] = state[stream] + self.gates[name] * value
        if self.shape.kind == "flux-double":
            img, txt = state["img"], state["txt"]
            qkv = torch.cat([self.txt_qkv(txt), self.img_qkv(img)], dim=1).chunk(3, dim=-1)   # text first, as FLUX
            joint = _attention(*qkv, heads)
            add("img_attn", "img", self.img_proj(joint[:, txt.shape[1]:]))
            add("txt_attn", "txt", self.txt_proj(joint[:, :txt.shape[1]]))
            add("img_mlp", "img", self.img_mlp(state["img"]))
            add("txt_mlp", "txt", self.txt_mlp(state["txt"]))
        elif self.shape.kind == "flux-single":
            c = self.shape.hidden
            q, k, v, hidden = self.linear1(state["x"]).split([c, c, c, self.shape.mlp], dim=-1)
            add("fused", "x", self.linear2(torch.cat([_attention(q, k, v, heads), F.gelu(hidden, approximate="tanh")], -1)))
        else:
            add("self_attn", "x", self.o(_attention(*self.qkv(state["x"]).chunk(3, dim=-1), heads)))
            add("cross_attn", "x", self.cross_o(_attention(self.cross_q(state["x"]), *self.cross_kv(context).chunk(2, -1), heads)))
            add("ffn", "x", self.ffn(state["x"]))
        return out


def _inputs(shape: Shape, device, dtype) -> tuple[dict, torch.Tensor]:
    gen = torch.Generator(device).manual_seed(1)
    rand = lambda n: torch.randn(1, n, shape.hidden, generator=gen, device=device, dtype=dtype)  # noqa: E731
    if shape.kind == "flux-double":
        return {"img": rand(shape.tokens), "txt": rand(shape.text)}, rand(shape.text)
    tokens = shape.tokens + shape.text if shape.kind == "flux-single" else shape.tokens
    return {"x": rand(tokens)}, rand(shape.text)


# ---- the steps ----------------------------------------------------------------------------------
def full_step(blocks, state, context, stores) -> dict:
    state = dict(state)
    for index, block in enumerate(blocks):
        for name, value in block(state, context).items():
            for store in stores:
                store.put(STREAMS, (index, name), value)
    return state


def cached_step(blocks, state, store: CacheStore, device, prefetch: bool) -> dict:
    """residual + gate * cached branch for every branch of every block; with `prefetch`, block
    i+1's branches start their copy to the GPU before block i's are applied."""
    state = dict(state)
    if prefetch:
        _prefetch(blocks, 0, store, device)
    for index, block in enumerate(blocks):
        if prefetch:
            _prefetch(blocks, index + 1, store, device)
        for name, stream in block.branches:
            cached = store.get(STREAMS, (index, name), device=device)
            state[stream] = state[stream] + block.gates[name] * cached
    return state


def _prefetch(blocks, index, store, device):
    if index < len(blocks):
        for name, _ in blocks[index].branches:
            store.prefetch(STREAMS, (index, name), device)


def _timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(shape: Shape, blocks_n: int, repeats: int, device: torch.device, dtype=torch.bfloat16) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        blocks = [Block(shape).to(dtype) for _ in range(blocks_n)]
    state, context = _inputs(shape, device, dtype)
    host = "cpu"
    stores = {"GPU cache": CacheStore(None), "CPU + prefetch": CacheStore(host), "CPU": CacheStore(host),
              "CPU int8 + prefetch": CacheStore(host, quantize="int8")}
    steps = {"GPU cache": (stores["GPU cache"], False), "CPU + prefetch": (stores["CPU + prefetch"], True),
             "CPU": (stores["CPU"], False), "CPU int8 + prefetch": (stores["CPU int8 + prefetch"], True)}
    times = {name: [] for name in ("full step", *VARIANTS)}
    with torch.inference_mode():
        full_step(blocks, state, context, stores.values())          # fills the caches, warms up
        outputs = {name: cached_step(blocks, state, store, device, pre) for name, (store, pre) in steps.items()}
        for r in range(repeats):
            times["full step"].append(_timed(lambda: full_step(blocks, state, context, ()), device)[0])
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]   # rotate: no variant always first
            for name in order:
                store, pre = steps[name]
                seconds, outputs[name] = _timed(lambda: cached_step(blocks, state, store, device, pre), device)
                times[name].append(seconds)
    reference = outputs["GPU cache"]
    errors = {name: max(_relative_error(out[s], reference[s]) for s in reference) for name, out in outputs.items()}
    result = {"model": shape.name, "blocks": blocks_n, "repeats": repeats,
              "cache_gib": stores["GPU cache"].nbytes / 2 ** 30, "int8_cache_gib": stores["CPU int8 + prefetch"].nbytes / 2 ** 30,
              "ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
              "ratio_to_gpu": {name: statistics.median(a / b for a, b in zip(times[name], times["GPU cache"]))
                               for name in VARIANTS[1:]},
              "prefetch_over_cpu": statistics.median(a / b for a, b in zip(times["CPU + prefetch"], times["CPU"])),
              "prefetch_over_full": statistics.median(a / b for a, b in zip(times["CPU + prefetch"], times["full step"])),
              "host_gib": sum(stores[n].nbytes for n in VARIANTS[1:]) / 2 ** 30,
              "errors": errors}
    result["pinned_gib"] = _pinned_bytes(device) / 2 ** 30
    for store in stores.values():
        store.clear()
    result["pinned_after_clear_gib"] = _pinned_bytes(device) / 2 ** 30
    return result


def _pinned_bytes(device) -> int:
    """Pinned host memory PyTorch's host allocator holds: blocks are rounded up to a power of two,
    so this can exceed the stores' own count."""
    stats = getattr(torch.cuda, "host_memory_stats", None)      # PyTorch 2.6 and later
    return stats().get("allocated_bytes.current", 0) if device.type == "cuda" and stats is not None else 0


def check(result: dict) -> list[str]:
    """What is wrong with a result: cached steps must give the GPU cache's output."""
    problems = [f"{result['model']}: '{name}' differs from the GPU cache's cached step (relative error {err:.2e})"
                for name, err in result["errors"].items() if name != "CPU int8 + prefetch" and err != 0.0]
    if not result["errors"]["CPU int8 + prefetch"] < INT8_BOUND:
        problems.append(f"{result['model']}: int8 cached step is off by {result['errors']['CPU int8 + prefetch']:.3f}")
    if result["pinned_after_clear_gib"] > 0.01 * result["pinned_gib"] + 1 / 16:
        problems.append(f"{result['model']}: {result['pinned_after_clear_gib']:.2f} GiB of pinned memory left after clear()")
    return problems


def report(results: list[dict], device_name: str) -> str:
    lines = [f"Cached step with the cache on the GPU or in host memory ({device_name}, torch {torch.__version__}, "
             "bf16, random weights, one CFG stream; medians)", "",
             "| model | blocks | cache GiB | full step ms | GPU cache ms | CPU + prefetch ms | CPU ms | CPU int8 + prefetch ms "
             "| prefetch / GPU | CPU / GPU | int8 prefetch / GPU | prefetch / no prefetch | prefetch / full step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ms, ratio = r["ms"], r["ratio_to_gpu"]
        lines.append(f"| {r['model']} | {r['blocks']} | {r['cache_gib']:.2f} | {ms['full step']:.1f} | {ms['GPU cache']:.2f} "
                     f"| {ms['CPU + prefetch']:.1f} | {ms['CPU']:.1f} | {ms['CPU int8 + prefetch']:.1f} "
                     f"| {ratio['CPU + prefetch']:.2f} | {ratio['CPU']:.2f} | {ratio['CPU int8 + prefetch']:.2f} "
                     f"| {r['prefetch_over_cpu']:.2f} | {r['prefetch_over_full']:.2f} |")
    lines += ["", "Host memory of the three host stores (8-bit included): "
              + ", ".join(f"{r['model']}: {r['host_gib']:.2f} GiB counted, {r['pinned_gib']:.2f} GiB pinned "
                          f"({r['pinned_after_clear_gib']:.2f} after clear)" for r in results)]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--blocks", type=int, default=3, help="blocks in the stack")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on the CPU, where prefetch does nothing: checks the script, measures nothing")
    add_out_option(parser, optional=True)
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in SHAPES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(SHAPES)}")
    if args.cpu_smoke:
        device, device_name, shapes = torch.device("cpu"), "CPU smoke run, tiny sizes", SMOKE
    elif not torch.cuda.is_available():
        raise SystemExit(f"benchmarks/offload_gpu.py measures copies between host and GPU memory and needs a CUDA GPU, "
                         f"but torch.cuda.is_available() is False (PyTorch {torch.__version__}). Run it on a machine "
                         "with an NVIDIA GPU and a CUDA build of PyTorch, or pass --cpu-smoke to check the script.")
    else:
        device, shapes = torch.device("cuda", torch.cuda.current_device()), SHAPES
        device_name = torch.cuda.get_device_name(device)
    results = []
    for name in args.models.split(","):
        results.append(measure(shapes[name], args.blocks, args.repeats, device))
        print(f"{name}: {results[-1]['ms']}", flush=True)
    table = report(results, device_name)
    print(table)
    if args.out:
        with open(report_path(args.out, "offload_gpu.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
    problems = [p for r in results for p in check(r)]
    if problems:
        raise SystemExit("\n".join(problems))
    return results


if __name__ == "__main__":
    main()
