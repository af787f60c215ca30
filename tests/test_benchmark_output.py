"""Benchmarks write their reports to a git-ignored scratch folder unless --out names another, so
trying one never overwrites the tracked figures in benchmarks/results."""
import argparse
import ast
import glob
import os

from benchmarks.output import RESULTS, ROOT, SCRATCH, add_out_option


def test_out_defaults_to_the_ignored_scratch_folder():
    parser = argparse.ArgumentParser()
    add_out_option(parser)
    assert parser.parse_args([]).out == SCRATCH != RESULTS
    with open(os.path.join(ROOT, ".gitignore"), encoding="utf-8") as f:
        assert "/" + os.path.relpath(SCRATCH, ROOT) + "/" in f.read().split()


def test_no_benchmark_defaults_to_the_tracked_results():
    # Every --out of a benchmark that writes reports comes from add_out_option (training scripts,
    # which write weights or a router where asked, are not reports).
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
        outs = [call for call in ast.walk(tree) if isinstance(call, ast.Call)
                and getattr(call.func, "attr", "") == "add_argument" and call.args
                and isinstance(call.args[0], ast.Constant) and call.args[0].value == "--out"]
        name = os.path.basename(path)
        if name in ("output.py", "train_reference.py", "train_reference_flux.py", "train_router.py", "judge.py"):
            continue
        assert not outs, f"{name}: --out must come from benchmarks.output.add_out_option"
        assert "RESULTS" not in source, f"{name} names the tracked results folder"


def test_comfy_benchmarks_take_comfyui_from_the_environment(monkeypatch):
    from benchmarks import comfy_bench, comfy_speed
    monkeypatch.setenv("COMFYUI_PATH", "/somewhere/ComfyUI")
    for module in (comfy_bench, comfy_speed):
        args = module.parse_args([])
        assert args.comfyui == "/somewhere/ComfyUI" and args.out == SCRATCH
