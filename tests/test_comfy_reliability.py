"""Reliability inside a real ComfyUI: untrusted names and files, read-only routes, wrong sockets,
non-DiT models, out of memory while caching, cancels and model unloads. (Exceptions inside a block
and the first cancel and path tests are in test_comfy_faults.py.)"""
import asyncio
import gc
import json
import logging
import os
import weakref

import pytest
import torch

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

PATTERN = "1,0,0,1,0,2"
GOOD_DOC = '{"format": "procache.schedule", "version": 1, "pattern": [1, 0, 1]}'
SDXL_TINY = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "channel_mult": [1, 2],
             "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
             "num_head_channels": 16, "transformer_depth_output": [0, 0, 1, 1], "use_temporal_attention": False,
             "use_temporal_resblock": False}


@pytest.fixture(scope="module")
def pack():
    comfy_env.load_pack()
    import procache_comfyui
    return procache_comfyui


def _apply(pack, mp, pattern=PATTERN, cache_on_cpu=False, memory_budget="auto"):
    from procache_comfyui.procache_core import parse_pattern
    return pack.nodes.apply_node.ProCacheApply.execute(mp, parse_pattern(pattern), 0.0, 1.0, False, cache_on_cpu,
                                                       memory_budget=memory_budget)


def _no_instance_forwards(mp):
    return [name for name, m in mp.model.diffusion_model.named_modules() if "forward" in m.__dict__]


# ---- names and files --------------------------------------------------------------------------
@pytest.fixture
def user_folder(pack, tmp_path, monkeypatch):
    from procache_comfyui.nodes import library
    folder = tmp_path / "user" / "procache" / "schedules"
    folder.mkdir(parents=True)
    monkeypatch.setattr(library, "user_dir", lambda: str(folder))
    return folder


def test_links_out_of_the_user_folder_are_not_listed(pack, user_folder, tmp_path):
    from procache_comfyui.nodes import library
    from procache_comfyui.procache_core import ScheduleError
    outside = tmp_path / "outside.json"
    outside.write_text(GOOD_DOC)
    (user_folder / "mine.json").write_text(GOOD_DOC)
    os.symlink(outside, user_folder / "escape.json")
    os.symlink(user_folder / "mine.json", user_folder / "alias.json")    # a link that stays inside is fine
    os.symlink(tmp_path, user_folder / "dir.json")
    names = library.listing()
    assert "user/mine" in names and "user/alias" in names
    assert "user/escape" not in names and "user/dir" not in names
    for name in ["user/escape", "user/dir", str(outside), str(outside)[:-5], "file://" + str(outside)]:
        with pytest.raises(ScheduleError, match="no schedule named"):
            library.load(name)
    assert library.load("user/alias").pattern == "101"


@pytest.mark.parametrize("name", ["..\\..\\secret", "user\\..\\..\\secret", "C:\\secret", "C:secret",
                                  "\\\\server\\share\\secret", "user/..\\secret", "user/./secret",
                                  "user//secret", "user/secret\x00", "USER/secret", "~/secret", "%APPDATA%\\secret"])
def test_windows_and_odd_names_never_resolve(pack, user_folder, tmp_path, name):
    from procache_comfyui.nodes import library
    from procache_comfyui.procache_core import ScheduleError
    (tmp_path / "secret.json").write_text(GOOD_DOC)
    (tmp_path / "user" / "secret.json").write_text(GOOD_DOC)
    with pytest.raises(ScheduleError, match="no schedule named"):
        library.load(name)
    with pytest.raises(ScheduleError, match="letters, digits"):
        library.save_user(library.load("procache-dit-50-17full"), name)
    assert (tmp_path / "secret.json").read_text() == GOOD_DOC


def _writers():
    """(kind folder, file suffix, save(name) as the node saves it, the error it raises) per writer."""
    from procache_comfyui.nodes import eoc_node, forecaster_node, library, router_node
    from procache_comfyui.procache_core import ScheduleError
    from procache_comfyui.procache_core.eoc import EOCError, Prior
    from procache_comfyui.procache_core.forecast import ForecastError, Taylor
    from procache_comfyui.procache_core.router import Router
    prior = Prior("channel", {(0, 0, (0, "attn")): torch.ones(4)}, {(0, 0, (0, "attn")): 1})
    return {
        "schedule search": ("schedules", ".json", lambda name: library.save_user(library.load("procache-dit-50-17full"), name),
                            ScheduleError),
        "forecaster trainer": ("forecasters", ".json", lambda name: forecaster_node._save(name, Taylor(1).to_json()),
                               ForecastError),
        "eoc prior extractor": ("eoc_priors", ".safetensors", lambda name: eoc_node._save(name, prior), EOCError),
        "router trainer": ("routers", ".safetensors", lambda name: router_node._save(name, Router.initial(3, 2)),
                           ScheduleError),
    }


