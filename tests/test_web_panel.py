"""The web panel in a real browser: a real ComfyUI server (headless, CPU) with the pack installed,
headless Chromium (Debian's `chromium`, driven by playwright-core from tests/web) opens the page.

The server's custom_nodes folder (in a temporary base directory) links to the pack and to
tests/testing_nodes, which build a tiny PixArt-Sigma from ComfyUI's own classes. The page loads
and queues two API graphs through the frontend (app.loadApiJson, app.queuePrompt): one without the
pack's nodes (nothing of ours may appear, and it must still run) and one with Schedule Loader ->
Apply -> KSampler (CFG 2, so two CFG streams). The test checks the Loader's preview strip before
anything runs (also read back from the canvas pixels), the panel's counts per stream against the
schedule and the server's own statistics, the time per step, the speedups and the mode, the strip
on the Apply node, and that the page logged no errors. The screenshot goes to the test's temporary
folder, and to docs/panel.png with PROCACHE_DOCS_SCREENSHOT=1.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import comfy_env
import server_check
from procache_core import StepKind, parse_pattern, uniform
from procache_core.schedule import Schedule, inject_selective

ROOT = comfy_env.PACK_ROOT
WEB_TESTS = os.path.join(ROOT, "tests", "web")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NODE = shutil.which("node")
PATTERN = "[1,0,2,0]x3"          # 12 steps: 3 full, 3 selective, 6 reused
STEPS = 12
MISMATCH_STEPS = 8               # a sampler set to another step count than the schedule's
CANCEL_STEPS, CANCEL_AT_STEP = 40, 4     # a longer run, interrupted from the page after its 5th step
BAD_PATTERN_ERROR = "the pattern may only contain 0, 1, 2, commas and [group]xN"     # for "1,0,0,x"
PLAN_TEXT = "cache in VRAM: 120 MiB of 8 GiB free"      # a plan line as the run summary carries it
DOCS_TEMPLATE = "procache_pixart_sigma_t2i.json"
TEMPLATES = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))


# The Python that runs the server: this one, or COMFYUI_PYTHON (e.g. a virtual environment that holds
# an older ComfyUI's own requirements).
SERVER_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
PINNED = ("comfyui-frontend-package", "comfyui-workflow-templates")    # the server needs these exact ones


def _unmet_pins(root: str) -> list[str]:
    """ComfyUI's `==` pins on its frontend packages that SERVER_PYTHON does not have."""
    pins = {}
    path = os.path.join(root, "requirements.txt")
    with open(path) if os.path.isfile(path) else open(os.devnull) as f:
        for line in f:
            name, _, version = line.strip().partition("==")
            if name in PINNED and version:
                pins[name] = version
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(p):\n try: return m.version(p)\n except Exception: return None\n"
            "print(json.dumps({p: v(p) for p in sys.argv[1:]}))")
    found = json.loads(subprocess.run([SERVER_PYTHON, "-c", code, *pins], capture_output=True, text=True,
                                      check=True).stdout)
    return [f"{name}=={want} (found {found[name]})" for name, want in pins.items() if found[name] != want]


def _why_skip() -> str | None:
    if comfy_env.comfy_path() is None:
        return "no ComfyUI: set COMFYUI_PATH"
    unmet = _unmet_pins(comfy_env.comfy_path())
    if unmet:
        return (f"the ComfyUI server at {comfy_env.comfy_path()} needs {', '.join(unmet)} in {SERVER_PYTHON}; "
                "set COMFYUI_PYTHON to a Python that has its requirements")
    if not os.path.isfile(CHROMIUM):
        return "no chromium: apt-get install -y chromium"
    if NODE is None:
        return "no node: apt-get install -y nodejs npm"
    if not os.path.isdir(os.path.join(WEB_TESTS, "node_modules", "playwright-core")):
        return "no playwright-core: run `npm ci` in tests/web"
    return None


