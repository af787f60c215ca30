"""tests/server_check.py: the modules a ComfyUI server imports at start, found from its source."""
import sys

import pytest

import comfy_env
import server_check


@pytest.fixture
def fake_comfy(tmp_path):
    """A ComfyUI-shaped tree: main.py -> server.py -> app/frontend.py -> a third-party module."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "comfy").mkdir()                       # a folder without __init__.py is ComfyUI's too
    (tmp_path / "comfy" / "ops.py").write_text("import json\nimport procache_absent_core\n")
    (tmp_path / "main.py").write_text(
        "import os\nimport comfy.ops\n"
        "try:\n    import procache_absent_optional\nexcept ImportError:\n    pass\n"
        "if __name__ == '__main__':\n    import procache_absent_late\n")
    (tmp_path / "server.py").write_text("from app.frontend import Manager\nfrom PIL import Image\n")
    (tmp_path / "app" / "frontend.py").write_text("from . import helpers\nimport procache_absent_web\nclass Manager: ...\n")
    (tmp_path / "app" / "helpers.py").write_text("import yaml\n")
    return tmp_path


def test_follows_comfyui_modules_to_third_party_imports(fake_comfy):
    # Unconditional module-level imports only: an import under try/if does not stop the server.
    assert server_check.start_imports(str(fake_comfy)) == [
        "PIL", "procache_absent_core", "procache_absent_web", "yaml"]


def test_names_the_missing_modules_and_the_install_command(fake_comfy):
    assert server_check.missing_modules(sys.executable, ["json", "procache_absent_web"]) == ["procache_absent_web"]
    why = server_check.problem(str(fake_comfy))
    assert "'procache_absent_core', 'procache_absent_web'" in why and str(fake_comfy) in why
    assert f"{sys.executable} -m pip install procache_absent_core procache_absent_web" in why
    assert server_check.install_hint("py", ["PIL", "yaml"]) == "py -m pip install Pillow pyyaml"
    assert server_check.main([str(fake_comfy)]) == 1


def test_reads_a_missing_module_from_a_server_log():
    log = ("Traceback (most recent call last):\n  File \"main.py\", line 9\n"
           "ModuleNotFoundError: No module named 'requests.adapters'\n")
    why = server_check.explain_start_failure(log, "py")
    assert "'requests'" in why and "py -m pip install requests" in why
    assert server_check.explain_start_failure("RuntimeError: port in use", "py") is None


@pytest.mark.skipif(comfy_env.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH")
def test_comfy_server_start_imports_include_requests():
    # ComfyUI imports requests (app/frontend_management.py) without listing it in its requirements.
    imports = server_check.start_imports(comfy_env.comfy_path())
    assert {"aiohttp", "requests", "torch"} <= set(imports)
    assert not {"comfy", "comfy_api", "app", "os"} & set(imports)
