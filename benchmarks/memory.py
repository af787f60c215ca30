"""Cache plans of real-size models without their weights: bytes per granularity and the auto budget's pick.

    python benchmarks/memory.py --comfyui ~/comfy/ComfyUI          # or COMFYUI_PATH=...
    python benchmarks/memory.py --out benchmarks/results      # updates benchmarks/results/memory.md

Builds FLUX.1-dev, Qwen-Image, Wan 2.1 1.3B and 14B, PixArt-Sigma XL and SD3.5 Large from ComfyUI's
own classes with their published configurations (the values ComfyUI's model detection reads from
their checkpoints), with every weight on the meta device in bf16, and takes the pack's census
(`Run.take_census`, the same call ProCache Apply makes before the first block of a sampler run) of
one model call on meta inputs of the real latent shape and text length. Nothing is computed or
allocated, so a 14B video model plans in seconds on a laptop CPU.

Printed per model and size: the bytes of the granularity ladder (branch level, the finest mixed
rung, residual spans of 1/2/4 blocks and of a whole block list, one model-level residual) with
plain reuse and with Taylor order 2 (history 3), the one-residual footprint the step-skipping
caches keep, and the rung the auto budget (memory.AUTO_SHARE of the free memory) picks at 8, 12,
16 and 24 GiB free. A second table plans every shipped workflow (workflows/api/*.json) at its
documented size, schedule and CFG with 24 GiB free.

ComfyUI's CPU attention (sub-quadratic) sizes its chunks from the device's free memory, which the
meta device does not have, so the census runs with PyTorch's SDPA (`pytorch_attention`): attention
is inside the branches, and which kernel computes it changes no cached shape (tests/
test_comfy_memory_real.py checks meta census == CPU census on tiny models of every family here).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import platform
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)     # run as a script: procache_core and the ComfyUI loader of the tests

import torch  # noqa: E402

from benchmarks.output import add_out_option, report_path  # noqa: E402

from procache_core import Run, Schedule, SchedulePolicy, StepClock, Taylor, TokenSelector, find_family  # noqa: E402
from procache_core import memory  # noqa: E402

GIB = memory.GIB
FREE_GIB = (8, 12, 16, 24)      # free memory of the cache device at run start
TAYLOR = Taylor(2)              # history 3: the forecaster with the largest history the pack ships
DEEP_FRACTION = 0.25            # ProCache Apply's default share of deep blocks


# ---- the models: ComfyUI class, published configuration, inputs of one call ----------------------
def _flux_inputs(cfg, size, text, batch, make):
    width, height = size[:2]
    x = make((batch, cfg["in_channels"], height // 8, width // 8))
    kwargs = {"y": make((batch, cfg["vec_in_dim"]))} if cfg.get("vec_in_dim") else {}
    if cfg.get("guidance_embed"):
        kwargs["guidance"] = make((batch,), torch.float32)
    return (x, make((batch,), torch.float32), make((batch, text, cfg["context_in_dim"]))), kwargs


def _qwen_inputs(cfg, size, text, batch, make):
    width, height = size[:2]
    x = make((batch, cfg.get("out_channels", 16), 1, height // 8, width // 8))
    return (x, make((batch,), torch.float32), make((batch, text, cfg.get("joint_attention_dim", 3584)))), {}


def _wan_inputs(cfg, size, text, batch, make):
    width, height, frames = size
    x = make((batch, cfg["in_dim"], 1 + (frames - 1) // 4, height // 8, width // 8))
    return (x, make((batch,), torch.float32), make((batch, text, cfg["text_dim"]))), {}


def _pixart_inputs(cfg, size, text, batch, make):
    width, height = size[:2]
    x = make((batch, cfg["in_channels"], height // 8, width // 8))
    kwargs = {}
    if cfg.get("micro_condition"):      # PixArt-alpha: the image size and aspect ratio it was trained on
        kwargs = {"c_size": make((batch, 2)), "c_ar": make((batch, 1))}
    return (x, make((batch,), torch.float32), make((batch, text, cfg.get("caption_channels", 4096)))), kwargs


def _sd3_inputs(cfg, size, text, batch, make):
    width, height = size[:2]
    x = make((batch, cfg["in_channels"], height // 8, width // 8))
    context = make((batch, text, cfg["context_embedder_config"]["params"]["in_features"]))
    return (x, make((batch,), torch.float32), context), {"y": make((batch, cfg["adm_in_channels"]))}


@dataclasses.dataclass(frozen=True)
class Model:
    """A diffusion model as ComfyUI builds it: its supported_models class, unet config and the
    inputs of one call (inputs(cfg, size, text tokens, batch, make) -> args, kwargs)."""

    name: str
    config_class: str
    unet_config: dict
    inputs: object
    text: int                   # text tokens of one call (the text encoder's usual length)

    def build(self, device, dtype=torch.bfloat16):
        """The diffusion model (an nn.Module) with its parameters on `device` (meta: none allocated)."""
        import comfy.supported_models
        cfg = getattr(comfy.supported_models, self.config_class)(dict(self.unet_config))
        cfg.set_inference_dtype(dtype, None)
        return cfg.get_model({}, "", device=torch.device(device)).diffusion_model


# Configurations as comfy/model_detection.py reads them from each model's checkpoint.
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 3072,
            "num_heads": 24, "mlp_ratio": 4.0, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56],
            "theta": 10000, "qkv_bias": True, "context_in_dim": 4096, "vec_in_dim": 768, "guidance_embed": True,
            "txt_ids_dims": []}
WAN_14B = {"image_model": "wan2.1", "model_type": "t2v", "dim": 5120, "ffn_dim": 13824, "num_heads": 40,
           "num_layers": 40, "in_dim": 16, "out_dim": 16, "text_dim": 4096, "freq_dim": 256, "patch_size": (1, 2, 2),
           "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
PIXART_SIGMA = {"image_model": "pixart_sigma", "num_heads": 16, "patch_size": 2, "hidden_size": 1152,
                "in_channels": 4, "depth": 28, "model_max_length": 300, "micro_condition": False}

MODELS = {m.name: m for m in [
    Model("FLUX.1-dev", "Flux", FLUX_DEV, _flux_inputs, text=512),
    Model("FLUX.1-schnell", "Flux", {**FLUX_DEV, "guidance_embed": False}, _flux_inputs, text=512),
    # Qwen-Image: the text length of a long prompt after the chat template is dropped
    Model("Qwen-Image", "QwenImage", {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60},
          _qwen_inputs, text=256),
    Model("Wan 2.1 1.3B", "WAN21_T2V", {**WAN_14B, "dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30},
          _wan_inputs, text=512),
    Model("Wan 2.1 14B", "WAN21_T2V", WAN_14B, _wan_inputs, text=512),
    Model("Wan 2.2 14B", "WAN21_T2V", WAN_14B, _wan_inputs, text=512),    # A14B experts: Wan 2.1 14B's shape
    Model("PixArt-Sigma XL", "PixArtSigma", PIXART_SIGMA, _pixart_inputs, text=300),
    Model("PixArt-alpha XL", "PixArtAlpha", {**PIXART_SIGMA, "image_model": "pixart_alpha", "model_max_length": 120,
                                             "micro_condition": True, "input_size": 128, "pe_interpolation": 2},
          _pixart_inputs, text=120),
    Model("SD3.5 Large", "SD3", {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 38,
                                 "input_size": None, "adm_in_channels": 2048, "pos_embed_scaling_factor": None,
                                 "pos_embed_max_size": 192, "num_patches": 36864, "qk_norm": "rms",
                                 "x_block_self_attn_layers": [],
                                 "context_embedder_config": {"target": "torch.nn.Linear",
                                                             "params": {"in_features": 4096, "out_features": 2432}}},
          _sd3_inputs, text=333),       # 77 CLIP + 256 T5 tokens
]}


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    size: tuple                 # (width, height) or (width, height, frames)
    streams: int                # conditionings per step: 1 at cfg 1, 2 with CFG
    schedule: str               # bundled schedule, resampled to `steps`
    steps: int

    @property
    def label(self) -> str:
        size = "x".join(map(str, self.size))
        return f"{self.model} {size}, {'CFG' if self.streams == 2 else 'cfg 1'}"


# The sizes users run; schedules as in the shipped workflows (selective steps in every one).
CASES = [
    Case("FLUX.1-dev", (1024, 1024), 1, "procache-flux-50-9full", 28),
    Case("Qwen-Image", (1328, 1328), 2, "procache-dit-50-17full", 20),
    Case("PixArt-Sigma XL", (1024, 1024), 2, "procache-pixart-20-7full", 20),
    Case("SD3.5 Large", (1024, 1024), 2, "procache-dit-50-17full", 28),
    Case("Wan 2.1 1.3B", (832, 480, 81), 2, "procache-dit-50-17full", 30),
    Case("Wan 2.1 14B", (832, 480, 81), 2, "procache-dit-50-17full", 30),
    Case("Wan 2.1 14B", (1280, 720, 81), 2, "procache-dit-50-17full", 30),
]

# An estimate of branch-level bytes (plain reuse), from the families' branch declarations.
ESTIMATE_GIB = {("FLUX.1-dev", (1024, 1024)): 2.0, ("Qwen-Image", (1328, 1328)): 9.8,
             ("PixArt-Sigma XL", (1024, 1024)): 1.5, ("Wan 2.1 1.3B", (832, 480, 81)): 16.9,
             ("Wan 2.1 14B", (832, 480, 81)): 75.0, ("Wan 2.1 14B", (1280, 720, 81)): 173.0}


# ---- census and plans -------------------------------------------------------------------------------
@contextlib.contextmanager
def pytorch_attention():
    """ComfyUI's model code calls PyTorch's SDPA while this is open (the families import
    `optimized_attention` by name, so each loaded comfy.ldm module's name is swapped back after)."""
    import comfy.ldm.modules.attention as attention
    saved = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("comfy.ldm") or module is None:
            continue
        for attr in ("optimized_attention", "optimized_attention_masked"):
            if callable(getattr(module, attr, None)):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, attention.attention_pytorch)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def meta_tensor(shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def make_run(schedule: Schedule, diffusion_model, forecaster=None) -> Run:
    """A Run as ProCache Apply starts one (default selector and deep share) for `schedule`."""
    family, sentence = find_family(diffusion_model)
    if family is None:
        raise RuntimeError(sentence)
    sigmas = [1.0 - k / schedule.steps for k in range(schedule.steps + 1)]
    return Run(SchedulePolicy(schedule, DEEP_FRACTION), StepClock(sigmas), family, selector=TokenSelector(),
               forecaster=forecaster)


def take_census(model: Model, diffusion_model, size, schedule: Schedule, make=meta_tensor) -> memory.Census:
    """The census of one call of one stream (batch 1); plans scale it to the run's streams."""
    args, kwargs = model.inputs(model.unet_config, size, model.text, 1, make)
    run = make_run(schedule, diffusion_model)
    return run.take_census(diffusion_model, 1.0, ["cond"], lambda: diffusion_model(*args, **kwargs))


def library(name: str, steps: int) -> Schedule:
    with open(os.path.join(ROOT, "schedules", f"{name}.json"), encoding="utf-8") as f:
        return Schedule.from_json(f.read(), where=name).resampled(steps)


def named_rungs(census: memory.Census, deep: list[int]) -> dict[str, memory.Rung | None]:
    """The rungs the tables show, by name (None: this ladder has no such rung)."""
    rungs = memory.ladder(census, deep)
    spans = [r for r in rungs if r.kind == "spans"]
    by_length = {max(last - first + 1 for first, last in r.spans): r for r in reversed(spans)}
    return {"branch": rungs[0], "mixed": next((r for r in rungs if r.kind == "mixed"), None),
            "span 1": by_length.get(1), "span 2": by_length.get(2), "span 4": by_length.get(4),
            "whole list": spans[-1] if spans else None, "model": rungs[-1]}


@dataclasses.dataclass
class Plans:
    """One case's census and what each history makes of it."""

    label: str
    census: memory.Census               # scaled to the case's streams
    runs: dict[str, Run]                # "plain" / "taylor2" -> a Run for the case's schedule
    seconds: float
    estimate: float | None = None       # the per-branch estimate of branch level in GiB, where it gives one

    def rung_bytes(self, key: str) -> dict[str, int | None]:
        run = self.runs[key]
        return {name: None if rung is None else
                memory.planned_bytes(self.census, rung, run.phases)
                for name, rung in named_rungs(self.census, run.deep_blocks(self.census)).items()}

    def pick(self, key: str, free_gib: float, precision: str = memory.DEFAULT_PRECISION) -> memory.CachePlan:
        quantize, quantize_all = memory.PRECISIONS[precision]
        return self.runs[key].make_plan(self.census, memory.Budget("auto"), int(free_gib * GIB), "cuda:0",
                                        streams=self.census.streams, quantize=quantize, quantize_all=quantize_all)


_CENSUS_MEMO: dict = {}


def plan_case(label: str, model: Model, size, streams: int, schedule: Schedule, forecasters: dict) -> Plans:
    """The case's census (taken once per model and size) and a Run per forecaster."""
    started = time.perf_counter()
    key = (json.dumps(model.unet_config, sort_keys=True, default=str), size, model.text)
    diffusion_model = model.build("meta")
    if key not in _CENSUS_MEMO:
        with pytorch_attention(), torch.no_grad():
            _CENSUS_MEMO[key] = take_census(model, diffusion_model, size, schedule)
    census = _CENSUS_MEMO[key].per_stream(streams)
    runs = {name: make_run(schedule, diffusion_model, forecaster) for name, forecaster in forecasters.items()}
    return Plans(label, census, runs, time.perf_counter() - started, ESTIMATE_GIB.get((model.name, size)))


# ---- the shipped workflows ---------------------------------------------------------------------------
WORKFLOW_MODELS = {"flux1-dev": "FLUX.1-dev", "flux1-schnell": "FLUX.1-schnell", "qwen_image": "Qwen-Image",
                   "wan2.1_t2v_1.3B": "Wan 2.1 1.3B", "wan2.2_t2v": "Wan 2.2 14B",
                   "PixArt-Sigma-XL": "PixArt-Sigma XL", "PixArt-XL-2-1024": "PixArt-alpha XL",
                   "sd3.5_large": "SD3.5 Large"}


@dataclasses.dataclass
class Workflow:
    file: str
    model: str
    size: tuple
    streams: int
    schedule: Schedule
    note: str = ""
    precision: str = memory.DEFAULT_PRECISION
    forecast: str = "none"      # "taylor 1": Apply's forecast input with nothing connected to replace it


def shipped_workflows() -> list[Workflow]:
    """Each Apply node of each API workflow: its model, latent size, CFG streams and the schedule
    slice its sampler runs (a KSamplerAdvanced covers start..end of the schedule's steps)."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*.json"))):
        with open(path, encoding="utf-8") as f:
            graph = json.load(f)
        by_type = lambda t: [n["inputs"] for n in graph.values() if n["class_type"] == t]  # noqa: E731
        loader = by_type("UNETLoader") + by_type("CheckpointLoaderSimple")
        names = [v for i in loader for k, v in i.items() if k in ("unet_name", "ckpt_name")]
        model = next(m for prefix, m in WORKFLOW_MODELS.items() if any(n.startswith(prefix) for n in names))
        latent = next(i for t in ("EmptySD3LatentImage", "EmptyLatentImage", "EmptyHunyuanLatentVideo")
                      for i in by_type(t))
        size = (latent["width"], latent["height"]) + ((latent["length"],) if "length" in latent else ())
        samplers = by_type("KSampler") + by_type("KSamplerAdvanced")
        streams = 1 if all(float(s["cfg"]) == 1.0 for s in samplers) else 2
        patterns = by_type("ProCacheScheduleLoader")
        schedule = Schedule.from_json(patterns[0]["pattern"], where=path) if patterns else \
            library("procache-pixart-20-7full", 20)
        note = "" if patterns else "router: planned with the PixArt schedule it is trained against"
        force_last = any(i.get("force_last_full") for i in by_type("ProCacheApply"))
        precision = next((i["cache_precision"] for i in by_type("ProCacheApply") if "cache_precision" in i),
                         memory.DEFAULT_PRECISION)
        # an unlinked forecaster and eoc leave the forecast to Apply's own input (older workflows: plain reuse)
        forecast = next((i.get("forecast", "none") for i in by_type("ProCacheApply")
                         if "forecaster" not in i and "eoc" not in i), "none")
        for sampler in samplers:
            start = int(sampler.get("start_at_step", 0))
            end = min(int(sampler.get("end_at_step", schedule.steps)), schedule.steps)
            part = schedule
            if (start, end) != (0, schedule.steps):     # a KSamplerAdvanced: its slice, first step full
                part = schedule.with_kinds([1] + [int(k) for k in schedule.kinds[start + 1:end]])
                note = f"steps {start}-{end} of {schedule.steps}"
            found.append(Workflow(os.path.basename(path), model, size, streams,
                                  part.windowed(0.0, 1.0, force_last), note, precision, forecast))
    return found


# ---- tables ---------------------------------------------------------------------------------------------
COLUMNS = ["branch", "mixed", "span 1", "span 2", "span 4", "whole list", "model"]


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def ladder_table(results: list[Plans], key: str) -> list[str]:
    head = ("| model, size | blocks | one residual x streams | branch level | finest mixed | spans of 1 | spans of 2 "
            "| spans of 4 | whole-list span | model level |")
    lines = [head, "|" + "---|" * 10]
    for p in results:
        sizes = p.rung_bytes(key)
        lines.append(f"| {p.label} | {p.census.num_blocks} | {gib(p.census.residual * p.census.streams)} | "
                     + " | ".join(gib(sizes[c]) for c in COLUMNS) + " |")
    return lines


def pick_text(plan: memory.CachePlan) -> str:
    return f"{plan.rung.describe(plan.num_blocks)}: {memory.format_bytes(plan.bytes)}"


def picks_table(results: list[Plans]) -> list[str]:
    lines = ["| model, size | forecast | " + " | ".join(f"{g} GiB free (budget {memory.AUTO_SHARE * g:.1f} GiB)"
                                                       for g in FREE_GIB) + " |", "|" + "---|" * (2 + len(FREE_GIB))]
    for p in results:
        for key, label in (("plain", "plain reuse"), ("taylor1", "Taylor 1 (Apply's default)"), ("taylor2", "Taylor 2")):
            lines.append(f"| {p.label} | {label} | " + " | ".join(pick_text(p.pick(key, g)) for g in FREE_GIB)
                         + " |")
    return lines


def estimate_table(results: list[Plans]) -> list[str]:
    lines = ["| model, size | per-branch estimate (GiB) | branch values (GiB) | branch level, plain (GiB) | "
             "branch level, Taylor 2 (GiB) | what the difference is |", "|" + "---|" * 6]
    for p in results:
        expected = p.estimate
        if expected is None:
            continue
        values = sum(sum(v.values()) for v in p.census.values.values())
        plain, taylor = p.rung_bytes("plain")["branch"], p.rung_bytes("taylor2")["branch"]
        extras = plain - values
        why = (f"+{extras / GIB:.2f} GiB kept once per block for selective steps (the deep blocks' kept inputs, "
               f"selection references, staleness); Taylor 2: 3 x values + that + "
               f"{(taylor - 3 * values - extras) / GIB:.2f} GiB of selective-step offsets")
        lines.append(f"| {p.label} | {expected:.1f} | {values / GIB:.2f} | {plain / GIB:.2f} | {taylor / GIB:.2f} | "
                     f"{why} |")
    return lines


def workflow_table(rows: list[tuple[Workflow, memory.CachePlan]]) -> list[str]:
    lines = ["| workflow | model, size | streams | schedule (steps, selective) | forecast | rung at 24 GiB free | "
             "planned | within 4 GiB |", "|" + "---|" * 8]
    for wf, plan in rows:
        size = "x".join(map(str, wf.size))
        selective = sum(1 for k in wf.schedule.kinds if int(k) == 2)
        note = f" ({wf.note})" if wf.note else ""
        lines.append(f"| {wf.file}{note} | {wf.model} {size} | {wf.streams} | {wf.schedule.steps}, {selective} | "
                     f"{wf.forecast} | {plan.rung.describe(plan.num_blocks)} | {memory.format_bytes(plan.bytes)} | "
                     f"{'yes' if plan.bytes <= 4 * GIB else 'NO'} |")
    return lines


# ---- main ---------------------------------------------------------------------------------------------
def load_comfy(path: str):
    os.environ["COMFYUI_PATH"] = path
    import comfy_env
    return comfy_env.load_comfy()


def run_benchmark(log=print) -> dict:
    forecasters = {"plain": None, "taylor1": Taylor(1), "taylor2": TAYLOR}
    results = []
    for case in CASES:
        results.append(plan_case(case.label, MODELS[case.model], case.size, case.streams,
                                 library(case.schedule, case.steps), forecasters))
        p = results[-1]
        log(f"{case.label}: census in {p.seconds:.1f} s, {p.census.num_blocks} blocks")
    workflows = []
    for wf in shipped_workflows():
        forecaster = Taylor(1) if wf.forecast == "taylor 1" else None
        p = plan_case(wf.file, MODELS[wf.model], wf.size, wf.streams, wf.schedule, {wf.forecast: forecaster})
        workflows.append((wf, p.pick(wf.forecast, 24, wf.precision)))
        log(f"{wf.file}: {pick_text(workflows[-1][1])}")
    return {"cases": results, "workflows": workflows}


def report(result: dict, command: str, version: str, seconds: float) -> str:
    cases = result["cases"]
    parts = [
        "# Cache plans at real size (benchmarks/memory.py)", "",
        f"Command: `{command}`  ", f"ComfyUI {version}, {platform.machine()} CPU with {os.cpu_count()} cores, no GPU; "
        f"{seconds:.0f} s. Weights and inputs on the meta device in bf16: nothing computed or allocated; the census is "
        "the one ProCache Apply takes before the first block of a sampler run.", "",
        "Schedules: FLUX procache-flux-50-9full at 28 steps, PixArt procache-pixart-20-7full, the others "
        "procache-dit-50-17full at 20 (Qwen-Image), 28 (SD3.5) or 30 (Wan) steps; all have selective steps, so the "
        f"deepest {DEEP_FRACTION:.0%} of blocks keep branch level first. Text tokens: FLUX 512 (T5), Qwen-Image 256, "
        "Wan 512 (umT5), PixArt-Sigma 300 (T5), SD3.5 333 (77 CLIP + 256 T5). Bytes in GiB for all CFG streams.", "",
        "## Ladder, plain reuse (history 1)", "", *ladder_table(cases, "plain"), "",
        "## Ladder, Taylor order 2 (history 3, plus the offsets selective steps keep)", "",
        *ladder_table(cases, "taylor2"), "",
        f"## The auto budget's pick ({memory.AUTO_SHARE:.0%} of the free memory at run start; cache_precision {memory.DEFAULT_PRECISION!r})", "",
        *picks_table(cases), "",
        "## Against a per-branch estimate of branch level", "",
        "The estimate counts one value per branch, block and stream; the census also counts what selective steps "
        "keep: once per deep block (FLUX: the single blocks' attention outputs, since selective steps recompute only "
        "the MLP half of the fused linear), and with forecasting one offset per refreshed branch.", "", *estimate_table(cases), "",
        "## Shipped workflows at 24 GiB free (auto budget, their own schedule, cache_precision and forecast)", "",
        *workflow_table(result["workflows"]), ""]
    return "\n".join(parts)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI checkout")
    add_out_option(parser, optional=True)
    args = parser.parse_args(argv)
    if not args.comfyui:
        parser.error("no ComfyUI: pass --comfyui PATH or set COMFYUI_PATH")
    return args


def main(argv=None):
    args = parse_args(argv)
    version = load_comfy(args.comfyui)
    started = time.perf_counter()
    result = run_benchmark(log=lambda line: print(line, file=sys.stderr, flush=True))
    command = "python benchmarks/memory.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = report(result, command.strip(), version, time.perf_counter() - started)
    print(text)
    if args.out:
        with open(report_path(args.out, "memory.md"), "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {report_path(args.out, 'memory.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