SKIP_REASON = _why_skip()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A ComfyUI server on a free port, with the pack and the test nodes in its custom_nodes."""
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    # A returning user: no first-run template browser over the canvas. The two canvas settings are
    # what the default navigation mode sets; frontend 1.27 sets them while registering that mode,
    # before they exist, and throws (its own error, on every page load) unless they are stored.
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({
        "Comfy.TutorialCompleted": True, "Comfy.Canvas.LeftMouseClickBehavior": "panning",
        "Comfy.Canvas.MouseWheelScroll": "zoom", "Comfy.Minimap.Visible": False}))
    os.symlink(ROOT, base / "custom_nodes" / "procache")
    os.symlink(os.path.join(ROOT, "tests", "testing_nodes"), base / "custom_nodes" / "procache_testing_nodes")
    missing = server_check.problem(comfy_env.comfy_path(), SERVER_PYTHON)
    if missing:
        pytest.fail(missing)
    port = _free_port()
    log_path = base / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [SERVER_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", str(base), "--disable-auto-launch", "--disable-api-nodes",
             "--database-url", "sqlite:///:memory:"],
            cwd=comfy_env.comfy_path(), stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"})      # tiny tensors: threads only add overhead
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                info = _get(url + "/object_info/ProCacheApply")
                if "ProCacheApply" in info:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                log = log_path.read_text()
                why = server_check.explain_start_failure(log, SERVER_PYTHON) or "ComfyUI did not start"
                pytest.fail(f"{why}\n{log[-4000:]}")
            time.sleep(0.5)
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _graphs() -> tuple[dict, dict]:
    """(without the pack, with the pack), in ComfyUI's API format."""
    plain = {
        "1": {"class_type": "ProCacheTestTinyPixArt", "inputs": {"seed": 0}},
        "2": {"class_type": "ProCacheTestTinyConditioning", "inputs": {"seed": 1}},
        "3": {"class_type": "ProCacheTestTinyConditioning", "inputs": {"seed": 2}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 384, "height": 384, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 7, "steps": STEPS, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "ProCacheTestLatentSink", "inputs": {"samples": ["5", 0]}},
    }
    cached = json.loads(json.dumps(plain))
    cached["7"] = {"class_type": "ProCacheScheduleLoader", "inputs": {
        "source": "typed pattern", "pattern": PATTERN, "interval": 3, "steps": 0, "selective": False}}
    cached["8"] = {"class_type": "ProCacheApply", "inputs": {
        "model": ["1", 0], "schedule": ["7", 0], "start_percent": 0.0, "end_percent": 1.0,
        "force_last_full": False, "cache_on_cpu": False}}
    cached["5"]["inputs"]["model"] = ["8", 0]
    return plain, cached


def _docs_graph() -> dict:
    """The README picture's run: the PixArt template's schedule and step count, on the tiny model."""
    template = json.load(open(os.path.join(ROOT, "workflows", "api", DOCS_TEMPLATE)))
    loader = next(n for n in template.values() if n["class_type"] == "ProCacheScheduleLoader")
    sampler = next(n for n in template.values() if n["class_type"] == "KSampler")
    _, graph = _graphs()
    graph["7"]["inputs"].update(loader["inputs"])
    graph["5"]["inputs"].update(steps=sampler["inputs"]["steps"], cfg=sampler["inputs"]["cfg"])
    return graph


def _letters(schedule: Schedule) -> str:
    return "".join({StepKind.FULL: "F", StepKind.SELECTIVE: "S", StepKind.REUSE: "R"}[k] for k in schedule.kinds)


def _preview_cases(library: dict[str, str]) -> list[tuple[dict, str]]:
    """Loader widget settings and the schedule procache_core builds for them (as F/S/R)."""
    name = sorted(library)[0]
    from_library = Schedule(kinds=tuple(int(c) for c in library[name]), name=name)
    cases = [
        ({"source": "uniform interval", "interval": 3, "steps": 10, "selective": False}, uniform(10, 3)),
        ({"source": "uniform interval", "interval": 4, "steps": 13, "selective": True},
         Schedule(kinds=tuple(inject_selective(uniform(13, 4).kinds)), name="u")),
        ({"source": "typed pattern", "pattern": "1,0,0,2,0", "steps": 0, "selective": False},
         parse_pattern("1,0,0,2,0")),
        ({"source": name, "steps": 0, "selective": False}, from_library),
        ({"source": name, "steps": 30, "selective": False}, from_library.resampled(30)),
        ({"source": name, "steps": 7, "selective": True},
         from_library.with_kinds(inject_selective(from_library.kinds)).resampled(7)
         if StepKind.SELECTIVE not in from_library.kinds else from_library.resampled(7)),
    ]
    out = []
    for values, schedule in cases:
        values = {"pattern": "", "interval": 3, **values}
        out.append((values, _letters(schedule)))
    return out + [({"source": "typed pattern", "pattern": "1,0,0,x", "interval": 3, "steps": 0, "selective": False}, "")]


