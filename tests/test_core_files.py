"""Schedule and router files from untrusted sources: every bad document is a ScheduleError with a
message that says what is wrong (never another exception, never a half-read schedule), and the
pack's code never unpickles anything."""
import ast
import json
import os

import pytest

from procache_core.schedule import MAX_DOCUMENT_BYTES, MAX_STEPS, Schedule, ScheduleError, parse_pattern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"format": "procache.schedule", "version": 1, "name": "t", "pattern": [1, 0, 2, 1]}


def doc(**changes):
    d = dict(GOOD)
    for key, value in changes.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    return json.dumps(d)


def test_good_document_reads_back():
    s = Schedule.from_json(doc(units=["11", "00", "10", "11"]))
    assert s.pattern == "1021" and s.units == ((True, True), (False, False), (True, False), (True, True))
    assert Schedule.from_json(s.to_json()) == s


@pytest.mark.parametrize("text, message", [
    ("", "not valid JSON"),
    ("{", "not valid JSON"),
    ("{'format': 'procache.schedule'}", "not valid JSON"),
    ("\x80\x04\x95 pickle", "not valid JSON"),
    ("[1, 0, 1]", "expected a JSON object, got list"),
    ("null", "expected a JSON object, got NoneType"),
    ('"1,0,1"', "expected a JSON object, got str"),
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
], ids=["empty", "unclosed", "single-quotes", "pickle-bytes", "list", "null", "string", "deep-nesting"])
def test_malformed_documents(text, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule.from_json(text, where="file x")


@pytest.mark.parametrize("changes, message", [
    ({"format": "procache.router"}, "'format' must be 'procache.schedule'"),
    ({"format": None}, "'format' must be"),
    ({"version": 2}, "version 2 is not supported"),
    ({"version": 0}, "version 0 is not supported"),
    ({"version": "1"}, "version '1' is not supported"),
    ({"version": None}, "version None is not supported"),
    ({"version": True}, "version True is not supported"),
    ({"pattern": None}, "'pattern' must be a list"),
    ({"pattern": "1021"}, "'pattern' must be a list"),
    ({"pattern": [1, 0.5]}, "'pattern' must be a list of integers"),
    ({"pattern": [1, True]}, "'pattern' must be a list of integers"),
    ({"pattern": [1, 3, -1]}, r"found \[-1, 3\]"),
    ({"pattern": []}, "at least one step"),
    ({"pattern": [0, 1]}, "step 0 must be full"),
    ({"pattern": [1] + [0] * MAX_STEPS}, f"at most {MAX_STEPS} steps"),
    ({"steps": 5}, "'steps' says 5 but the pattern has 4 entries"),
    ({"steps": "4"}, "'steps' says '4'"),
    ({"name": 7}, "'name' must be a string"),
    ({"notes": "a note"}, "'notes' must be a list of strings"),
    ({"notes": [1, {"x": 2}]}, "'notes' must be a list of strings"),
    # router files: the per-branch `units` table
    ({"units": "1111"}, "'units' must be a list of strings of 0/1"),
    ({"units": [[1, 1], [0, 0], [1, 0], [1, 1]]}, "'units' must be a list of strings of 0/1"),
    ({"units": ["11", "0x", "10", "11"]}, "'units' must be a list of strings of 0/1"),
    ({"units": ["11", "00", "10"]}, "the unit table has 3 rows but the schedule has 4 steps"),
    ({"units": ["11", "00", "101", "11"]}, "same number of units"),
])
def test_wrong_documents_say_what_is_wrong(changes, message):
    with pytest.raises(ScheduleError, match=message) as info:
        Schedule.from_json(doc(**changes), where="file x")
    assert str(info.value).startswith("file x: ")


def test_oversized_documents_are_refused_before_parsing():
    padded = doc()[:-1] + ', "pad": "' + " " * MAX_DOCUMENT_BYTES + '"}'
    with pytest.raises(ScheduleError, match="larger than 4 MiB"):
        Schedule.from_json(padded)
    with pytest.raises(ScheduleError, match="larger than 4 MiB"):
        parse_pattern(padded)                       # the typed-pattern widget takes JSON documents too
    with pytest.raises(ScheduleError, match="too long"):
        parse_pattern("1" + ",0" * (4 * MAX_STEPS))
    with pytest.raises(ScheduleError, match="repeat count"):
        parse_pattern(f"[1,0]x{MAX_STEPS + 1}")


def test_pattern_length_mismatch_is_resampled_or_refused():
    s = parse_pattern("1,0,0,1,0,2")
    assert s.resampled(12).steps == 12 and s.resampled(3).steps == 3
    with pytest.raises(ScheduleError, match="cannot resample to 0 steps"):
        s.resampled(0)
    with pytest.raises(ScheduleError, match=f"cannot resample to {MAX_STEPS + 1} steps"):
        s.resampled(MAX_STEPS + 1)


PICKLE_CALLS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("numpy", "load"), ("np", "load"),
                ("dill", "load"), ("joblib", "load"), ("marshal", "loads"), ("comfy.utils", "load_torch_file")}


def _pack_sources():
    for folder in ("procache_core", "nodes"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(dirpath, name)
    yield os.path.join(ROOT, "__init__.py")


def test_pack_code_never_unpickles():
    """Files are read as JSON (schedules, forecasters) or safetensors; no loader that can run code."""
    found = []
    for path in _pack_sources():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path}: import {n}" for n in names if n and n.split(".")[0] in ("pickle", "dill", "joblib",
                                                                                         "marshal", "shelve")]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if (owner, node.func.attr) in PICKLE_CALLS:
                    found.append(f"{path}:{node.lineno}: {owner}.{node.func.attr}")
    assert found == []
    sources = list(_pack_sources())
    assert len(sources) > 10 and any(p.endswith("library.py") for p in sources)   # the walk saw the pack
