"""The shipped workflows against a real ComfyUI's node definitions, and the ones whose models can
be built tiny run end to end through ComfyUI's own executor.

Node definitions come from ComfyUI itself: `nodes.init_extra_nodes` loads comfy_extras (as the
server does at start-up), and the pack's nodes are registered from its `comfy_entrypoint`. Every
UI workflow (example_workflows/*.json, also the templates) and API workflow (workflows/api/*.json)
is checked for: known node types, every widget value valid for its type, range and options (combo
values that name model files are exempt: nobody has the files here), links whose output type
matches the input type, every required input given, and the UI and API files describing the same
graph.
"""
from __future__ import annotations

import asyncio
import glob
import inspect
import json
import os

import pytest

import comfy_env

pytestmark = pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")

ROOT = comfy_env.PACK_ROOT
UI_FILES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))     # also the templates
API_FILES = sorted(glob.glob(os.path.join(ROOT, "workflows", "api", "*.json")))
FRONTEND_ONLY = {"Note", "MarkdownNote"}          # frontend nodes, never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODEL_FILE_ENDINGS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin", ".gguf", ".sft")
_infos: dict = {}


# ---- node definitions, as the server builds /object_info ---------------------------------------
def node_infos() -> dict:
    if _infos:
        return _infos
    comfy_env.load_comfy()
    import nodes
    from comfy_api.internal import _ComfyNodeInternal
    kwargs = {"init_custom_nodes": False}
    if "init_api_nodes" in inspect.signature(nodes.init_extra_nodes).parameters:
        kwargs["init_api_nodes"] = False
    asyncio.run(nodes.init_extra_nodes(**kwargs))
    pack = comfy_env.load_pack()
    extension = asyncio.run(pack.comfy_entrypoint())
    for cls in asyncio.run(extension.get_node_list()):
        nodes.NODE_CLASS_MAPPINGS[cls.GET_SCHEMA().node_id] = cls
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if issubclass(cls, _ComfyNodeInternal):
            _infos[name] = cls.GET_NODE_INFO_V1()
        else:
            types = cls.INPUT_TYPES()
            _infos[name] = {"input": types, "input_order": {k: list(v) for k, v in types.items()},
                            "output": list(cls.RETURN_TYPES),
                            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
                            "category": getattr(cls, "CATEGORY", "sd")}
    return _infos


def spec_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]


def spec_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec) -> bool:
    return spec_type(spec) in WIDGET_TYPES and not spec_options(spec).get("forceInput", False)


def has_control(name: str, spec) -> bool:
    """The frontend adds a 'control after generate' widget after seeds."""
    return spec_type(spec) == "INT" and spec_options(spec).get("control_after_generate", False)


def widget_inputs(info: dict) -> list[tuple[str, tuple, bool]]:
    """(name, spec, is_control) in the order of a UI node's widgets_values."""
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info["input_order"].get(section, []):
            spec = specs[name]
            if is_widget(spec):
                out.append((name, spec, False))
                if has_control(name, spec):
                    out.append((name, spec, True))
    return out


def value_problem(name: str, spec, value) -> str | None:
    kind, options = spec_type(spec), spec_options(spec)
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}={value!r} is not an integer"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name}={value!r} is not a number"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not text"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    elif kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], (list, tuple)) else options.get("options", [])
        if isinstance(value, str) and value.lower().endswith(MODEL_FILE_ENDINGS):
            return None                     # a model file: the list depends on the user's models folder
        return None if value in choices else f"{name}={value!r} is not one of {list(choices)[:12]}"
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            return f"{name}={value} is below its minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{name}={value} is above its maximum {options['max']}"
    return None


def types_match(output_type: str, input_type: str) -> bool:
    if "*" in (output_type, input_type):
        return True
    return output_type in input_type.split(",") or input_type == output_type


def all_specs(info: dict) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


