"""Can this Python start a ComfyUI server? The modules ComfyUI's main.py imports at start, found from
its source, checked in the Python that will run it, with the install command for what is missing.

ComfyUI's requirements.txt does not list everything its server imports (0.8.0 imports `requests` in
app/frontend_management.py), so a server started from a fresh environment can die on a bare
ModuleNotFoundError. The tests and benchmarks that start a server call this first.

    python tests/server_check.py [COMFYUI_PATH] [--python PYTHON]    # exit 1 and the fix if not
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

# Import names whose pip package is named otherwise.
PIP_NAMES = {"PIL": "Pillow", "yaml": "pyyaml", "cv2": "opencv-python", "skimage": "scikit-image",
             "sklearn": "scikit-learn", "google": "protobuf"}
MISSING_MODULE = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")


def _local_file(root: str, dotted: str) -> str | None:
    """The file of a module that lives in the ComfyUI tree, or None."""
    base = os.path.join(root, *dotted.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _is_local(root: str, top: str) -> bool:
    """A top-level name of ComfyUI's own: a module, a package, or a folder without __init__.py."""
    return _local_file(root, top) is not None or os.path.isdir(os.path.join(root, top))


def _imported_names(path: str, package: str) -> list[str]:
    """Modules imported by statements at module level, unconditionally (not under try/if/def):
    those must import for the module itself to import."""
    with open(path, encoding="utf-8", errors="replace") as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:       # relative: resolve against the importing package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                prefix = ".".join(p for p in parts if p)
                module = ".".join(p for p in (prefix, node.module or "") if p)
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names if module]   # `from pkg import submodule`
    return [n for n in names if n]


def start_imports(comfyui: str) -> list[str]:
    """Third-party top-level modules that ComfyUI's main.py needs, following its own modules."""
    stdlib = set(sys.stdlib_module_names)
    seen, third_party, todo = set(), set(), ["main", "server"]
    while todo:
        dotted = todo.pop()
        if dotted in seen:
            continue
        seen.add(dotted)
        path = _local_file(comfyui, dotted)
        if path is None:
            top = dotted.split(".")[0]
            if top not in stdlib and not _is_local(comfyui, top):
                third_party.add(top)
            continue
        package = dotted if path.endswith("__init__.py") else dotted.rpartition(".")[0]
        todo += [n for n in _imported_names(path, package) if n not in seen]
    return sorted(third_party - {"__future__"})


def missing_modules(python: str, modules: list[str]) -> list[str]:
    """The modules `python` cannot find (found without importing them: fast, no side effects)."""
    code = ("import importlib.util, json, sys\n"
            "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
    done = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def install_hint(python: str, modules: list[str]) -> str:
    packages = " ".join(PIP_NAMES.get(m, m) for m in modules)
    return f"{python} -m pip install {packages}"


def problem(comfyui: str, python: str = sys.executable) -> str | None:
    """Why `python` cannot start the ComfyUI at `comfyui`, with the fix; None when it can."""
    missing = missing_modules(python, start_imports(comfyui))
    if not missing:
        return None
    return (f"ComfyUI's server ({comfyui}) imports {', '.join(repr(m) for m in missing)} at start, which "
            f"{python} does not have: install with `{install_hint(python, missing)}`")


def explain_start_failure(log: str, python: str = sys.executable) -> str | None:
    """The fix for a server that died on a missing module, read from its log; None for other causes."""
    found = MISSING_MODULE.findall(log)
    if not found:
        return None
    module = found[-1].split(".")[0]
    return (f"ComfyUI's server stopped at start: no module named {module!r} in {python}. "
            f"Install it with `{install_hint(python, [module])}`")


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comfyui", nargs="?", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--python", default=os.environ.get("COMFYUI_PYTHON") or sys.executable,
                        help="the Python that will run the server")
    args = parser.parse_args(argv)
    if not args.comfyui or not os.path.isfile(os.path.join(args.comfyui, "main.py")):
        parser.error("give the ComfyUI checkout (or set COMFYUI_PATH)")
    why = problem(args.comfyui, args.python)
    print(why or f"{args.python} has every module ComfyUI's server at {args.comfyui} imports at start")
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
