"""The metadata header of safetensors bytes: reading it, and writing it in a stable order.

safetensors writes its metadata from a hash map, so two saves of the same tensors and metadata can
differ in key order; a file or a workflow's text should not change when nothing in it did.
"""
from __future__ import annotations

import json


def metadata(data: bytes) -> dict:
    """The string metadata of safetensors bytes (empty when there is none)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__") or {}


def sorted_header(data: bytes) -> bytes:
    """The same safetensors bytes with the header's keys in sorted order."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode()
    if len(text) > size:        # cannot happen for a reordering; keep the original bytes
        return data
    return data[:8] + text.ljust(size) + data[8 + size:]
