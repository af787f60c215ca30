"""Where the benchmarks write their reports.

By default into benchmarks/out/, a git-ignored scratch folder, so that trying a benchmark never
overwrites the figures the README quotes; `--out benchmarks/results` updates those on purpose.
"""
from __future__ import annotations

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH = os.path.join(ROOT, "benchmarks", "out")
RESULTS = os.path.join(ROOT, "benchmarks", "results")     # tracked: the figures the README quotes


def add_out_option(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    """The `--out FOLDER` option every benchmark shares (`optional`: '' writes no file)."""
    none = "; '' writes no file, the console only" if optional else ""
    parser.add_argument("--out", default=SCRATCH, metavar="FOLDER",
                        help=f"folder for the report files (default benchmarks/out, git-ignored; "
                             f"benchmarks/results updates the figures the README quotes{none})")


def report_path(folder: str, name: str) -> str:
    """`folder/name`, the folder created if missing."""
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def write_reports(folder: str, name: str, markdown: str, record: dict, draw, log=print) -> None:
    """`name`.md (the markdown), `name`.json (the record) and `name`.png (`draw(path)`) in `folder`."""
    import json

    with open(report_path(folder, f"{name}.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    with open(report_path(folder, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    draw(report_path(folder, f"{name}.png"))
    log(f"wrote {os.path.relpath(folder)}/{name}.{{md,json,png}}")