WRITERS = ["schedule search", "forecaster trainer", "eoc prior extractor", "router trainer"]


@pytest.mark.parametrize("writer", WRITERS)
def test_saving_never_writes_through_a_link(pack, user_folder, tmp_path, writer):
    kind, suffix, save, error = _writers()[writer]
    folder = user_folder.parent / kind
    folder.mkdir(exist_ok=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    # a dangling link named like the file to save, and one to a file that exists
    os.symlink(outside / "planted", folder / f"dangling{suffix}")
    (outside / "victim").write_text("keep me")
    os.symlink(outside / "victim", folder / f"existing{suffix}")
    for name in ("dangling", "existing"):
        with pytest.raises(error, match="symbolic link"):
            save(name)
    assert not (outside / "planted").exists() and (outside / "victim").read_text() == "keep me"
    assert sorted(os.listdir(folder)) == [f"dangling{suffix}", f"existing{suffix}"]   # no temporary left behind
    # a plain name saves a plain file in the folder, readable as before
    path = save("mine")
    assert path == str(folder / f"mine{suffix}") and not os.path.islink(path) and os.path.getsize(path) > 0
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("writer", WRITERS)
def test_saving_refuses_a_kind_folder_that_is_a_link_out(pack, user_folder, tmp_path, writer):
    kind, suffix, save, error = _writers()[writer]
    folder = user_folder.parent / kind
    if folder.exists():
        folder.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, folder)
    with pytest.raises(error, match="symbolic link"):
        save("mine")
    assert os.listdir(elsewhere) == []


def test_bad_user_files_are_clear_errors_and_hide_nothing_else(pack, user_folder):
    from procache_comfyui.nodes import library, runtime
    from procache_comfyui.nodes.schedule_loader import ProCacheScheduleLoader
    (user_folder / "good.json").write_text(GOOD_DOC)
    (user_folder / "binary.json").write_bytes(b"\x80\x04\x95\x00\xff pickled")
    (user_folder / "broken.json").write_text('{"format": "procache.schedule", ')
    (user_folder / "router.json").write_text(json.dumps(
        {"format": "procache.schedule", "version": 1, "pattern": [1, 0, 1], "units": ["11", "01"]}))
    (user_folder / "future.json").write_text(GOOD_DOC.replace('"version": 1', '"version": 3'))
    (user_folder / "huge.json").write_text(GOOD_DOC[:-1] + ', "pad": "' + " " * library.MAX_FILE_BYTES + '"}')
    patterns = runtime._library_patterns()
    assert patterns["user/good"] == "101"
    expected = {"binary": "not UTF-8 text", "broken": "not valid JSON", "router": "unit table has 2 rows",
                "future": "version 3 is not supported", "huge": "larger than 1 MiB"}
    for stem, message in expected.items():
        assert patterns[f"user/{stem}"].startswith("error: ") and message in patterns[f"user/{stem}"], stem
        # the Loader refuses it at validation, with the same message, before anything runs
        problem = ProCacheScheduleLoader.validate_inputs(f"user/{stem}", "", 3, 0, False)
        assert isinstance(problem, str) and message in problem


def test_schedule_of_another_length_is_resampled_to_the_run(pack):
    """A 6-step pattern on a 9-step sampler run: resampled (a note says so), never indexed past its end."""
    from procache_comfyui.nodes.runtime import LAST_RUNS
    patched = _apply(pack, comfy_env.make_patcher("wan")).result[0]
    out = comfy_env.sample(patched, "wan", steps=9)
    run = LAST_RUNS.latest()
    assert torch.isfinite(out).all() and len(run["planned"]) == 9
    assert any("resampled from 6 to 9 steps" in note for note in run["notes"])


