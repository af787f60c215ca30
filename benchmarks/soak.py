"""Soak test: many queued prompts through a real, headless ComfyUI server with the pack installed.

    python benchmarks/soak.py --comfyui ~/comfy/ComfyUI [--prompts 100] [--keep]

What it does:
1. Builds a temporary ComfyUI base directory: custom_nodes/ holds a link to this pack and a small
   test-only node (conditioning tensors of the right shape: text encoders cannot be built tiny);
   models/diffusion_models/ holds a tiny Wan 2.1 and a tiny PixArt-Sigma transformer as
   safetensors, shaped so ComfyUI's own UNETLoader detects them.
2. Starts ComfyUI on the CPU (main.py --cpu --base-directory ...) and queues the prompts, a few at a
   time, through /prompt. They alternate the two models, two resolutions each, batch 1/2, five
   samplers, CFG on and off, uniform schedules with and without selective steps, cache on CPU on
   and off; every tenth prompt is cancelled mid-sampling with POST /interrupt. Each finished prompt
   saves its latent (SaveLatent).
3. Starts a second, fresh server and queues every prompt that finished again, in reverse order,
   with POST /free (unload models, free memory) before each: a fresh run of the same settings.
4. Reports: errors (execution errors, tracebacks in the server log), stale reuse (soak outputs
   that differ from their fresh run), cancels that landed mid-sampling, and the server's resident
   memory (RSS), idle, after prompt 10 and after the last prompt (the queue drains before each
   measurement: RSS of a busy server swings with the prompt in flight).
Exit status 0 only if there were no errors, no stale outputs, and RSS stayed within 5 %.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(PACK_ROOT, "tests"))
import server_check  # noqa: E402  (the tests' check that a Python can start a ComfyUI server)

MODELS = {"wan": "soak_wan21_tiny.safetensors", "pixart": "soak_pixart_sigma_tiny.safetensors"}
# (width, height) in pixels. PixArt's position embedding needs (H + W) / 2 >= 40 latent pixels.
RESOLUTIONS = {"wan": [(64, 64), (96, 64)], "pixart": [(16, 640), (32, 640)]}
SAMPLERS = ["euler", "dpmpp_2m", "heun", "euler_ancestral", "uni_pc"]
STEPS, CANCEL_STEPS, CANCEL_AT = 8, 40, 3
IN_FLIGHT = 3           # prompts queued ahead of the one running
RSS_AFTER = 10          # memory is compared between the idle server after this many prompts and after all

CONDITIONING_NODE = '''"""Test-only node for the ProCache soak test: conditioning of the right shape from a seed."""
import torch


class ProCacheSoakConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 8, "min": 1, "max": 64}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, tokens, seed):
        gen = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, 4096, generator=gen), {}]],)


NODE_CLASS_MAPPINGS = {"ProCacheSoakConditioning": ProCacheSoakConditioning}
'''


# ---- setup ---------------------------------------------------------------------------------------
def write_models(comfyui: str, folder: str) -> None:
    """Run in a child process: builds the two tiny transformers with ComfyUI's own classes."""
    os.environ["COMFYUI_PATH"] = comfyui
    sys.path.insert(0, os.path.join(PACK_ROOT, "tests"))
    import torch
    from safetensors.torch import save_file
    import comfy_env
    comfy_env.load_comfy()
    import comfy.supported_models as sm
    configs = {"wan": comfy_env.tiny_config("wan"),
               # detection fixes PixArt's width (1152) and heads (16); one block keeps it small
               "pixart": (sm.PixArtSigma, {"image_model": "pixart_sigma", "hidden_size": 1152, "num_heads": 16,
                                           "depth": 1, "patch_size": 2, "in_channels": 4, "model_max_length": 8,
                                           "micro_condition": False})}
    for family, (cls, config) in configs.items():
        model_config = cls(config)
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model({}, "", device=torch.device("cpu"))
        gen = torch.Generator().manual_seed(len(family))
        state = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.float16) if v.is_floating_point() else v
                 for k, v in model.diffusion_model.state_dict().items()}
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, MODELS[family]))


