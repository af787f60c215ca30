"""How a model family's transformer blocks are declared to the engine.

A family names its block lists and, in each block, the submodules whose outputs are the cached
pre-gate branches. On full steps the engine runs the family's own block code and taps those
submodules; on reuse steps it makes the same submodules hand back their cached output, so the
block's own code still recomputes modulation, gates and residual adds. Families whose expensive
work is not inside a branch submodule (Flux computes attention between `qkv` and `proj`) give a
small `reuse_forward` built from the block's own submodules instead.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from torch import nn


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
    """

    name: str
    path: str
    role: str
    cost_paths: tuple[str, ...] = ()
    keep_inputs: Callable | None = None
    optional: bool = False

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


def resolve(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def linear_params(module: nn.Module) -> int:
    """Weights that take part in a matrix product (what FLOPs scale with)."""
    return sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight") and p.ndim >= 2)
