"""The README's demo (benchmarks/demo.py): runs without ComfyUI and prints figures that agree with each other."""
import os
import re
import subprocess
import sys

import pytest
import torch

from benchmarks import demo
from procache_core import Schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<wall>\d+\.\d+)\s+(?P<wallx>\d+\.\d+)x\s+(?P<flops>\d+\.\d+)x\s+"
                 r"(?P<absdiff>\d+\.\d+)\s+(?P<psnr>\d+\.\d+)$")


def table(text):
    return {m["name"]: {k: float(v) for k, v in m.groupdict().items() if k != "name"}
            for m in map(ROW.match, text.splitlines()) if m}


@pytest.fixture(scope="module")
def printed():
    import io
    import contextlib

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = demo.main(["--steps", "12", "--samples", "4", "--repeats", "1"])
    return out.getvalue(), result


def test_figures_agree_with_the_schedule(printed):
    text, result = printed
    rows = table(text)
    assert list(rows) == ["full compute", "all-full schedule", "ProCache schedule, reuse only",
                          "ProCache schedule + selective"]
    with open(os.path.join(ROOT, "schedules", "procache-dit-50-17full.json"), encoding="utf-8") as f:
        expected = Schedule.from_json(f.read()).resampled(12)
    schedule = result["schedule"]
    assert schedule.kinds == expected.kinds
    theoretical = expected.theoretical_speedup()
    assert f"theoretical speedup {theoretical:.2f}x" in text
    assert f"pattern:  {expected.pattern}" in text

    # Selective steps recomputing no tokens: the counted block work is exactly the step-count ratio.
    assert result["rows"]["ProCache schedule, reuse only"]["flops_speedup"] == pytest.approx(theoretical, rel=1e-9)
    assert rows["ProCache schedule, reuse only"]["flops"] == pytest.approx(theoretical, abs=0.006)
    # Recomputed tokens cost something, but much less than full steps.
    selective = result["rows"]["ProCache schedule + selective"]["flops_speedup"]
    assert 0.8 * theoretical < selective < theoretical

    # The engine with every step full changes nothing; reuse changes the images a little.
    for name in ("full compute", "all-full schedule"):
        assert rows[name]["absdiff"] == 0.0 and rows[name]["psnr"] == 100.0 and rows[name]["flops"] == 1.0
    for name in ("ProCache schedule, reuse only", "ProCache schedule + selective"):
        assert 0.0 < result["rows"][name]["max_abs"] < 2.0
        assert 10.0 < rows[name]["psnr"] < 100.0


def test_printed_figures_are_the_returned_ones(printed):
    text, result = printed
    rows = table(text)
    base = rows["full compute"]["wall"]
    assert rows["full compute"]["wallx"] == 1.0
    for name, row in rows.items():
        got = result["rows"][name]
        assert row["wall"] == pytest.approx(got["wall_seconds"], abs=6e-4)
        assert row["wallx"] == pytest.approx(got["wall_speedup"], abs=6e-3)
        assert row["flops"] == pytest.approx(got["flops_speedup"], abs=6e-3)
        assert row["psnr"] == pytest.approx(got["psnr"], abs=6e-3)
        # wall x is the ratio of the printed wall times (up to their rounding)
        assert row["wallx"] == pytest.approx(base / row["wall"], rel=0.05, abs=0.02)


def test_demo_restores_the_thread_count(printed):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)          # the suite runs on one thread: start from another count
    try:
        demo.main(["--steps", "3", "--samples", "1", "--repeats", "1", "--threads", "1"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_runs_as_a_script_from_elsewhere(tmp_path):
    # What the README says: `python benchmarks/demo.py`; sys.path must not depend on the working folder.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "demo.py"), "--steps", "4",
                           "--samples", "2", "--repeats", "1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "trained reference DiT" in done.stdout
    assert len(table(done.stdout)) == 4
