"""How a model family's transformer blocks are declared to the engine.

A family names its block lists and, in each block, the submodules whose outputs are the cached
pre-gate branches. On full steps the engine runs the family's own block code and taps those
submodules; on reuse steps it makes the same submodules hand back their cached output, so the
block's own code still recomputes modulation, gates and residual adds. Families whose expensive
work is not inside a branch submodule (Flux computes attention between `qkv` and `proj`) give a
small `reuse_forward` built from the block's own submodules instead.

The attention scores of token selection (tokens.py) need a block's queries and keys. A family
exposes them through probes: at full steps of deep blocks, forward hooks on the submodules that
produce q and k read them while the block runs its own code, so nothing is computed twice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable

from torch import nn


log = logging.getLogger("procache")

ROLES = ("self_attention", "cross_attention", "mlp", "fused")


@dataclasses.dataclass(frozen=True)
class Branch:
    """One cached branch of a block.

    name: the cache key part ("attn", "cross_attn", "mlp", ...).
    path: dotted path of the submodule whose output is the pre-gate branch output.
    role: "self_attention" (never recomputed on cached steps), "cross_attention" and "mlp" (token-
        wise: each output token depends only on that token and the text, so a subset of tokens can
        be recomputed), or "fused" (attention and MLP through one output projection, as Flux's
        single blocks; refreshed only by a family's own selective code).
    cost_paths: submodules whose weights count toward the branch's FLOPs (default: `path`).
    keep_inputs: at full steps, extra tensors to keep from the branch module's inputs,
        keep_inputs(block, args) -> {name: tensor}; a family's selective code reads them back.
    optional: the submodule exists only in some blocks (SD3's last context block has no MLP,
        SD3.5's second self-attention is in the first blocks only); blocks without it skip it.
    probes: (score name, probe) pairs for the attention scores this branch can measure;
        probe(block, args, kwargs, ctx) -> [(submodule, forward hook)], with the branch module's
        inputs and a ProbeContext; the hooks hand [B, N] scores per branch name to ctx.store.
    """

    name: str
    path: str
    role: str
    cost_paths: tuple[str, ...] = ()
    keep_inputs: Callable | None = None
    optional: bool = False
    probes: tuple[tuple[str, Callable], ...] = ()

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"branch role must be one of {ROLES}, got {self.role!r}")

    @property
    def token_wise(self) -> bool:
        return self.role in ("cross_attention", "mlp")

    @property
    def attention(self) -> bool:
        """Whether the branch's FLOPs have a tokens x tokens term."""
        return self.role in ("self_attention", "fused")


@dataclasses.dataclass(frozen=True)
class BlockStack:
    """A list of blocks on the diffusion model, e.g. Flux's `double_blocks`."""

    attr: str
    branches: tuple[Branch, ...]
    # reuse_forward(block, branch, *args, **kwargs) -> the block's output on reuse and selective
    # steps, where branch(name, like, tokens=None, rows=None) returns the branch output the engine
    # decides on: the cache, or on selective steps the cache with the rows of the chosen tokens
    # replaced by rows(idx, tokens, kept) (kept(name) reads a tensor kept by `keep_inputs`).
    reuse_forward: Callable | None = None
    # probes as in Branch, but called with the block's own inputs (Flux: `pe` is only there);
    # only for stacks with a reuse_forward, whose blocks the engine wraps.
    probes: tuple[tuple[str, Callable], ...] = ()


@dataclasses.dataclass
class ProbeContext:
    """What a probe gets besides the inputs."""

    deep: bool                  # the block refreshes tokens: measure and store its scores
    queries: Callable           # queries(n, device) -> indices of the sampled queries
    store: Callable             # store({branch name: [B, N] scores})
    notes: dict                 # facts earlier blocks of this model call left (Flux: text length)


@contextlib.contextmanager
def forward_hooks(pairs):
    """Register (module, hook) forward hooks for the duration of the block."""
    handles = [module.register_forward_hook(_never_fails(hook)) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    name: str
    stacks: tuple[BlockStack, ...]
    detect: Callable[[nn.Module], bool]
    description: str = ""

    def blocks(self, model: nn.Module) -> list[tuple[int, BlockStack, nn.Module]]:
        """(global index, stack, block) in execution order; depth counts across stacks."""
        out = []
        for stack in self.stacks:
            for block in getattr(model, stack.attr):
                out.append((len(out), stack, block))
        return out

    def provides(self, score: str) -> bool:
        """Whether some branch or block of this family can measure `score` (an attention score)."""
        return any(name == score for stack in self.stacks
                   for name, _ in stack.probes + tuple(p for b in stack.branches for p in b.probes))

    def problems(self, model: nn.Module) -> list[str]:
        """Why this family's declaration does not fit `model` (empty when it fits)."""
        issues = []
        for stack in self.stacks:
            blocks = getattr(model, stack.attr, None)
            if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
                issues.append(f"no block list '{stack.attr}'")
                continue
            for i, block in enumerate(blocks):
                for branch in stack.branches:
                    if not branch.optional and resolve(block, branch.path) is None:
                        issues.append(f"{stack.attr}[{i}] has no submodule '{branch.path}'")
                        break
        return issues


def _never_fails(hook):
    # A score is an optimisation: if a model's layout surprises a probe, the block runs on and the
    # selector ranks that block's tokens by output_norm (tokens.py logs the fallback).
    def safe(module, inputs, output):
        try:
            hook(module, inputs, output)
        except Exception as e:      # noqa: BLE001
            if type(module).__name__ not in _probe_failures:
                _probe_failures.add(type(module).__name__)
                log.warning("ProCache: attention score probe on %s failed (%s); using output_norm there",
                            type(module).__name__, e)
        return None
    return safe


_probe_failures: set = set()


def resolve(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def linear_params(module: nn.Module) -> int:
    """Weights that take part in a matrix product (what FLOPs scale with)."""
    return sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight") and p.ndim >= 2)