# ---- server routes ----------------------------------------------------------------------------
def test_routes_are_read_only_and_take_no_paths(pack, tmp_path, monkeypatch):
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer
    from procache_comfyui.nodes import events, runtime
    secret = tmp_path / "secret.json"
    secret.write_text('{"format": "procache.schedule", "version": 1, "pattern": [1, 2, 2, 2, 2, 2, 2, 2, 1], '
                      '"name": "SECRET-CONTENT"}')

    class Server:
        routes = web.RouteTableDef()
    monkeypatch.setattr(events, "_server", lambda: Server)
    assert events.register_routes(runtime.LAST_RUNS, runtime._library_patterns)
    registered = [(r.method, r.path) for r in Server.routes]
    assert sorted(registered) == [("GET", events.ROUTE), ("GET", events.SCHEDULES_ROUTE)]
    assert all("{" not in path for _, path in registered)       # no path parameters at all

    async def probe():
        app = web.Application()
        app.add_routes(Server.routes)
        async with TestClient(TestServer(app)) as client:
            baseline = {}
            for route in (events.ROUTE, events.SCHEDULES_ROUTE):
                r = await client.get(route)
                assert r.status == 200
                baseline[route] = await r.json()
                for query in (f"?path={secret}", f"?name={secret}", f"?file=..%2F..%2F{secret.name}",
                              f"?source=user/../{secret}", f"?schedule={secret}"):
                    r = await client.get(route + query)
                    body = await r.text()
                    assert r.status == 200 and "SECRET-CONTENT" not in body and "122222221" not in body
                    assert json.loads(body) == baseline[route]     # the query string changes nothing
                for method in ("post", "put", "delete", "patch"):
                    r = await getattr(client, method)(route, data=json.dumps({"path": str(secret)}))
                    assert r.status == 405
            r = await client.get(events.SCHEDULES_ROUTE + "/" + str(secret))
            assert r.status == 404
            return baseline
    baseline = asyncio.run(probe())
    assert "procache-dit-50-17full" in baseline[events.SCHEDULES_ROUTE]


# ---- wrong socket types (what ComfyUI validates from the V3 schema) ----------------------------
class _ModelSource:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing"


class _ModelSink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"


@pytest.fixture(scope="module")
def registered_nodes(pack):
    import nodes
    extension = asyncio.run(pack.comfy_entrypoint())
    added = {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}
    added.update({"ReliabilityModelSource": _ModelSource, "ReliabilityModelSink": _ModelSink})
    nodes.NODE_CLASS_MAPPINGS.update(added)
    yield
    for name in ("ReliabilityModelSource", "ReliabilityModelSink"):
        nodes.NODE_CLASS_MAPPINGS.pop(name, None)


