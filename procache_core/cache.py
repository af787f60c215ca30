"""The cache store: pre-gate branch outputs keyed by (stream, block, branch).

A stream is one conditioning of the sampler (ComfyUI gives each a uuid), not a batch position:
cond and uncond may arrive batched together in one call, in either order, or in separate calls.
Tensors are split per stream on the way in and joined on the way out; when the same streams come
back in the same order the stored tensor is handed back without a copy.

Bytes. Values stay in their own dtype (a bf16 model caches bf16). With `quantize`, floating
tensors of two or more dims are held as 8-bit codes plus one float32 scale per row (per token: the
last dim is the channels), and decoded to their own dtype on `get`. With a CPU store and CUDA
values, host copies live in pinned memory and `prefetch` moves a value back to the GPU on a side
stream while the caller computes something else.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Iterator, Sequence

import torch

Streams = tuple[str, ...]

QUANTIZE_FORMATS = (None, "int8", "fp8")
SCALE_DTYPE = torch.float32
# Rows are quantized this many elements at a time: the float32 working copy stays at 16 MiB
# instead of twice the size of a (possibly GiB-sized) bf16 activation.
_CHUNK_ELEMENTS = 1 << 22


@dataclasses.dataclass(frozen=True, eq=False)
class _Entry:
    """One stored value: the tensor itself, or its 8-bit codes with a float32 scale per row."""
    data: torch.Tensor
    scale: torch.Tensor | None = None    # [..., 1]: value = codes * scale
    dtype: torch.dtype | None = None     # the value's own dtype (8-bit entries)
    # CUDA event recorded after the device->host copy into pinned memory: host-side readers
    # synchronize on it, GPU streams wait on it.
    arrived: object = None

    def split(self, n: int) -> tuple[_Entry, ...]:
        if n == 1:
            return (self,)
        data = self.data.chunk(n, dim=0)
        scale = self.scale.chunk(n, dim=0) if self.scale is not None else (None,) * n
        return tuple(_Entry(d, s, self.dtype, self.arrived) for d, s in zip(data, scale))

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.data
        if self.scale is not None:
            yield self.scale

    @property
    def value_shape(self) -> torch.Size:
        return self.data.shape


@dataclasses.dataclass(frozen=True, eq=False)
class _Ahead:
    """A value copied ahead to a GPU: usable once `done` (an event on the side stream) has passed."""
    streams: Streams
    parts: tuple[_Entry, ...]            # the stored parts it was copied from (staleness check)
    value: _Entry
    device: torch.device
    done: object = None


class CacheStore:
    """Cached tensors of one sampling run. Never shared between runs, models or Apply nodes.

    device: where values are held (None: where they come from; "cpu" saves VRAM).
    quantize: None keeps values exact; "int8" or "fp8" (float8 e4m3) holds floating tensors of
    two or more dims as 8-bit codes plus a float32 scale per row, about half the bytes of bf16
    (scales add 4 bytes per row of C channels). Integer tensors and 1-D tensors stay exact.
    """

    def __init__(self, device: torch.device | str | None = None, quantize: str | None = None):
        self.device = torch.device(device) if device is not None else None  # e.g. "cpu" to save VRAM
        self.quantize = quantize
        self._code_dtype = _code_dtype(quantize)
        self._parts: dict[tuple[str, Hashable], _Entry] = {}
        self._whole: dict[Hashable, tuple[Streams, _Entry, tuple[_Entry, ...]]] = {}
        self._ahead: dict[Hashable, _Ahead] = {}
        self._side_streams: dict[torch.device, object] = {}
        self._pinned = False

    # ---- sizes ---------------------------------------------------------------------------------
    @staticmethod
    def entry_nbytes(shape: Sequence[int], dtype: torch.dtype, quantize: str | None = None) -> int:
        """The bytes a put of a contiguous tensor of this shape and dtype holds (all streams)."""
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if _quantizes(dtype, len(shape), _code_dtype(quantize)):
            return numel + math.prod(shape[:-1]) * SCALE_DTYPE.itemsize
        return numel * dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes held on the store's side: tensors, or 8-bit codes plus scales; shared storage once.
        Pinned host copies take more system RAM than this: PyTorch's host allocator rounds each
        block up to a power of two (see torch.cuda.host_memory_stats)."""
        seen, total = set(), 0
        for entry in self._parts.values():
            for tensor in entry.tensors():
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    @property
    def prefetched_nbytes(self) -> int:
        """Bytes of values copied ahead to a GPU and not yet handed out by `get`."""
        return sum(t.nbytes for ahead in self._ahead.values() for t in ahead.value.tensors())

    def __len__(self) -> int:
        return len(self._parts)

    # ---- put / get / discard -------------------------------------------------------------------
    def put(self, streams: Sequence[str], key: Hashable, value: torch.Tensor) -> None:
        streams = tuple(streams)
        if len(streams) > 1 and (value.ndim == 0 or value.shape[0] % len(streams)):
            raise ValueError(f"cannot split a batch of {value.shape[0] if value.ndim else 0} into "
                             f"{len(streams)} streams")
        entry = self._held(self._encoded(value))
        parts = entry.split(len(streams))
        self._ahead.pop(key, None)
        for stream, part in zip(streams, parts):
            self._parts[(stream, key)] = part
        self._whole[key] = (streams, entry, parts)

    def get(self, streams: Sequence[str], key: Hashable, device: torch.device | None = None) -> torch.Tensor | None:
        """The cached tensor for these streams, or None if any stream has nothing stored."""
        streams = tuple(streams)
        ahead = self._ahead.pop(key, None)
        parts = self._stored(streams, key)
        if parts is None:
            return None
        if ahead is not None and device is not None and ahead.streams == streams and \
                ahead.device == _concrete(torch.device(device)) and _same(ahead.parts, parts):
            return self._landed(ahead)
        entry = self._joined(streams, key, parts)
        if entry is None:           # parts held in different forms: decode each, then join
            return torch.cat([_decoded(self._moved(p, device)) for p in parts], dim=0)
        return _decoded(self._moved(entry, device))

    def prefetch(self, streams: Sequence[str], key: Hashable, device: torch.device | str) -> bool:
        """Start copying the value of `key` to `device` on a side CUDA stream and return at once;
        the next `get` of the same streams and key on that device hands it out. Returns whether a
        copy started: only host-held values going to a CUDA device are prefetched (elsewhere a
        `get` is as fast, so this does nothing)."""
        streams, device = tuple(streams), _concrete(torch.device(device))
        parts = self._stored(streams, key)
        entry = None if parts is None else self._joined(streams, key, parts)
        copied = None if entry is None else self._copy_ahead(entry, device)
        if copied is None:
            return False
        value, done = copied
        self._ahead[key] = _Ahead(streams, parts, value, device, done)
        return True

    def discard(self, streams: Sequence[str], key: Hashable) -> None:
        """Forget `key` for these streams (other streams keep theirs)."""
        for stream in streams:
            self._parts.pop((stream, key), None)
        self._ahead.pop(key, None)
        whole = self._whole.get(key)
        if whole is not None and any(s in whole[0] for s in streams):
            del self._whole[key]

    def items(self) -> list[tuple[Hashable, int, int]]:
        """(key, bytes held, bytes an 8-bit store would hold) of every entry as last stored, all
        its streams together (the census of a cache plan)."""
        out = []
        for key, whole in self._whole.items():
            entry = whole[1]
            held = sum(t.untyped_storage().nbytes() for t in entry.tensors())
            eight_bit = held if entry.scale is not None else \
                self.entry_nbytes(entry.data.shape, entry.data.dtype, "int8")
            out.append((key, held, eight_bit))
        return out

    def keys(self) -> list[Hashable]:
        return list(self._whole)

    def clear(self) -> None:
        self._parts.clear()
        self._whole.clear()
        self._ahead.clear()
        if self._pinned:
            # Freed pinned blocks stay in PyTorch's host cache until emptied: give them back to
            # the system, whose RAM they would otherwise keep after the run.
            self._pinned = False
            # Newer PyTorch has the public torch.accelerator call; older releases only the private one.
            empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or \
                getattr(torch._C, "_host_emptyCache", None)
            if empty is not None:
                empty()

    # ---- internals -----------------------------------------------------------------------------
    def _stored(self, streams: Streams, key: Hashable) -> tuple[_Entry, ...] | None:
        """The stored parts of these streams, None when a stream lacks one or their shapes differ."""
        parts = tuple(self._parts.get((s, key)) for s in streams)
        if any(p is None for p in parts) or len({p.value_shape[1:] for p in parts}) != 1:
            return None
        return parts

    def _joined(self, streams: Streams, key: Hashable, parts: tuple[_Entry, ...]) -> _Entry | None:
        """The parts as one entry (the stored one when the streams come back as they were put);
        None when they are held in different forms and cannot be joined without decoding."""
        whole = self._whole.get(key)
        if whole is not None and whole[0] == streams and _same(whole[2], parts):
            return whole[1]
        if len(parts) == 1:
            return parts[0]
        if len({(p.scale is None, p.dtype, p.data.dtype) for p in parts}) != 1:
            return None
        for part in parts:
            _wait_on_host(part)     # torch.cat reads host memory that may still be arriving
        scale = None if parts[0].scale is None else torch.cat([p.scale for p in parts], dim=0)
        return _Entry(torch.cat([p.data for p in parts], dim=0), scale, parts[0].dtype)

    def _encoded(self, value: torch.Tensor) -> _Entry:
        if not _quantizes(value.dtype, value.ndim, self._code_dtype):
            return _Entry(value)
        codes, scale = _quantize(value, self._code_dtype)
        return _Entry(codes, scale, value.dtype)

    def _held(self, entry: _Entry) -> _Entry:
        """The entry on the store's device; CUDA -> CPU goes to pinned memory without blocking."""
        if self.device is None or entry.data.device == self.device:
            return entry
        if not (self.device.type == "cpu" and entry.data.is_cuda):
            non_blocking = self.device.type == "cuda"
            return dataclasses.replace(
                entry, data=entry.data.to(self.device, non_blocking=non_blocking),
                scale=None if entry.scale is None else entry.scale.to(self.device, non_blocking=non_blocking))
        host = [self._pinned_copy(t) for t in entry.tensors()]
        arrived = torch.cuda.Event()
        arrived.record(torch.cuda.current_stream(entry.data.device))
        return _Entry(host[0], host[1] if len(host) > 1 else None, entry.dtype, arrived)

    def _pinned_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._pinned = True
        except RuntimeError:        # pinned memory exhausted: pageable memory, copied synchronously
            return tensor.to("cpu")
        return host.copy_(tensor, non_blocking=True)

    def _moved(self, entry: _Entry, device: torch.device | None) -> _Entry:
        """The entry on `device` (None: where it is), still encoded: 8-bit codes travel, not values."""
        if device is None or entry.data.device == torch.device(device):
            _wait_on_host(entry)
            return entry
        device = torch.device(device)
        if entry.arrived is not None and device.type == "cuda":
            torch.cuda.current_stream(device).wait_event(entry.arrived)   # ordered after the D2H copy
        else:
            _wait_on_host(entry)
        # Non-blocking only towards CUDA: a host reader of an asynchronous D2H copy could see it unfinished.
        non_blocking = device.type == "cuda"
        return _Entry(entry.data.to(device, non_blocking=non_blocking),
                      None if entry.scale is None else entry.scale.to(device, non_blocking=non_blocking),
                      entry.dtype)

    def _copy_ahead(self, entry: _Entry, device: torch.device) -> tuple[_Entry, object] | None:
        """(the entry copied to `device` on a side stream, the event that marks its end), or None
        where no copy is worth starting."""
        if device.type != "cuda" or entry.data.device.type != "cpu" or not torch.cuda.is_available():
            return None
        side = self._side_streams.get(device)
        if side is None:
            side = self._side_streams[device] = torch.cuda.Stream(device)
        with torch.cuda.stream(side):
            if entry.arrived is not None:
                side.wait_event(entry.arrived)
            copied = _Entry(entry.data.to(device, non_blocking=True),
                            None if entry.scale is None else entry.scale.to(device, non_blocking=True),
                            entry.dtype)
            done = torch.cuda.Event()
            done.record(side)
        return copied, done

    def _landed(self, ahead: _Ahead) -> torch.Tensor:
        """The prefetched value, safe to use on the current stream."""
        if ahead.done is not None:
            current = torch.cuda.current_stream(ahead.device)
            current.wait_event(ahead.done)
            for tensor in ahead.value.tensors():
                # Allocated on the side stream: keep the allocator from reusing it before the
                # current stream is done with it.
                tensor.record_stream(current)
        return _decoded(ahead.value)