# ---- checking one UI workflow ---------------------------------------------------------------------------
def model_list_problems(where: str, node: dict, texts: list[str]) -> list[str]:
    """The frontend's workflow schema requires name, directory and url for each entry of a node's
    properties.models (one without a url fails the whole file with an alert), and its missing-models
    dialog lists only the files named there: so every model file a widget names must be listed."""
    models = node.get("properties", {}).get("models", [])
    problems = [f"{where}: model entry {m.get('name')!r} lacks {key}" for m in models
                for key in ("name", "directory", "url") if not m.get(key)]
    problems += [f"{where}: model entry {m['name']!r} has no https download address: {m['url']!r}"
                 for m in models if m.get("url") and not str(m["url"]).startswith("https://")]
    listed = {m.get("name") for m in models}
    problems += [f"{where}: model file {text!r} is not in properties.models"
                 for text in texts if text.lower().endswith(MODEL_FILE_ENDINGS) and text not in listed]
    return problems


def ui_problems(doc: dict, infos: dict) -> list[str]:
    problems = []
    nodes = {n["id"]: n for n in doc["nodes"]}
    if doc.get("version") != 0.4:
        problems.append(f"version {doc.get('version')} (the 0.8.0 frontend writes 0.4)")
    if len(nodes) != len(doc["nodes"]):
        problems.append("duplicate node ids")
    links = {link[0]: link for link in doc["links"]}
    if max(nodes) > doc["last_node_id"] or (links and max(links) > doc["last_link_id"]):
        problems.append("last_node_id/last_link_id below an id in use")
    for node in doc["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY:
            if not (node.get("widgets_values") and isinstance(node["widgets_values"][0], str)):
                problems.append(f"{where}: a note without text")
            continue
        info = infos.get(node["type"])
        if info is None:
            problems.append(f"{where}: no such node type in this ComfyUI")
            continue
        specs = all_specs(info)
        expected = widget_inputs(info)
        values = node.get("widgets_values", [])
        if len(values) != len(expected):
            problems.append(f"{where}: {len(values)} widget values, the node has {len(expected)} widgets")
            continue
        problems += model_list_problems(where, node, [v for v in values if isinstance(v, str)])
        for (name, spec, control), value in zip(expected, values):
            if control:
                if value not in CONTROL_VALUES:
                    problems.append(f"{where}: control after generate {value!r}")
                continue
            problem = value_problem(name, spec, value)
            if problem:
                problems.append(f"{where}: {problem}")
        linked = {inp["name"] for inp in node.get("inputs", []) if inp.get("link") is not None}
        for name in info["input_order"].get("required", []):
            if not is_widget(info["input"]["required"][name]) and name not in linked:
                problems.append(f"{where}: required input {name} is not connected")
        for slot, inp in enumerate(node.get("inputs", [])):
            if inp["name"] not in specs:
                problems.append(f"{where}: input {inp['name']} does not exist")
            elif inp.get("link") is not None:
                link = links.get(inp["link"])
                if link is None or link[3] != node["id"] or link[4] != slot:
                    problems.append(f"{where}: input {inp['name']} names link {inp['link']}, which does not end here")
        for slot, output in enumerate(node.get("outputs", [])):
            for link_id in output.get("links") or []:
                link = links.get(link_id)
                if link is None or link[1] != node["id"] or link[2] != slot:
                    problems.append(f"{where}: output {slot} names link {link_id}, which does not start here")
    for link_id, origin, origin_slot, target, target_slot, type_ in doc["links"]:
        where = f"link {link_id}"
        if origin not in nodes or target not in nodes:
            problems.append(f"{where}: joins a node that does not exist")
            continue
        source_info, target_info = infos.get(nodes[origin]["type"]), infos.get(nodes[target]["type"])
        if source_info is None or target_info is None:
            continue
        if origin_slot >= len(source_info["output"]):
            problems.append(f"{where}: {nodes[origin]['type']} has no output {origin_slot}")
            continue
        output_type = source_info["output"][origin_slot]
        output_type = output_type if isinstance(output_type, str) else "COMBO"
        target_inputs = nodes[target].get("inputs", [])
        if target_slot >= len(target_inputs):
            problems.append(f"{where}: {nodes[target]['type']} has no input slot {target_slot}")
            continue
        input_name = target_inputs[target_slot]["name"]
        input_type = spec_type(all_specs(target_info)[input_name]) if input_name in all_specs(target_info) else "?"
        if not (types_match(output_type, input_type) and type_ == output_type):
            problems.append(f"{where}: {nodes[origin]['type']} gives {output_type} (link says {type_}), "
                            f"{nodes[target]['type']}.{input_name} takes {input_type}")
    return problems


def ui_to_api(doc: dict, infos: dict) -> dict:
    """What the frontend sends for a UI workflow (the widget values by name, links as [id, slot])."""
    links = {link[0]: link for link in doc["links"]}
    prompt = {}
    for node in doc["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = infos[node["type"]]
        inputs = {}
        for (name, _, control), value in zip(widget_inputs(info), node["widgets_values"]):
            if not control:
                inputs[name] = value
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def api_problems(prompt: dict, infos: dict) -> list[str]:
    problems = []
    for node_id, node in prompt.items():
        where = f"node {node_id} ({node['class_type']})"
        info = infos.get(node["class_type"])
        if info is None:
            problems.append(f"{where}: no such node type in this ComfyUI")
            continue
        specs = all_specs(info)
        for name in info["input_order"].get("required", []):
            if name not in node["inputs"]:
                problems.append(f"{where}: required input {name} missing")
        for name, value in node["inputs"].items():
            if name not in specs:
                problems.append(f"{where}: input {name} does not exist")
                continue
            spec = specs[name]
            if isinstance(value, list):
                source = prompt.get(value[0])
                if source is None or source["class_type"] not in infos:
                    problems.append(f"{where}: {name} comes from missing node {value[0]}")
                    continue
                outputs = infos[source["class_type"]]["output"]
                if value[1] >= len(outputs):
                    problems.append(f"{where}: {name} comes from output {value[1]} that does not exist")
                    continue
                output_type = outputs[value[1]] if isinstance(outputs[value[1]], str) else "COMBO"
                if not types_match(output_type, spec_type(spec)):
                    problems.append(f"{where}: {name} takes {spec_type(spec)}, gets {output_type}")
            elif not is_widget(spec):
                problems.append(f"{where}: {name} needs a connection, has the value {value!r}")
            else:
                problem = value_problem(name, spec, value)
                if problem:
                    problems.append(f"{where}: {problem}")
    return problems


@pytest.fixture(scope="module")
def infos():
    return node_infos()


def _load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def test_comfy_every_workflow_has_both_formats_and_one_template():
    assert len(UI_FILES) >= 8
    assert [_stem(p) for p in UI_FILES] == [_stem(p) for p in API_FILES]
    # ComfyUI lists a pack's example_workflows/*.json and workflows/*.json alike as templates:
    # UI files in both places would show every template twice in the browser
    assert glob.glob(os.path.join(ROOT, "workflows", "*.json")) == []
    for path in UI_FILES:                   # the template browser's card picture, same name
        assert os.path.isfile(path[:-len(".json")] + ".jpg"), path


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_comfy_ui_workflow_is_valid(infos, path):
    doc = _load(path)
    assert ui_problems(doc, infos) == []
    types = [n["type"] for n in doc["nodes"]]
    assert {"ProCacheScheduleLoader", "ProCacheHarmoniCaRouterTrainer"} & set(types) and "ProCacheApply" in types
    assert any(t in FRONTEND_ONLY for t in types), "each workflow carries a note on its model files"


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_comfy_api_workflow_is_valid_and_matches_ui(infos, path):
    prompt = _load(path)
    assert api_problems(prompt, infos) == []
    ui = _load(os.path.join(ROOT, "example_workflows", os.path.basename(path)))
    stripped = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}
    assert ui_to_api(ui, infos) == stripped
    # ComfyUI's own validation (what POST /prompt runs) objects only to model files nobody has here
    import execution
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("procache-check", prompt, None))
    objections = {(node["class_type"], e["type"], e["extra_info"].get("input_name"),
                   str(e["extra_info"].get("received_value")))
                  for node in node_errors.values() for e in node["errors"]}
    assert (valid and outputs) or objections
    assert all(kind == "value_not_in_list" and value.endswith(MODEL_FILE_ENDINGS)
               for _, kind, _, value in objections), objections


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_comfy_schedule_text_reproduces_the_run(infos, path):
    """The schedule is carried as text and matches the sampler's step count."""
    prompt = _load(path)
    from procache_comfyui.nodes.schedule_loader import build_schedule
    loaders = [n for n in prompt.values() if n["class_type"] == "ProCacheScheduleLoader"]
    trainers = [n["inputs"] for n in prompt.values() if n["class_type"] == "ProCacheHarmoniCaRouterTrainer"]
    assert loaders or trainers
    samplers = [n for n in prompt.values() if n["class_type"] in ("KSampler", "KSamplerAdvanced")]
    for loader in loaders:
        inputs = loader["inputs"]
        assert inputs["source"] == "typed pattern"
        schedule = build_schedule(**inputs)
        assert {s["inputs"]["steps"] for s in samplers} == {schedule.steps} == {inputs["steps"]}
    for trainer in trainers:        # a router is trained for the sampler it will run with
        for key in ("steps", "cfg", "sampler_name", "scheduler"):
            assert {s["inputs"][key] for s in samplers} == {trainer[key]}, key