def _graph(**apply_inputs):
    apply = {"model": ["1", 0], "schedule": ["2", 0], "start_percent": 0.0, "end_percent": 1.0,
             "force_last_full": False, "cache_on_cpu": False}
    apply.update(apply_inputs)
    return {"1": {"class_type": "ReliabilityModelSource", "inputs": {}},
            "2": {"class_type": "ProCacheScheduleLoader",
                  "inputs": {"source": "typed pattern", "pattern": "1,0,0,1", "interval": 3, "steps": 0,
                             "selective": False}},
            "3": {"class_type": "ProCacheApply", "inputs": apply},
            "4": {"class_type": "ReliabilityModelSink", "inputs": {"model": ["3", 0]}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}


def _errors(prompt):
    import execution
    valid, _, _, node_errors = asyncio.run(execution.validate_prompt("reliability", prompt, None))
    if valid:
        return []
    return [(e["type"], e.get("extra_info", {}).get("input_name")) for e in node_errors["3"]["errors"]]


@pytest.mark.parametrize("inputs, expected", [
    ({"schedule": ["5", 0]}, ("return_type_mismatch", "schedule")),          # a LATENT into the schedule
    ({"model": ["2", 0]}, ("return_type_mismatch", "model")),                # a schedule into the model
    ({"selector": ["2", 0]}, ("return_type_mismatch", "selector")),
    ({"forecaster": ["1", 0]}, ("return_type_mismatch", "forecaster")),
    ({"start_percent": "a lot"}, ("invalid_input_type", "start_percent")),
    ({"end_percent": 1.5}, ("value_bigger_than_max", "end_percent")),
    ({"start_percent": -0.5}, ("value_smaller_than_min", "start_percent")),
    ({"schedule": None}, ("required_input_missing", "schedule")),
])
def test_wrong_socket_types_are_refused_before_running(registered_nodes, inputs, expected):
    assert _errors(_graph()) == []          # the graph itself is valid
    prompt = _graph(**inputs)
    prompt["3"]["inputs"] = {k: v for k, v in prompt["3"]["inputs"].items() if v is not None}
    assert expected in _errors(prompt)


def test_apply_refuses_a_non_schedule_with_a_message(pack):
    from procache_comfyui.procache_core import ScheduleError, parse_pattern
    mp = comfy_env.make_patcher("wan")
    with pytest.raises(ScheduleError, match="connect ProCache Schedule Loader"):
        pack.nodes.apply_node.ProCacheApply.execute(mp, "1,0,0,1", 0.0, 1.0, False, False)
    with pytest.raises(ScheduleError, match="start_percent"):
        pack.nodes.apply_node.ProCacheApply.execute(mp, parse_pattern(PATTERN), 0.8, 0.2, False, False)


# ---- non-DiT models ---------------------------------------------------------------------------
def test_sdxl_unet_passes_through_unchanged_and_samples_as_before(pack, caplog):
    import comfy.model_patcher
    import comfy.supported_models as sm
    cfg = sm.SDXL(dict(SDXL_TINY))
    cfg.set_inference_dtype(torch.float32, None)
    mp = comfy.model_patcher.ModelPatcher(cfg.get_model({}, "", device=torch.device("cpu")),
                                          load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="procache"):
        out = _apply(pack, mp)
    assert out.result[0] is mp
    assert "UNet" in out.result[1] and "unchanged" in out.result[1]
    assert out.ui["mode"] == ["none"] and any("UNet" in r.getMessage() for r in caplog.records)
    from procache_comfyui.nodes.runtime import CONFIG_KEY
    assert CONFIG_KEY not in mp.model_options.get("transformer_options", {})


# ---- out of memory while caching ----------------------------------------------------------------
def _sample_with_callback(patched, family, callback, steps=6):
    import comfy.sample
    lat, pos, neg = comfy_env.latent_and_conds(family)
    noise = comfy.sample.prepare_noise(lat, 0)
    return comfy.sample.sample(patched, noise, steps, 2.0, "euler", "simple", pos, neg, lat, seed=0,
                               disable_pbar=True, callback=callback)


@pytest.mark.parametrize("where", ["cache store", "block"])
def test_out_of_memory_at_the_coarsest_rung_falls_back_to_full_compute(pack, monkeypatch, caplog, where):
    # At the model-level residual there is no coarser rung: the run stops caching and computes the
    # rest in full (test_comfy_memory covers the moves down the ladder from finer rungs).
    from procache_comfyui.nodes import runtime
    from procache_comfyui.procache_core import cache as cache_module
    mp = comfy_env.make_patcher("wan")
    patched = _apply(pack, mp, memory_budget="minimal").result[0]
    runs = []
    start_run = runtime.start_run
    monkeypatch.setattr(runtime, "start_run", lambda *a, **k: runs.append(start_run(*a, **k)) or runs[-1])
    armed = {"on": False, "raised": 0}

    def oom_once():
        if armed["on"]:
            armed["on"] = False
            armed["raised"] += 1
            raise torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 2.00 GiB")
    if where == "cache store":
        put = cache_module.CacheStore.put
        monkeypatch.setattr(cache_module.CacheStore, "put", lambda self, *a, **k: oom_once() or put(self, *a, **k))
        hook = None
    else:       # inside the block, between two cached branches
        hook = mp.model.diffusion_model.blocks[-1].register_forward_pre_hook(lambda m, a: oom_once())

    def arm_after_step_2(step, *args):
        if step == 2:
            armed["on"] = True          # the first model call of step 3 (a full step) runs out of memory
    try:
        with caplog.at_level(logging.WARNING, logger="procache"):
            out = _sample_with_callback(patched, "wan", arm_after_step_2)
    finally:
        if hook is not None:
            hook.remove()
    assert armed["raised"] == 1
    run = runs[-1]
    assert run.closed and len(run.cache) == 0
    assert _no_instance_forwards(mp) == []
    message = [r.getMessage() for r in caplog.records if "out of memory while caching at step 3" in r.getMessage()]
    assert message and "cache_on_cpu" in message[0]
    assert any("out of memory while caching at step 3" in n for n in runtime.LAST_RUNS.latest()["notes"])
    # the panel's record: steps 3..5 computed in full after the out of memory, not "not run"
    latest = runtime.LAST_RUNS.latest()
    assert latest["actual"] and all(letters == "FRRFFF" for letters in latest["actual"].values())
    assert latest["counts"]["full"] == 4 and latest["recovered_at_step"] == 3
    assert latest["compute_share"][3:] == [1.0, 1.0, 1.0]
    # steps 0..2 cached as planned, steps 3..5 computed in full: exactly the run of that schedule
    monkeypatch.undo()
    expected = comfy_env.sample(_apply(pack, comfy_env.make_patcher("wan"), "1,0,0,1,1,1",
                                       memory_budget="minimal").result[0], "wan")
    assert torch.equal(out, expected)
    assert not torch.equal(out, comfy_env.sample(_apply(pack, comfy_env.make_patcher("wan"),
                                                        memory_budget="minimal").result[0], "wan"))


def test_cache_on_cpu_keeps_the_cache_off_the_compute_device(pack, monkeypatch):
    from procache_comfyui.nodes import runtime
    runs = []
    start_run = runtime.start_run
    monkeypatch.setattr(runtime, "start_run", lambda *a, **k: runs.append(start_run(*a, **k)) or runs[-1])
    on_cpu = comfy_env.sample(_apply(pack, comfy_env.make_patcher("wan"), cache_on_cpu=True).result[0], "wan")
    assert runs[-1].cache.device == torch.device("cpu") and runs[-1].stats.cache_bytes_peak > 0
    default = comfy_env.sample(_apply(pack, comfy_env.make_patcher("wan")).result[0], "wan")
    assert runs[-1].cache.device is None
    assert torch.equal(on_cpu, default)
    inputs = pack.nodes.apply_node.ProCacheApply.GET_SCHEMA().inputs
    option = next(i for i in inputs if i.id == "cache_on_cpu")
    assert "RAM" in option.tooltip and option.default is False


# ---- cancel, unload ------------------------------------------------------------------------------
def test_cancel_frees_the_cache_and_keeps_no_run_alive(pack, monkeypatch):
    import comfy.model_management
    from procache_comfyui.nodes import runtime
    mp = comfy_env.make_patcher("wan")
    patched = _apply(pack, mp).result[0]
    seen = []
    start_run = runtime.start_run

    def remember(*a, **k):
        run = start_run(*a, **k)
        seen.append((weakref.ref(run), run.cache))
        return run
    monkeypatch.setattr(runtime, "start_run", remember)

    def cancel_at_step_3(step, *args):
        assert len(seen[-1][1]) > 0         # something was cached before the cancel
        if step == 3:
            raise comfy.model_management.InterruptProcessingException()
    try:
        _sample_with_callback(patched, "wan", cancel_at_step_3)
        raise AssertionError("the run was not cancelled")
    except comfy.model_management.InterruptProcessingException:
        pass
    run_ref, cache = seen[-1]
    assert len(cache) == 0 and cache.nbytes == 0
    gc.collect()
    assert run_ref() is None, gc.get_referrers(run_ref())
    assert runtime.RUN_KEY not in patched.model_options.get("transformer_options", {})
    assert _no_instance_forwards(mp) == []
    monkeypatch.undo()
    assert torch.equal(comfy_env.sample(patched, "wan"),
                       comfy_env.sample(_apply(pack, comfy_env.make_patcher("wan")).result[0], "wan"))


def test_unloading_models_between_runs_and_between_steps(pack):
    import comfy.model_management
    mp = comfy_env.make_patcher("flux")
    patched = _apply(pack, mp).result[0]
    first = comfy_env.sample(patched, "flux")
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    assert torch.equal(comfy_env.sample(patched, "flux"), first)
    unloads = []

    def unload_after_step(step, *args):
        if step in (1, 3):          # after a full step and in the middle of a reuse stretch
            comfy.model_management.unload_all_models()
            unloads.append(step)
    assert torch.equal(_sample_with_callback(patched, "flux", unload_after_step), first)
    assert unloads == [1, 3]
    assert _no_instance_forwards(mp) == []
    fresh = comfy_env.sample(_apply(pack, comfy_env.make_patcher("flux")).result[0], "flux")
    assert torch.equal(first, fresh)


def test_forecaster_links_out_of_their_folder_are_not_listed(pack, user_folder, tmp_path):
    from procache_comfyui.nodes import forecaster_node
    folder = user_folder.parent / "forecasters"
    folder.mkdir()
    (tmp_path / "outside.json").write_text("{}")
    (folder / "mine.json").write_text("{}")
    os.symlink(tmp_path / "outside.json", folder / "escape.json")
    os.symlink(tmp_path, folder / "dir.json")
    assert sorted(forecaster_node.saved_forecasters()) == ["mine"]
