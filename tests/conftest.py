"""Shared test setup: says loudly how many ComfyUI integration tests were skipped."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)           # `import procache_core` without installing the pack

_NO_COMFY = "no ComfyUI"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs torch on one thread, restored afterwards. The models are tiny: a second thread
    gains nothing, and on a busy two-core machine threads waiting for each other made single ops ten
    times slower (one EOC extraction test: 21 s with two threads, 1.8 s with one)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    without_comfy = [r for r in skipped if _NO_COMFY in str(getattr(r, "longrepr", ""))]
    if without_comfy:
        terminalreporter.write_sep("!", f"SKIPPED {len(without_comfy)} ComfyUI integration tests: "
                                        "set COMFYUI_PATH to a ComfyUI checkout to run them", red=True)
    elif os.environ.get("COMFYUI_PATH"):
        terminalreporter.write_line(f"ComfyUI integration tests ran against {os.environ['COMFYUI_PATH']}")