def test_comfy_checker_catches_broken_workflows(infos):
    """The checks above can fail: a wrong combo value, a value out of range, a mistyped link."""
    doc = _load(os.path.join(ROOT, "example_workflows", "procache_flux_dev_t2i.json"))
    nodes = {n["type"]: n for n in doc["nodes"]}
    nodes["KSampler"]["widgets_values"][4] = "no_such_sampler"
    nodes["ProCacheApply"]["widgets_values"][1] = 1.5
    vae_link = next(l for l in doc["links"] if l[5] == "VAE")
    vae_link[5] = "MODEL"
    problems = ui_problems(doc, infos)
    assert any("no_such_sampler" in p for p in problems)
    assert any("end_percent=1.5 is above" in p for p in problems)
    assert any(f"link {vae_link[0]}" in p for p in problems)
    del nodes["UNETLoader"]["properties"]["models"][0]["url"]
    assert any("lacks url" in p for p in ui_problems(doc, infos))
    nodes["UNETLoader"]["properties"]["models"] = []
    assert any("flux1-dev.safetensors' is not in properties.models" in p for p in ui_problems(doc, infos))
    del nodes["ProCacheApply"]["widgets_values"][-1]
    assert any("widget values" in p for p in ui_problems(doc, infos))


# ---- end to end: the API graphs through ComfyUI's executor, with tiny models ----------------------------
# UNETLoader loads tiny PixArt and Wan transformers written to a temporary diffusion_models folder
# (shaped so ComfyUI's own model detection recognises them). FLUX's detection fixes the width at
# 3072 (SD3.5 ships as a whole checkpoint, Qwen-Image's width is fixed too), so those graphs get a
# tiny model of the same class from a stand-in loader node instead. Text encoders and VAEs
# cannot be built tiny (their configs are fixed): text-encode nodes are replaced by a node that
# gives conditioning of the right shape, and the decode/save tail by a node that keeps the latent.
# Everything between (model sampling shift, FluxGuidance, ConditioningZeroOut, the ProCache nodes,
# KSampler / KSamplerAdvanced) runs as shipped, with the shipped step counts and schedules.
# (width, height) in pixels. PixArt's position embedding needs (H + W) / 2 >= 40 latent pixels; a
# 2 x 80 latent meets that with 40 tokens.
# The router trainer's image-error proxy samples the whole run once per step (steps^2 model calls):
# a graph with a trainer runs with fewer steps (20 -> 8: about 6x less work), trainer and sampler alike.
ROUTER_STEPS = 8
TINY_PX = {"pixart": (16, 640), "flux": (128, 128), "wan": (64, 64), "sd3": (128, 128), "qwen_image": (128, 128)}
END_TO_END = {
    "procache_pixart_sigma_t2i": "pixart_sigma",
    "procache_pixart_sigma_eoc_t2i": "pixart_sigma",
    "procache_pixart_sigma_router_t2i": "pixart_sigma",
    "procache_pixart_alpha_t2i": "pixart_alpha",
    "procache_flux_dev_t2i": "flux",
    "procache_flux_schnell_t2i": "flux",
    "procache_wan21_t2v": "wan",
    "procache_wan22_t2v": "wan",
    "procache_sd35_t2i": "sd3",
    "procache_qwen_image_t2i": "qwen_image",
}
STAND_IN_MODELS = ("flux", "sd3", "qwen_image")     # loaded by ProCacheTestTinyModel
SINK: list = []


class TinyConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["pixart", "pixart_alpha", "flux", "wan", "sd3", "qwen_image"],),
                             "seed": ("INT", {"default": 0}),
                             "width": ("INT", {"default": 0}), "height": ("INT", {"default": 0})}}
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, family, seed, width, height):
        import torch
        gen = torch.Generator().manual_seed(seed)
        if family in ("flux", "sd3"):
            return ([[torch.randn(1, 6, 32, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen)}]],)
        if family == "qwen_image":
            return ([[torch.randn(1, 6, 32, generator=gen), {}]],)
        extra = {"width": width, "height": height} if family == "pixart_alpha" else {}
        return ([[torch.randn(1, 8 if family.startswith("pixart") else 5, 4096, generator=gen), extra]],)


class TinyModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(STAND_IN_MODELS),), "seed": ("INT", {"default": 0})}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, seed):
        if family == "flux":
            return (comfy_env.make_patcher(family, seed),)
        import comfy_families
        return (comfy_families.make_patcher(family, seed),)


class LatentSink:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}
    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def keep(self, samples):
        SINK.append(samples["samples"].clone())
        return {}


def _tiny_unet_state_dict(kind: str, seed: int):
    """A PixArt or Wan transformer small enough for a test, shaped so ComfyUI's detection reads it back."""
    import torch
    import comfy.supported_models as sm
    if kind == "wan":
        cls, config = comfy_env.tiny_config("wan")
    else:       # detection fixes PixArt's width (1152) and heads (16); one block keeps it small
        alpha = kind == "pixart_alpha"
        cls = sm.PixArtAlpha if alpha else sm.PixArtSigma
        config = {"image_model": kind, "hidden_size": 1152, "num_heads": 16, "depth": 1, "patch_size": 2,
                  "in_channels": 4, "model_max_length": 8, "micro_condition": alpha}
    model_config = cls(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.diffusion_model.state_dict().items():
        state[key] = (torch.randn(value.shape, generator=gen) * 0.02).to(torch.float16) \
            if value.is_floating_point() else value
    return state


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, infos):
    """Tiny transformers under the file names the workflows name, in a registered diffusion_models folder."""
    import torch
    import folder_paths
    import nodes
    import comfy.utils
    folder = tmp_path_factory.mktemp("diffusion_models")
    for stem, kind in END_TO_END.items():
        if kind in STAND_IN_MODELS:
            continue
        prompt = _load(os.path.join(ROOT, "workflows", "api", f"{stem}.json"))
        for i, node in enumerate(n for n in prompt.values() if n["class_type"] == "UNETLoader"):
            name = node["inputs"]["unet_name"]
            state = _tiny_unet_state_dict(kind, seed=len(name) + i)
            if name.endswith(".pth"):
                torch.save(state, folder / name)
            else:
                comfy.utils.save_torch_file(state, str(folder / name))
    folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
    folder_paths.filename_list_cache.clear()
    nodes.NODE_CLASS_MAPPINGS.update({"ProCacheTestConditioning": TinyConditioning,
                                      "ProCacheTestTinyModel": TinyModelLoader, "ProCacheTestLatentSink": LatentSink})
    yield folder
    for name in ("ProCacheTestConditioning", "ProCacheTestTinyModel", "ProCacheTestLatentSink"):
        nodes.NODE_CLASS_MAPPINGS.pop(name, None)