def make_base(comfyui: str) -> str:
    base = tempfile.mkdtemp(prefix="procache-soak-")
    nodes = os.path.join(base, "custom_nodes")
    os.makedirs(os.path.join(nodes, "procache_soak_nodes"))
    os.symlink(PACK_ROOT, os.path.join(nodes, "ProCache"))
    with open(os.path.join(nodes, "procache_soak_nodes", "__init__.py"), "w") as f:
        f.write(CONDITIONING_NODE)
    models = os.path.join(base, "models", "diffusion_models")
    os.makedirs(models)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--write-models", models, "--comfyui", comfyui],
                   check=True)
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A headless ComfyUI process on the CPU, its log in the base directory."""

    def __init__(self, comfyui: str, base: str, name: str, python: str = sys.executable):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, f"server-{name}.log")
        self.log = open(self.log_path, "w")
        self.ready_at = 0
        self.python = python
        self.process = subprocess.Popen(
            [python, "main.py", "--cpu", "--base-directory", base, "--listen", "127.0.0.1",
             "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes", "--disable-metadata"],
            cwd=comfyui, stdout=self.log, stderr=subprocess.STDOUT)

    async def wait_ready(self, session, timeout: float = 300.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                with open(self.log_path, errors="replace") as f:
                    why = server_check.explain_start_failure(f.read(), self.python)
                raise RuntimeError(f"{why or f'ComfyUI exited with {self.process.returncode}'}; see {self.log_path}")
            try:
                async with session.get(self.url + "/object_info/ProCacheApply") as r:
                    if r.status == 200 and "ProCacheApply" in await r.json():
                        self.log.flush()
                        self.ready_at = os.path.getsize(self.log_path)   # start-up messages are ComfyUI's own
                        return
            except OSError:
                pass
            await asyncio.sleep(1.0)
        raise RuntimeError(f"ComfyUI did not start within {timeout:.0f} s; see {self.log_path}")

    def rss(self) -> int:
        import psutil
        return psutil.Process(self.process.pid).memory_info().rss

    def tracebacks(self) -> int:
        """Tracebacks the server logged after start-up (while running the prompts)."""
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            f.seek(self.ready_at)
            return f.read().count("Traceback (most recent call last)")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


# ---- prompts -------------------------------------------------------------------------------------
def settings(i: int) -> dict:
    family = ("wan", "pixart")[i % 2]
    cancel = i % 10 == 7
    return {"index": i, "family": family, "size": RESOLUTIONS[family][(i // 2) % 2], "batch": 1 + (i // 4) % 2,
            "sampler": SAMPLERS[i % len(SAMPLERS)], "cfg": (1.0, 3.5)[(i // 3) % 2], "interval": 2 + (i // 5) % 2,
            "selective": (i // 7) % 2 == 1, "cache_on_cpu": (i // 11) % 2 == 1, "seed": 1000 + i,
            "steps": CANCEL_STEPS if cancel else STEPS, "cancel": cancel}


def prompt_for(s: dict, prefix: str) -> dict:
    width, height = s["size"]
    if s["family"] == "wan":
        latent = {"class_type": "EmptyHunyuanLatentVideo",
                  "inputs": {"width": width, "height": height, "length": 9, "batch_size": s["batch"]}}
    else:
        latent = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height,
                                                               "batch_size": s["batch"]}}
    tokens = 5 if s["family"] == "wan" else 8
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": MODELS[s["family"]], "weight_dtype": "default"}},
        "2": {"class_type": "ProCacheScheduleLoader",
              "inputs": {"source": "uniform interval", "pattern": "", "interval": s["interval"],
                         "steps": s["steps"], "selective": s["selective"]}},
        "3": {"class_type": "ProCacheApply",
              "inputs": {"model": ["1", 0], "schedule": ["2", 0], "start_percent": 0.0, "end_percent": 1.0,
                         "force_last_full": False, "cache_on_cpu": s["cache_on_cpu"]}},
        "4": {"class_type": "ProCacheSoakConditioning", "inputs": {"tokens": tokens, "seed": s["seed"]}},
        "5": {"class_type": "ProCacheSoakConditioning", "inputs": {"tokens": tokens, "seed": s["seed"] + 1}},
        "6": latent,
        "7": {"class_type": "KSampler",
              "inputs": {"model": ["3", 0], "seed": s["seed"], "steps": s["steps"], "cfg": s["cfg"],
                         "sampler_name": s["sampler"], "scheduler": "simple", "positive": ["4", 0],
                         "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"{prefix}/p{s['index']:03d}"}},
    }


async def run_phase(session, server: Server, base: str, items: list[dict], prefix: str, fresh: bool) -> dict:
    """Queue `items`; returns index -> result (status, latent file, ProCache run summary, RSS after it),
    and the RSS of the idle server after the first RSS_AFTER prompts and after all of them.

    fresh=False: IN_FLIGHT prompts queued at a time, cancels sent. fresh=True: one at a time, each
    after POST /free, no cancels.
    """
    client_id = uuid.uuid4().hex
    results: dict[int, dict] = {}
    idle_rss: dict[str, int] = {}
    by_prompt: dict[str, dict] = {}
    done = asyncio.Queue()
    running = {"prompt": None}

    async def listen(ws):
        async for msg in ws:
            if msg.type != 1:       # aiohttp.WSMsgType.TEXT; previews come as binary
                continue
            m = json.loads(msg.data)
            kind, data = m.get("type"), m.get("data") or {}
            pid = data.get("prompt_id")
            if kind == "execution_start":
                running["prompt"] = pid
            elif kind == "progress" and pid in by_prompt:
                r = by_prompt[pid]
                if r["settings"]["cancel"] and not fresh and data.get("value", 0) >= CANCEL_AT and not r["interrupt_sent"]:
                    r["interrupt_sent"] = True
                    async with session.post(server.url + "/interrupt", json={"prompt_id": pid}) as resp:
                        assert resp.status == 200
            elif kind == "procache.run" and running["prompt"] in by_prompt:
                by_prompt[running["prompt"]]["runs"].append(data)
            elif kind in ("execution_success", "execution_error", "execution_interrupted") and pid in by_prompt:
                by_prompt[pid]["status"] = kind
                if kind == "execution_error":
                    by_prompt[pid]["error"] = data.get("exception_message", "")
                await done.put(pid)

    async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
        listener = asyncio.create_task(listen(ws))
        queue = list(items)
        in_flight = 0
        while queue or in_flight:
            while queue and in_flight < (1 if fresh else IN_FLIGHT):
                if not fresh and queue[0]["index"] == RSS_AFTER and "first" not in idle_rss:
                    if in_flight:
                        break           # let the first RSS_AFTER prompts drain, then measure an idle server
                    await asyncio.sleep(1.0)
                    idle_rss["first"] = server.rss()
                s = queue.pop(0)
                if fresh:
                    async with session.post(server.url + "/free", json={"unload_models": True, "free_memory": True}):
                        pass
                    await asyncio.sleep(0.2)
                body = {"prompt": prompt_for(s, prefix), "client_id": client_id}
                async with session.post(server.url + "/prompt", json=body) as r:
                    answer = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"prompt {s['index']} refused: {answer}")
                by_prompt[answer["prompt_id"]] = {"settings": s, "runs": [], "interrupt_sent": False, "status": None}
                in_flight += 1
            pid = await asyncio.wait_for(done.get(), timeout=600)
            in_flight -= 1
            r = by_prompt[pid]
            r["rss"] = server.rss()
            files = sorted(glob.glob(os.path.join(base, "output", prefix, f"p{r['settings']['index']:03d}_*.latent")))
            r["file"] = files[-1] if files else None
            results[r["settings"]["index"]] = r
            if not fresh:
                print(f"  prompt {r['settings']['index']:3d} {r['settings']['family']:6s} {r['status']:22s} "
                      f"rss {r['rss'] / 2**20:7.1f} MiB", flush=True)
        listener.cancel()
    await asyncio.sleep(1.0)
    idle_rss["last"] = server.rss()
    return results, idle_rss


def load_latent(path: str):
    from safetensors.torch import load_file
    return load_file(path)["latent_tensor"]


# ---- main ----------------------------------------------------------------------------------------
async def soak(args) -> int:
    import aiohttp
    import torch
    base = make_base(args.comfyui)
    print(f"base directory {base}")
    items = [settings(i) for i in range(args.prompts)]
    timeout = aiohttp.ClientTimeout(total=None)
    servers = []
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            server = Server(args.comfyui, base, "soak", args.python)
            servers.append(server)
            await server.wait_ready(session)
            print(f"soak server up (pid {server.process.pid}); queuing {len(items)} prompts")
            started = time.perf_counter()
            soaked, idle_rss = await run_phase(session, server, base, items, "soak", fresh=False)
            soak_seconds = time.perf_counter() - started
            soak_tracebacks = server.tracebacks()
            server.stop()

            finished = [s for s in items if soaked[s["index"]]["status"] == "execution_success"]
            reference_server = Server(args.comfyui, base, "fresh", args.python)
            servers.append(reference_server)
            await reference_server.wait_ready(session)
            print(f"fresh server up; re-running {len(finished)} finished prompts one at a time, in reverse order")
            fresh, _ = await run_phase(session, reference_server, base, list(reversed(finished)), "fresh", fresh=True)
            fresh_tracebacks = reference_server.tracebacks()
    finally:
        for s in servers:
            s.stop()

    errors = [i for i, r in soaked.items() if r["status"] == "execution_error"]
    errors += [i for i, r in fresh.items() if r["status"] != "execution_success"]
    cancels = [s["index"] for s in items if s["cancel"]]
    interrupted = [i for i in cancels if soaked[i]["status"] == "execution_interrupted"]
    mid_sampling = [i for i in interrupted
                    if soaked[i]["runs"] and "-" in "".join(soaked[i]["runs"][-1]["actual"].values())]
    uncancelled_wrong = [i for i, r in soaked.items() if not r["settings"]["cancel"] and r["status"] != "execution_success"]
    stale, max_diff, compared, cached_steps = [], 0.0, 0, 0
    for s in finished:
        i = s["index"]
        a, b = soaked[i]["file"], fresh[i]["file"]
        if a is None or b is None:
            errors.append(i)
            continue
        x, y = load_latent(a), load_latent(b)
        compared += 1
        if x.shape != y.shape or not torch.equal(x, y):
            stale.append(i)
            if x.shape == y.shape:
                max_diff = max(max_diff, float((x - y).abs().max()))
        run = soaked[i]["runs"][-1] if soaked[i]["runs"] else None
        if run is not None:
            cached_steps += sum(a.count("R") + a.count("S") for a in run["actual"].values())
    rss_first, rss_last = idle_rss.get("first", idle_rss["last"]), idle_rss["last"]
    growth = rss_last / rss_first - 1.0
    busy = [soaked[i]["rss"] for i in range(min(RSS_AFTER, len(items) - 1), len(items))]
    lines = [
        f"ComfyUI {args.comfyui}; {len(items)} prompts in {soak_seconds:.0f} s "
        f"(models: tiny Wan 2.1 and PixArt-Sigma via UNETLoader; CPU)",
        f"errors: {len(errors)} {sorted(set(errors)) or ''}; tracebacks in server logs: soak {soak_tracebacks}, "
        f"fresh {fresh_tracebacks}",
        f"stale reuse: {len(stale)} of {compared} finished outputs differ from a fresh run "
        f"(bitwise comparison){f'; max |diff| {max_diff:.3g}' if stale else ''} {stale or ''}",
        f"cached (reuse/selective) steps across the finished prompts: {cached_steps}",
        f"cancels: {len(cancels)} sent at step {CANCEL_AT} of {CANCEL_STEPS}, {len(interrupted)} interrupted, "
        f"{len(mid_sampling)} of them mid-sampling (ProCache run shows unrun steps); "
        f"prompts that should have finished but did not: {len(uncancelled_wrong)}",
        f"server RSS, idle, after prompt {RSS_AFTER}: {rss_first / 2**20:.1f} MiB, after prompt {len(items)}: "
        f"{rss_last / 2**20:.1f} MiB ({growth * 100:+.2f} %); while busy, prompts {RSS_AFTER + 1}..{len(items)}: "
        f"{min(busy) / 2**20:.0f}..{max(busy) / 2**20:.0f} MiB",
    ]
    print("\n".join(lines))
    if not args.keep:
        import shutil
        shutil.rmtree(base, ignore_errors=True)
    ok = not errors and not stale and abs(growth) <= 0.05 and not uncancelled_wrong
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="a ComfyUI checkout")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON") or sys.executable,
                        help="the Python that runs the server (one with that ComfyUI's requirements)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary base directory (logs, latents)")
    parser.add_argument("--write-models", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "main.py")):
        parser.error("--comfyui (or COMFYUI_PATH) must point at a ComfyUI checkout")
    args.comfyui = os.path.abspath(os.path.expanduser(args.comfyui))
    if args.write_models:
        write_models(args.comfyui, args.write_models)
        return 0
    why = server_check.problem(args.comfyui, args.python)
    if why:
        parser.error(why)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