def _tracebacks(log: str) -> list[list[str]]:
    """The 'File ...' lines of each traceback in a log."""
    found = []
    for block in log.split("Traceback (most recent call last):")[1:]:
        frames = []
        for line in block.splitlines()[1:]:
            if not line.startswith(" "):
                break
            if line.lstrip().startswith("File "):
                frames.append(line)
        found.append(frames)
    return found


def test_comfy_panel_in_a_real_browser(server, tmp_path):
    url, server_log = server
    library = _get(url + "/procache/schedules")
    cases = _preview_cases(library)
    plain, cached = _graphs()
    report_path = tmp_path / "report.json"
    screenshot = tmp_path / "panel.png"
    # The README's picture is refreshed only on request (PROCACHE_DOCS_SCREENSHOT=1), so a test run
    # leaves the checkout as it found it.
    shots = [str(screenshot)]
    cancel_shots, docs_shots = [str(tmp_path / "panel-cancelled.png")], [str(tmp_path / "panel-template.png")]
    if os.environ.get("PROCACHE_DOCS_SCREENSHOT") == "1":
        docs_shots.append(os.path.join(ROOT, "docs", "panel.png"))
        cancel_shots.append(os.path.join(ROOT, "docs", "panel-cancelled.png"))
    spec = {"url": url, "chromium": CHROMIUM, "user_data_dir": str(tmp_path / "chromium-profile"),
            "screenshots": shots, "plain_prompt": plain, "cached_prompt": cached,
            "preview_cases": [values for values, _ in cases], "report": str(report_path),
            "failure_screenshot": str(tmp_path / "failure.png"),
            "mismatch_steps": MISMATCH_STEPS, "cancel_steps": CANCEL_STEPS, "cancel_at_step": CANCEL_AT_STEP,
            "cancel_screenshots": cancel_shots, "docs_screenshots": docs_shots, "docs_template": DOCS_TEMPLATE,
            "docs_prompt": _docs_graph(), "plan_text": PLAN_TEXT,
            "templates": [{"name": os.path.basename(path), "doc": json.load(open(path))} for path in TEMPLATES]}
    (tmp_path / "input.json").write_text(json.dumps(spec))
    done = subprocess.run([NODE, os.path.join(WEB_TESTS, "panel_test.mjs"), str(tmp_path / "input.json")],
                          cwd=WEB_TESTS, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    assert "script_error" not in report, report["script_error"] + "\nsteps: " + str(report["steps"])

    # the page logged nothing wrong; requests the frontend makes for optional user files (user.css,
    # saved workflows, templates) and to the internet (release notes) may fail, ours may not
    assert report["page_errors"] == []
    ours = [r for r in report["failed_requests"] if "procache" in r["url"].lower()]
    assert ours == []
    # (the missing-models dialog asks the model hosts for file sizes, which the page's policy blocks)
    errors = [c for c in report["console"] if c["type"] == "error"
              and not (c["text"].startswith("Failed to load resource") and "procache" not in c["url"].lower())
              and not ("https://huggingface.co/" in c["text"] and "Content Security Policy" in c["text"])
              and not c["text"].startswith("Error fetching file size: TypeError: Failed to fetch")]
    assert errors == [], errors
    assert not [c for c in report["console"] if "procache" in (c["text"] + c["url"]).lower()]

    # a graph without the pack's nodes: nothing of ours, and it ran
    assert report["default_graph"]["nodes"] > 0 and report["default_graph"]["strips"] == 0
    assert report["default_graph"]["panel_elements"] == 0
    assert report["plain_result"]["ok"], report["plain_result"]
    assert report["plain_graph"] == {"strips": 0, "events": 0, "panel_elements": 0}

    # the Loader's preview before anything ran: the typed pattern, as text and as pixels
    expected = _letters(parse_pattern(PATTERN))
    preview = {w["node"]: w["value"] for w in report["preview"]["widgets"]}
    assert preview["ProCacheScheduleLoader"] == expected == "FRSR" * 3
    assert preview["ProCacheApply"] == ""                     # no run yet
    assert report["preview"]["pixels"]["letters"] == expected
    for (values, want), got in zip(cases, report["preview_cases"]):
        assert got["value"] == want, values
        # the Loader shows only the widgets its source uses
        assert got["hidden"] == {"typed pattern": ["interval"], "uniform interval": ["pattern"]}.get(
            values["source"], ["interval", "pattern"]), values
    # an error in full (wrapped over lines on the node, never cut), with no strip
    error = report["preview_cases"][-1]
    assert error["value"] == "" and error["text"] == f"error: {BAD_PATTERN_ERROR}"
    assert "No ProCache run yet" in report["panel_before"]

    # the run: the panel against the schedule and the server's statistics
    assert report["cached_result"]["ok"], report["cached_result"]
    latest = report["last_run"]         # GET /procache/last_run right after this run
    schedule = parse_pattern(PATTERN)
    counts = {"full": schedule.count(StepKind.FULL), "selective": schedule.count(StepKind.SELECTIVE),
              "reused": schedule.count(StepKind.REUSE)}
    assert counts == {"full": 3, "selective": 3, "reused": 6}
    assert len(report["panel"]) == 1
    run = report["panel"][0]
    assert run["mode"] == latest["mode"] == "branch:pixart"
    assert latest["status"] == "complete" == run["status"] and latest["steps_run"] == STEPS
    # in a user's words: the model as ComfyUI names it, the schedule, how much faster and the time saved
    assert run["title"] == f"{latest['model']} · {latest['schedule']}" and latest["model"] == "PixArtSigma"
    assert run["headline"] == latest["headline"]
    assert re.fullmatch(r"about \d+\.\dx faster, sampling \d+(\.\d)? s \(about \d+(\.\d)? s without\)", run["headline"])
    assert "stream" not in run["text"] and "PixArtMS" not in run["text"] and "(?)" not in run["text"]
    assert not run["details_open"] and "each block's attention and MLP cached separately" in run["details"]
    assert sorted(s["name"] for s in run["streams"]) == list(latest["actual"]) == ["stream 0", "stream 1"]  # CFG
    assert [s["label"] for s in run["streams"]] == ["positive", "negative"]
    assert all(s["label"] == latest["stream_labels"][s["name"]] for s in run["streams"])
    for stream in run["streams"]:
        # the strip's tooltip counts each kind and says what its colour means
        assert stream["tooltip"].startswith(f"{stream['label']}: 3 full (blue) · 3 selective (amber") and "6 reused" in stream["tooltip"]
        # a selective step's share of the work is never rounded away to 0%
        for kind, title in zip(stream["cells"], stream["cell_titles"]):
            if kind == "S":
                assert "selective" in title and " 0% " not in title and "of the block work computed" in title
        assert {k: stream[k] for k in counts} == counts, stream
        assert stream["cells"] == latest["actual"][stream["name"]] == expected
        # the share of block work each step ran: full 1, reuse 0, selective in between
        shares = [float(x) for x in stream["shares"]]
        assert shares == pytest.approx([x for x in latest["compute_share"]], abs=1e-4)
        assert all((k == "F") == (x == 1.0) and (k == "R") == (x == 0.0) for k, x in zip(expected, shares))
    seconds = [float(s) for s in run["seconds"]]
    assert len(seconds) == STEPS and all(s > 0 for s in seconds)
    assert seconds == pytest.approx(latest["seconds_per_step"], abs=1e-6)
    assert float(run["schedule"]) == pytest.approx(schedule.theoretical_speedup(), abs=1e-4)  # the report rounds to 4 places
    # measured: every step at the median full step's time, plus the time outside the model, over the wall time
    full = sorted(s for s, k in zip(seconds, expected) if k == "F")
    without = latest["sampling_seconds"] - sum(seconds) + full[len(full) // 2] * STEPS
    assert float(run["measured"]) == pytest.approx(without / latest["sampling_seconds"], rel=1e-3)
    assert latest["sampling_seconds"] >= sum(seconds) - 1e-3
    # while running, the title names the model and the schedule and the headline counts the steps
    # (read after each step event; the page may render two events at once, so some steps go unread)
    live = [re.fullmatch(rf"{latest['model']} · {latest['schedule']} \| running: step (\d+) of {STEPS}", t)
            for t in report["live_titles"]]
    assert len(live) >= 3 and all(live), report["live_titles"]
    numbers = [int(m.group(1)) for m in live]
    assert numbers == sorted(numbers) and numbers[0] <= 2

    # the Apply node shows its report on the node, as the server sent it, and does not save it
    node_report = report["node_report"]
    assert node_report["shown"] == node_report["sent"] and "theoretical speedup" in node_report["shown"]
    assert f"made for a {STEPS}-step sampler" in node_report["shown"] and not node_report["serialized"]
    # live events: one per step, then the summary
    assert [e["step"] for e in report["events"] if e["type"] == "procache.step"] == list(range(STEPS))
    assert [e["type"] for e in report["events"]][-1] == "procache.run"

    # the Apply node's strip shows the run it fed
    apply = {w["node"]: w["value"] for w in report["apply_strip"]["widgets"]}
    assert apply["ProCacheApply"] == expected
    assert report["apply_strip"]["pixels"]["letters"] == expected

    # the HarmoniCa trainer's beta keeps the authors' 7e-8 in the browser, and it has its router widget
    trainer = report["router_trainer"]
    assert trainer.get("beta") == pytest.approx(7e-8, rel=1e-6) and trainer["router_widget"], trainer

    # the sampler set to another step count: a warning on the node before the run, in the panel after it
    before = report["mismatch_before"]
    assert before["text"].startswith(f"warning: the sampler is set to {MISMATCH_STEPS} steps, this schedule has {STEPS}")
    assert report["mismatch_result"]["ok"]
    warned = report["mismatch_panel"][-1]
    assert warned["warning"].startswith(f"the sampler ran {MISMATCH_STEPS} steps, but the schedule was made for {STEPS}")
    assert report["matched_after"]["text"] == ""                # sampler and Loader agree again

    # a cancelled run: marked, over the steps that ran, steps never run shown as such, also after a reload
    assert report["cancel_result"].get("interrupted"), report["cancel_result"]
    cancelled = report["cancelled_run"]
    ran = cancelled["steps_run"]
    assert cancelled["status"] == "cancelled" and CANCEL_AT_STEP < ran < CANCEL_STEPS
    shown = report["cancel_panel"][-1]
    assert shown["status"] == "cancelled" and shown["headline"] == cancelled["headline"]
    assert shown["headline"].startswith(f"cancelled after {ran} of {CANCEL_STEPS} steps; over those: about")
    assert float(shown["measured"]) == pytest.approx(cancelled["speedup"])
    ran_planned = cancelled["planned"][:ran]
    assert float(shown["schedule"]) == pytest.approx(ran / ran_planned.count("1"), abs=1e-4)
    assert shown["seconds"][ran:] == [""] * (CANCEL_STEPS - ran)
    assert all(t.endswith(": not run") for t in shown["bar_titles"][ran:]) and "(?)" not in shown["text"]
    assert f"over the {ran} steps that ran" in shown["details"]
    assert report["reload_panel"] == [{"status": "cancelled", "headline": cancelled["headline"]}]

    # every shipped template opens without an alert and names every model file it needs
    assert [t["name"] for t in report["templates"]] == [os.path.basename(p) for p in TEMPLATES]
    for template, path in zip(report["templates"], TEMPLATES):
        assert template["alerts"] == [] and template["toasts"] == [], template
        files = {m["name"] for node in json.load(open(path))["nodes"]
                 for m in node.get("properties", {}).get("models", [])}
        assert files and all(any(name in item for item in template["missing"]) for name in files), template

    assert report["docs_result"]["ok"], report["docs_result"]
    assert f"cache plan: {PLAN_TEXT}" in report["plan_panel"]["details"]
    assert report["cancel_panel"][-1]["details"].count("cache plan") == 1     # the run's own plan, once
    assert all(os.path.getsize(path) > 10000 for path in shots + cancel_shots + docs_shots)
    # no traceback in the server's log; one exception: SQLAlchemy's garbage collector may report a
    # connection of ComfyUI's own database finalised from another thread (frames all in SQLAlchemy)
    assert [t for t in _tracebacks(server_log.read_text().split("Starting server")[-1])
            if not all("/sqlalchemy/" in frame for frame in t)] == []
