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


@dataclasses.dataclass(frozen=True)
class Branch:
    """One cached branch of a block.

    name: the cache key part ("attn", "cross_attn", "mlp", ...).
    path: dotted path of the submodule whose output is the pre-gate branch output.
    token_wise: each output token depends only on the same input token (MLP) or on that token
        and the text (cross-attention), so it can be recomputed for a subset of tokens.
    cost_paths: submodules whose weights count toward the branch's FLOPs (default: `path`).
    attention: the branch has a tokens x keys attention term in its FLOPs.
    """

    name: str
    path: str
    token_wise: bool
    cost_paths: tuple[str, ...] = ()
    attention: bool = False


@dataclasses.dataclass(frozen=True)
class BlockStack:
    """A list of blocks on the diffusion model, e.g. Flux's `double_blocks`."""

    attr: str
    branches: tuple[Branch, ...]
    # reuse_forward(block, branch, *args, **kwargs) -> the block's output, where
    # branch(name, module=None, tokens=None, like=None) returns the branch output the engine
    # decides on (cached, or cached with a subset of tokens recomputed from `tokens()`).
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
                    if resolve(block, branch.path) is None:
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
