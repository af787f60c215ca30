"""The cache store: pre-gate branch outputs keyed by (stream, block, branch).

A stream is one conditioning of the sampler (ComfyUI gives each a uuid), not a batch position:
cond and uncond may arrive batched together in one call, in either order, or in separate calls.
Tensors are split per stream on the way in and joined on the way out; when the same streams come
back in the same order the stored tensor is handed back without a copy.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

Streams = tuple[str, ...]


class CacheStore:
    """Cached tensors of one sampling run. Never shared between runs, models or Apply nodes."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None  # e.g. "cpu" to save VRAM
        self._parts: dict[tuple[str, Hashable], torch.Tensor] = {}
        self._whole: dict[Hashable, tuple[Streams, torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def put(self, streams: Sequence[str], key: Hashable, value: torch.Tensor) -> None:
        streams = tuple(streams)
        if self.device is not None and value.device != self.device:
            value = value.to(self.device, non_blocking=True)
        parts = value.chunk(len(streams), dim=0) if len(streams) > 1 else (value,)
        if len(parts) != len(streams):
            raise ValueError(f"cannot split a batch of {value.shape[0]} into {len(streams)} streams")
        for stream, part in zip(streams, parts):
            self._parts[(stream, key)] = part
        self._whole[key] = (streams, value, parts)

    def get(self, streams: Sequence[str], key: Hashable, device: torch.device | None = None) -> torch.Tensor | None:
        """The cached tensor for these streams, or None if any stream has nothing stored."""
        streams = tuple(streams)
        whole = self._whole.get(key)
        if whole is not None and whole[0] == streams and all(
                self._parts.get((s, key)) is p for s, p in zip(streams, whole[2])):
            value = whole[1]
        else:
            parts = [self._parts.get((s, key)) for s in streams]
            if any(p is None for p in parts):
                return None
            if len({p.shape[1:] for p in parts}) != 1:
                return None
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if device is not None and value.device != device:
            value = value.to(device)
        return value

    def discard(self, streams: Sequence[str], key: Hashable) -> None:
        """Forget `key` for these streams (other streams keep theirs)."""
        for stream in streams:
            self._parts.pop((stream, key), None)
        whole = self._whole.get(key)
        if whole is not None and any(s in whole[0] for s in streams):
            del self._whole[key]

    def items(self):
        """(key, tensor) of every entry as last stored, all its streams together."""
        return [(key, whole[1]) for key, whole in self._whole.items()]

    def __len__(self) -> int:
        return len(self._parts)

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for part in self._parts.values():
            storage = part.untyped_storage().data_ptr()
            if storage not in seen:
                seen.add(storage)
                total += part.untyped_storage().nbytes()
        return total

    def clear(self) -> None:
        self._parts.clear()
        self._whole.clear()
