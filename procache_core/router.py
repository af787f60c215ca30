"""HarmoniCa / Learning-to-Cache routers: a learned steps x units table of compute logits.

A router holds one logit per (step, unit), units ordered (attention, MLP) per block: unit 2l is
block l's attention branch, 2l+1 its MLP branch. At inference a unit computes when
sigmoid(logit) > tau and otherwise reuses its cached pre-gate output; the first step always
computes (nothing is cached before it). `to_schedule()` turns a router into the per-unit
Schedule the engine and "ProCache Apply" run.

How a family's branches map onto the two units of a block (the engine and the trainer agree):
self-attention branches are the attention unit, MLP branches the MLP unit, a fused
attention+MLP branch (Flux single blocks) computes when either unit does, and cross-attention
is not routed: it always computes (cheap, and HarmoniCa's released code has none to route).

Files are safetensors: one float32 tensor "logits" [T, U] and string metadata (model, sampler,
steps, cfg, tau, beta, ...). In a workflow the router travels as text: a small JSON document
with the same metadata and the logits as base64 float32, exact to the bit.
"""
from __future__ import annotations

import base64
import dataclasses
import json

import torch

from .families.base import FamilySpec
from .safetensors_header import metadata as header_metadata
from .safetensors_header import sorted_header
from .schedule import Schedule, ScheduleError, StepKind

FORMAT_NAME = "procache.router"
FORMAT_VERSION = 1
FIRST_STEP_LOGIT = 5.0      # the authors' fixed first row: sigmoid(5) = 0.993, always computed
LOGIT_BOUND = 5.0           # logits are clamped into [-5, 5] after every optimiser step
MAX_ROUTER_BYTES = 16 << 20

ATTENTION_ROLES = ("self_attention", "fused")
MLP_ROLES = ("mlp", "fused")


def unit_columns(block: int, role: str) -> tuple[int, ...]:
    """The router columns that decide a branch of `role` in block `block` (empty: not routed)."""
    columns = []
    if role in ATTENTION_ROLES:
        columns.append(2 * block)
    if role in MLP_ROLES:
        columns.append(2 * block + 1)
    return tuple(columns)


def unit_names(blocks: int) -> list[str]:
    return [f"{b}.{kind}" for b in range(blocks) for kind in ("attention", "mlp")]


def tied_columns(family: FamilySpec, model) -> dict[int, int]:
    """column -> the column it copies, for blocks that have only one of the two kinds of branch
    (Flux's single blocks: one fused branch; both units then share the attention unit's logit)."""
    tied = {}
    for index, stack, block in family.blocks(model):
        roles = {b.role for b in stack.branches if _present(block, b)}
        has_attention = bool(roles & {"self_attention"})
        has_mlp = bool(roles & {"mlp"})
        if not has_mlp:
            tied[2 * index + 1] = 2 * index
        elif not has_attention and "fused" not in roles:
            tied[2 * index] = 2 * index + 1
    return tied


def _present(block, branch) -> bool:
    from .families.base import resolve
    return resolve(block, branch.path) is not None


class ReuseLimit:
    """Counts, per unit, the steps it has reused in a row, and makes a unit that has reused
    `max_reuse` steps in a row compute (0: no limit). Fed one step's compute row at a time."""

    def __init__(self, units: int, max_reuse: int):
        self.max_reuse = int(max_reuse)
        self.run = torch.zeros(units, dtype=torch.long)

    def reset(self) -> None:
        self.run.zero_()

    def forced(self, compute: torch.Tensor) -> torch.Tensor:
        """[units] bool: the units this limit makes compute at this step (updates the counts)."""
        compute = compute.detach().to("cpu", torch.bool)
        forced = ~compute & (self.run >= self.max_reuse) if self.max_reuse else torch.zeros_like(compute)
        self.run = torch.where(compute | forced, torch.zeros_like(self.run), self.run + 1)
        return forced