# ---- 8-bit codes ------------------------------------------------------------------------------
def _code_dtype(quantize: str | None) -> torch.dtype | None:
    if quantize not in QUANTIZE_FORMATS:
        raise ValueError(f"quantize must be one of {QUANTIZE_FORMATS}, got {quantize!r}")
    if quantize is None:
        return None
    if quantize == "int8":
        return torch.int8
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        raise ValueError(f"quantize='fp8' needs torch.float8_e4m3fn, which PyTorch {torch.__version__} lacks: "
                         "update PyTorch (2.1 or later) or use quantize='int8'")
    return fp8


def _quantizes(dtype: torch.dtype, ndim: int, code_dtype: torch.dtype | None) -> bool:
    # 1-D tensors (per-sample numbers) are tiny; integer tensors (staleness counters) must stay exact.
    return code_dtype is not None and dtype.is_floating_point and dtype.itemsize > 1 and ndim >= 2


def _code_limit(code_dtype: torch.dtype) -> float:
    return 127.0 if code_dtype == torch.int8 else float(torch.finfo(code_dtype).max)


def _quantize(value: torch.Tensor, code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of `value` and a float32 scale per row (the absolute maximum maps to the
    format's limit), worked out in float32 a chunk of rows at a time."""
    rows = value.detach().reshape(math.prod(value.shape[:-1]), value.shape[-1])
    codes = torch.empty(rows.shape, dtype=code_dtype, device=value.device)
    scale = torch.empty(rows.shape[0], 1, dtype=SCALE_DTYPE, device=value.device)
    limit = _code_limit(code_dtype)
    step = max(1, _CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step].to(SCALE_DTYPE, copy=True)
        if block.shape[1] == 0:
            scale[start:start + step] = 1.0
            continue
        row_scale = block.abs().amax(dim=1, keepdim=True).div_(limit)
        row_scale.masked_fill_(row_scale == 0, 1.0)        # an all-zero row: codes 0, any scale
        block.div_(row_scale)
        if code_dtype == torch.int8:
            block.round_()
        codes[start:start + step] = block.clamp_(-limit, limit)
        scale[start:start + step] = row_scale
    return codes.view(value.shape), scale.view(*value.shape[:-1], 1)


def _decoded(entry: _Entry) -> torch.Tensor:
    if entry.scale is None:
        return entry.data
    # Codes are exact in any float dtype (|int8| <= 127, e4m3 has 3 mantissa bits); the product is
    # worked out in float32 inside the kernel and rounded once to the value's dtype.
    return entry.data.to(entry.dtype).mul_(entry.scale)


# ---- devices and events -----------------------------------------------------------------------
def _concrete(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _wait_on_host(entry: _Entry) -> None:
    if entry.arrived is not None:
        entry.arrived.synchronize()


def _same(a: tuple[_Entry, ...], b: tuple[_Entry, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