def tiny_graph(prompt: dict, kind: str, cached: bool = True) -> dict:
    """The API graph with the substitutions above; cached=False bypasses every ProCache Apply."""
    prompt = json.loads(json.dumps(prompt))
    family = "pixart" if kind.startswith("pixart") else kind
    width, height = TINY_PX[family]
    for node_id, node in list(prompt.items()):
        t, inputs = node["class_type"], node["inputs"]
        if t in ("CLIPTextEncode", "CLIPTextEncodePixArtAlpha"):
            prompt[node_id] = {"class_type": "ProCacheTestConditioning",
                               "inputs": {"family": kind if kind != "pixart_sigma" else "pixart",
                                          "seed": int(node_id), "width": width, "height": height}}
        elif t in ("UNETLoader", "CheckpointLoaderSimple") and family in STAND_IN_MODELS:
            prompt[node_id] = {"class_type": "ProCacheTestTinyModel", "inputs": {"family": family, "seed": 0}}
        elif t in ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo"):
            inputs.update(width=width, height=height)
            if "length" in inputs:
                inputs["length"] = 9
        elif t == "VAEDecode":
            prompt[node_id] = {"class_type": "ProCacheTestLatentSink", "inputs": {"samples": inputs["samples"]}}
        elif t == "ProCacheHarmoniCaRouterTrainer":     # two trajectories; random weights need a strong beta
            inputs.update(iterations=2 * ROUTER_STEPS, beta=1.0, learning_rate=1.0, lambda_period=1000)
    if any(n["class_type"] == "ProCacheHarmoniCaRouterTrainer" for n in prompt.values()):
        for node in prompt.values():        # the trainer and its sampler keep the same step count
            if "steps" in node["inputs"]:
                node["inputs"]["steps"] = ROUTER_STEPS
    if not cached:
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and prompt[value[0]]["class_type"] == "ProCacheApply":
                    node["inputs"][name] = prompt[value[0]]["inputs"]["model"]
    # keep what the sink needs (drops the loaders of text encoders and VAEs, and the save nodes)
    keep, todo = set(), [k for k, n in prompt.items() if n["class_type"] == "ProCacheTestLatentSink"]
    while todo:
        node_id = todo.pop()
        if node_id not in keep:
            keep.add(node_id)
            todo += [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
    return {k: v for k, v in prompt.items() if k in keep}


class _Server:
    """What ComfyUI's executor needs from the server when nobody is listening."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


def run_graph(prompt: dict):
    import execution
    valid = asyncio.run(execution.validate_prompt("procache-test", prompt, None))
    assert valid[0], (valid[1], valid[3])
    SINK.clear()
    # built as main.py builds it (the keyword changed between versions)
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:
        executor = execution.PromptExecutor(_Server(), cache_args={"lru": 0, "ram": 0})
    else:
        executor = execution.PromptExecutor(_Server())
    executor.execute(prompt, "procache-test", {}, valid[2])
    assert executor.success, executor.status_messages[-1:]
    assert len(SINK) == 1
    return SINK[0]


@pytest.mark.parametrize("stem", list(END_TO_END))
def test_comfy_workflow_runs_end_to_end_with_tiny_models(tiny_models, stem, monkeypatch):
    import torch
    from procache_comfyui.nodes.runtime import LAST_RUNS
    from procache_comfyui.nodes.schedule_loader import build_schedule
    kind = END_TO_END[stem]
    prompt = _load(os.path.join(ROOT, "workflows", "api", f"{stem}.json"))
    applies = [n for n in prompt.values() if n["class_type"] == "ProCacheApply"]
    loader = next((n for n in prompt.values() if n["class_type"] == "ProCacheScheduleLoader"), None)
    schedule = build_schedule(**loader["inputs"]) if loader else None

    runs = []
    publish = LAST_RUNS.publish
    monkeypatch.setattr(LAST_RUNS, "publish", lambda summary: (runs.append(summary), publish(summary)))
    tiny = tiny_graph(prompt, kind)
    cached = run_graph(tiny)
    monkeypatch.setattr(LAST_RUNS, "publish", publish)
    # an EOC Prior Extractor samples the graph at full compute first, one run per seed
    extractors = [n["inputs"] for n in prompt.values() if n["class_type"] == "ProCacheEOCPriorExtractor"]
    extraction = [r for r in runs if r.get("schedule") == "EOC prior extraction"]
    assert len(extraction) == sum(e["samples"] for e in extractors)
    runs = [r for r in runs if r.get("schedule") != "EOC prior extraction"]
    assert torch.isfinite(cached).all()
    if stem == "procache_wan21_t2v":        # one uncached run for comparison is enough (and cheap here)
        plain = run_graph(tiny_graph(prompt, kind, cached=False))
        assert cached.shape == plain.shape
        assert not torch.equal(cached, plain), "the cached graph computed exactly what the plain one did"
    assert len(runs) == len(applies)            # one ProCache run per sampler (two for Wan 2.2's experts)
    if schedule is None:                        # a router trained in the graph: its units ran
        (run,) = runs
        steps = next(n["inputs"]["steps"] for n in tiny.values() if n["class_type"] == "KSampler")
        assert len(run["planned"]) == steps and run["counts"]["reuse"] > 0
        assert run["schedule"] == "harmonica-router"
        assert any(share is not None and 0 < share < 1 for share in run["compute_share"])     # steps with only some units computed
        return
    apply = applies[0]["inputs"]
    expected = schedule.windowed(apply["start_percent"], apply["end_percent"], apply["force_last_full"]).pattern
    planned = "".join(run["planned"] for run in runs)
    assert len(planned) == len(expected)
    starts = {sum(len(r["planned"]) for r in runs[:i]) for i in range(len(runs))}
    # each sampler's slice of the schedule; a slice's first step is full (nothing cached yet)
    assert all(p == e or (i in starts and p == "1") for i, (p, e) in enumerate(zip(planned, expected)))
    for run in runs:
        assert run["mode"] != "model-level", run["mode"]       # block-level families
        actual = next(iter(run["actual"].values()))
        assert run["counts"]["reuse"] > 0 and actual.count("F") < len(actual)


def test_comfy_apply_forecasts_with_taylor_1_unless_a_connected_node_or_its_input_says_otherwise(tiny_models):
    """Apply's forecast input through ComfyUI's own executor (which leaves an unlinked optional input
    out): with nothing linked, "taylor 1" runs what a linked ProCache Forecaster set to taylor 1 runs,
    and an API prompt that predates the input gets the same; "none", and a linked Forecaster set to
    reuse (its link carries None), run plain reuse."""
    import torch
    prompt = tiny_graph(_load(os.path.join(ROOT, "workflows", "api", "procache_pixart_sigma_t2i.json")),
                        "pixart_sigma")
    apply_id = next(k for k, n in prompt.items() if n["class_type"] == "ProCacheApply")

    def run(forecast=None, linked_source=None):
        graph = json.loads(json.dumps(prompt))
        inputs = graph[apply_id]["inputs"]
        inputs.pop("forecast")
        if forecast is not None:
            inputs["forecast"] = forecast
        if linked_source is not None:
            graph["900"] = {"class_type": "ProCacheForecaster", "inputs": {"source": linked_source}}
            inputs["forecaster"] = ["900", 0]
        return run_graph(graph)

    taylor = run("taylor 1")
    plain = run("none")
    assert not torch.equal(taylor, plain), "the default forecast computed what plain reuse did"
    assert torch.equal(run(), taylor)                                    # an older API prompt: the default
    assert torch.equal(run("none", linked_source="taylor 1"), taylor)    # the linked node decides
    assert torch.equal(run("taylor 1", linked_source="reuse (no forecast)"), plain)


def test_comfy_pack_nodes_are_namespaced_and_documented(infos):
    """What the node library shows: ids and categories under ProCache, a description, and a
    tooltip on every input and output."""
    from procache_comfyui.nodes import NODES
    gaps = []
    for cls in NODES:
        schema = cls.GET_SCHEMA()
        info = infos[schema.node_id]
        if not schema.node_id.startswith("ProCache"):
            gaps.append(f"{schema.node_id}: id not prefixed with ProCache")
        if not info["category"].startswith("ProCache/"):
            gaps.append(f"{schema.node_id}: category {info['category']!r} is not under ProCache/")
        if not info.get("description"):
            gaps.append(f"{schema.node_id}: no description")
        for name, spec in all_specs(info).items():
            if not spec_options(spec).get("tooltip"):
                gaps.append(f"{schema.node_id}.{name}: no tooltip")
        for name, tooltip in zip(info["output_name"], info.get("output_tooltips") or [None] * len(info["output"])):
            if not tooltip:
                gaps.append(f"{schema.node_id} output {name}: no tooltip")
    assert gaps == []


def test_comfy_registry_metadata_is_complete():
    """The fields the Comfy Registry requires, a changelog entry for the version, a square icon."""
    import tomllib
    from PIL import Image
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert project["name"] and "comfyui" not in project["name"].lower() and len(project["name"]) < 100
    assert all(part.isdigit() for part in project["version"].split("."))
    assert project["description"] and project["license"] and project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"].startswith(">=")
    assert comfy["Icon"].endswith("docs/icon.png")
    with Image.open(os.path.join(ROOT, "docs", "icon.png")) as icon:
        assert icon.width == icon.height <= 400
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
        assert f"## {project['version']} " in f.read()