@dataclasses.dataclass
class Router:
    """logits: [steps, units] float32. metadata: strings (what it was trained on and how)."""

    logits: torch.Tensor
    tau: float = 0.1
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        logits = torch.as_tensor(self.logits).detach().to("cpu", torch.float32)
        if logits.ndim != 2 or logits.shape[0] < 1 or logits.shape[1] < 2 or logits.shape[1] % 2:
            raise ScheduleError(f"a router is a [steps, 2 x blocks] table of logits, got shape {tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            raise ScheduleError("the router's logits are not all finite")
        if not 0.0 < float(self.tau) < 1.0:
            raise ScheduleError(f"tau must be in (0, 1), got {self.tau}")
        self.logits = logits
        self.tau = float(self.tau)
        self.metadata = {str(k): str(v) for k, v in self.metadata.items()}

    @classmethod
    def initial(cls, steps: int, blocks: int, seed: int = 0, tau: float = 0.1, metadata: dict | None = None) -> "Router":
        """The authors' initialisation: logits ~ N(0, 1), first row +5."""
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(steps, 2 * blocks, generator=gen)
        logits[0] = FIRST_STEP_LOGIT
        return cls(logits, tau, metadata or {})

    # ---- reading -------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.logits.shape[0]

    @property
    def units(self) -> int:
        return self.logits.shape[1]

    @property
    def blocks(self) -> int:
        return self.units // 2

    def probabilities(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def mask(self) -> torch.Tensor:
        """[steps, units] bool, True = compute: sigmoid(logit) > tau; the first step always computes."""
        mask = self.probabilities() > self.tau
        mask[0] = True
        return mask

    def limit_reuse(self, max_reuse: int) -> "Router":
        """This router with every unit made to compute after `max_reuse` reused steps in a row
        (the forced units' logits set to +5, so the file says what runs)."""
        if max_reuse < 1:
            return self
        logits, limit = self.logits.clone(), ReuseLimit(self.units, max_reuse)
        mask = self.mask()
        for k in range(self.steps):
            logits[k][limit.forced(mask[k])] = FIRST_STEP_LOGIT
        return Router(logits, self.tau, {**self.metadata, "max_reuse": str(max_reuse)})

    def cache_usage_ratio(self) -> float:
        """Reused units over all units of the run, the first step included (the papers' CUR)."""
        return float((~self.mask()).sum()) / self.mask().numel()

    def to_schedule(self, name: str = "harmonica-router") -> Schedule:
        """The per-unit schedule: steps where every unit computes are FULL, the others REUSE with
        the unit table saying which units still compute."""
        mask = self.mask()
        kinds = tuple(StepKind.FULL if bool(row.all()) else StepKind.REUSE for row in mask)
        meta = self.metadata
        trained = ", ".join(f"{k} {meta[k]}" for k in ("model", "sampler", "scheduler", "steps", "cfg", "beta")
                            if meta.get(k))
        return Schedule(kinds=kinds, name=name, family=meta.get("family", "any"), sampler=meta.get("sampler", ""),
                        provenance=f"HarmoniCa router (tau {self.tau:g}{', ' + trained if trained else ''})",
                        notes=(f"cache usage ratio {100 * self.cache_usage_ratio():.1f}% of units",),
                        units=tuple(tuple(bool(u) for u in row) for row in mask.tolist()))

    def describe(self) -> str:
        mask = self.mask()
        attention, mlp = mask[:, 0::2], mask[:, 1::2]
        return (f"router {self.steps} steps x {self.units} units (tau {self.tau:g}): cache usage ratio "
                f"{100 * self.cache_usage_ratio():.1f}%; computed units: {int(attention.sum())}/{attention.numel()} "
                f"attention, {int(mlp.sum())}/{mlp.numel()} MLP")

    def heatmap(self) -> str:
        """One text line per step: '#' computes, '.' reuses (attention and MLP of each block)."""
        return "\n".join(f"{k:>3} " + "".join("#" if u else "." for u in row) for k, row in enumerate(self.mask().tolist()))

    # ---- files and text ------------------------------------------------------------------
    def _full_metadata(self) -> dict[str, str]:
        return {**self.metadata, "format": FORMAT_NAME, "version": str(FORMAT_VERSION), "tau": repr(self.tau)}

    def to_bytes(self) -> bytes:
        from safetensors.torch import save
        return sorted_header(save({"logits": self.logits.contiguous()}, metadata=self._full_metadata()))

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "router") -> "Router":
        from safetensors.torch import load
        if len(data) > MAX_ROUTER_BYTES:
            raise ScheduleError(f"{where}: larger than {MAX_ROUTER_BYTES >> 20} MiB; not a router")
        try:
            tensors = load(data)
            metadata = header_metadata(data)
        except Exception as e:      # safetensors raises its own error types
            raise ScheduleError(f"{where}: not a safetensors router ({e})") from None
        return cls._from_parts(tensors.get("logits"), metadata, where)

    @classmethod
    def load(cls, path: str) -> "Router":
        with open(path, "rb") as f:
            return cls.from_bytes(f.read(MAX_ROUTER_BYTES + 1), where=path)

    def to_text(self) -> str:
        doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tau": self.tau, "shape": list(self.logits.shape),
               "metadata": self.metadata,
               "logits_float32_base64": base64.b64encode(self.logits.numpy().astype("<f4").tobytes()).decode("ascii")}
        return json.dumps(doc, indent=1)

    @classmethod
    def from_text(cls, text: str, where: str = "router text") -> "Router":
        if len(text) > MAX_ROUTER_BYTES:
            raise ScheduleError(f"{where}: too long for a router")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScheduleError(f"{where}: not valid JSON ({e.msg}); paste the text of HarmoniCa Router Trainer") from None
        except (ValueError, RecursionError) as e:       # numbers of over 4300 digits, nesting past the stack
            raise ScheduleError(f"{where}: not a router ({str(e)[:100]}); paste the text of HarmoniCa Router Trainer") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ScheduleError(f"{where}: not a '{FORMAT_NAME}' document")
        if doc.get("version") != FORMAT_VERSION:
            raise ScheduleError(f"{where}: router format version {str(doc.get('version'))[:40]!r} is not supported")
        shape = doc.get("shape")
        try:
            raw = base64.b64decode(doc["logits_float32_base64"], validate=True)
            steps, units = (int(s) for s in shape)
            import numpy as np
            logits = torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy()).view(steps, units)
        except Exception as e:
            raise ScheduleError(f"{where}: unreadable logits ({e})") from None
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ScheduleError(f"{where}: 'metadata' must be a JSON object of names to values, got a "
                                f"{type(metadata).__name__}; paste the text of HarmoniCa Router Trainer")
        return cls._from_parts(logits, {**metadata, "tau": str(doc.get("tau"))}, where)

    @classmethod
    def _from_parts(cls, logits, metadata: dict, where: str) -> "Router":
        if logits is None:
            raise ScheduleError(f"{where}: no 'logits' tensor")
        metadata = dict(metadata)
        metadata.pop("format", None)
        metadata.pop("version", None)
        try:
            tau = float(metadata.pop("tau"))
        except (KeyError, TypeError, ValueError):
            raise ScheduleError(f"{where}: the router does not say its tau") from None
        try:
            return cls(logits, tau, metadata)
        except ScheduleError as e:
            raise ScheduleError(f"{where}: {e}") from None

    @classmethod
    def from_authors_checkpoint(cls, routers: dict, tau: float = 0.1, metadata: dict | None = None) -> "Router":
        """HarmoniCa's / L2C's `routers` state dict {"{i}.prob": [2L]} (i = respaced timestep,
        ascending, so row i belongs to denoising step T-1-i). Their stored values are the logits
        the router's forward passes through sigmoid."""
        rows = sorted((int(k.split(".")[0]), v) for k, v in routers.items() if k.endswith(".prob"))
        if not rows or [i for i, _ in rows] != list(range(len(rows))):
            raise ScheduleError("expected keys '0.prob' .. '{T-1}.prob'")
        logits = torch.stack([torch.as_tensor(v, dtype=torch.float32).flatten() for _, v in reversed(rows)])
        return cls(logits, tau, {"source": "authors' checkpoint", **(metadata or {})})
