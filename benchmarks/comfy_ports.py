"""Installed Spectrum ComfyUI ports as peer rows of benchmarks/comfy_bench.py.

A port is not shipped or required. The custom-node folders of the ComfyUI under test (its own
`custom_nodes` plus any extra paths) are scanned for folders whose name mentions Spectrum (the name
ComfyUI-Manager and `git clone` give both known ports); each is imported with ComfyUI's own
`nodes.load_custom_node`, and its MODEL -> MODEL patch node (one whose id, class or display name
mentions Spectrum first) is the port's peer. Only those folders are imported: loading every custom
node of a user's install would run unrelated packs' import-time code in the benchmark.
"""
from __future__ import annotations

import asyncio
import inspect
import os
import sys
from dataclasses import dataclass

PORT_WORD = "spectrum"


@dataclass(frozen=True)
class PortNode:
    """One installed port's MODEL -> MODEL patch node."""
    folder: str          # the port's folder name, its label in the table
    node_id: str
    node_cls: type

    @property
    def label(self) -> str:
        return f"{self.folder} (installed port, its defaults)"


def add_custom_nodes_path(path: str) -> None:
    """An extra custom-nodes folder, as an `extra_model_paths.yaml` `custom_nodes:` entry adds one,
    so a port can be tried without touching the ComfyUI checkout."""
    import folder_paths
    folder_paths.add_model_folder_path("custom_nodes", os.path.abspath(os.path.expanduser(path)))


def custom_nodes_paths() -> list[str]:
    import folder_paths
    return folder_paths.get_folder_paths("custom_nodes")


def _port_folders() -> list[str]:
    """Folders ComfyUI would load (the same skip rules: .disabled, non-.py files) that name Spectrum."""
    found = []
    for root in custom_nodes_paths():
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(os.path.realpath(root))):
            path = os.path.join(root, name)
            if name.endswith(".disabled") or (os.path.isfile(path) and not name.endswith(".py")):
                continue
            if PORT_WORD in name.lower():
                found.append(path)
    return found


def _load(path: str) -> bool:
    """ComfyUI's own loader (async since 0.4); built-in node ids are not overridden, as in ComfyUI."""
    import nodes
    loaded = nodes.load_custom_node(path, ignore=set(_builtin_ids()), module_parent="custom_nodes")
    return asyncio.run(loaded) if inspect.isawaitable(loaded) else loaded


_BUILTIN_IDS: set[str] = set()


def _builtin_ids() -> set[str]:
    """Node ids registered before the first port is loaded (ComfyUI's and its extras')."""
    if not _BUILTIN_IDS:
        import nodes
        _BUILTIN_IDS.update(nodes.NODE_CLASS_MAPPINGS)
    return _BUILTIN_IDS


def _defined_in(node_cls: type, path: str) -> bool:
    """Whether the node's class comes from the port at `path` (a folder, or a single .py file)."""
    module = sys.modules.get(getattr(node_cls, "__module__", ""), None)
    source = os.path.abspath(getattr(module, "__file__", None) or "")
    path = os.path.abspath(path)
    return source == path or source.startswith(path + os.sep)


def _is_model_patch(node_cls: type) -> bool:
    """One required MODEL input and MODEL as the only output."""
    try:
        required = node_cls.INPUT_TYPES().get("required", {})
        returns = tuple(node_cls.RETURN_TYPES)
    except Exception:       # a node whose schema cannot be read is no candidate
        return False
    models = [name for name, spec in required.items() if spec and spec[0] == "MODEL"]
    return len(models) == 1 and returns == ("MODEL",)


def _mentions_port(node_id: str, node_cls: type) -> bool:
    import nodes
    names = (node_id, node_cls.__name__, nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, ""))
    return any(PORT_WORD in n.lower() for n in names)


def discover(log=print) -> tuple[list[PortNode], list[str]]:
    """(the ports' patch nodes, one line per port folder that gave none)."""
    import nodes
    _builtin_ids()
    ports, problems = [], []
    for path in _port_folders():
        folder = os.path.basename(path.rstrip(os.sep))
        if not _load(path):
            problems.append(f"{folder}: ComfyUI could not import it (see the log above)")
            continue
        candidates = {}
        for node_id, node_cls in nodes.NODE_CLASS_MAPPINGS.items():
            if node_cls not in candidates.values() and _defined_in(node_cls, path) and _is_model_patch(node_cls):
                candidates[node_id] = node_cls
        if not candidates:
            problems.append(f"{folder}: no MODEL -> MODEL patch node")
            continue
        node_id = sorted(candidates, key=lambda i: not _mentions_port(i, candidates[i]))[0]
        ports.append(PortNode(folder, node_id, candidates[node_id]))
        log(f"  port {folder}: node {node_id}")
    return ports, problems


def default_inputs(node_cls: type, model, steps: int) -> dict:
    """The node's declared defaults, the model, and the sampling step count for an INT input named
    `steps` (ports that plan their cached steps ahead ask for it and say it must match the sampler)."""
    types = node_cls.INPUT_TYPES()
    inputs = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            if kind == "MODEL":
                inputs[name] = model
            elif name == "steps" and kind == "INT":
                inputs[name] = steps
            elif "default" in options:
                inputs[name] = options["default"]
            elif isinstance(kind, (list, tuple)) and kind:       # a combo: its first choice
                inputs[name] = kind[0]
            elif kind == "COMBO" and options.get("options"):
                inputs[name] = options["options"][0]
            elif section == "required":
                raise ValueError(f"input {name!r} ({kind}) has no default")
    return inputs


def apply(port: PortNode, model, steps: int):
    """The patched MODEL the port's node returns for `model` at its defaults."""
    cls = port.node_cls
    inputs = default_inputs(cls, model, steps)
    if hasattr(cls, "define_schema"):       # a V3 node: a classmethod `execute` returning NodeOutput
        out = cls.execute(**inputs)
    else:
        out = getattr(cls(), cls.FUNCTION)(**inputs)
    if inspect.isawaitable(out):
        out = asyncio.run(out)
    result = out.get("result") if isinstance(out, dict) else getattr(out, "result", out)
    return result[0]


def short_reason(error: BaseException, limit: int = 200) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"
