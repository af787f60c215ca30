"""The peers' dynamic caching rules, on the reference DiT, for the benchmark.

Schedule-based methods (FORA, ToCa-style, ProCache) run through procache_core's engine. The rules
here decide at run time, from what the model computes, whether to skip the block stack:

    teacache     accumulate the relative L1 change of block 0's modulated input from step to
                 step; below the threshold, reuse the stack's last residual (TeaCache)
    first_block  always run block 0; if its residual changed less than the threshold since the
                 last computed step, reuse the residual of the remaining blocks (First Block Cache)
    easycache    learn the stack's transformation rate k = |Δ output| / |Δ input| on computed
                 steps; on later steps accumulate the predicted relative output change
                 k·|Δ input| / |output| and reuse the stack's residual while it stays below the
                 threshold; the first `warmup` share of steps (15 %, as ComfyUI's EasyCache node
                 starts) always computes (EasyCache)

    lazycache    ComfyUI's LazyCache node (comfy_extras/nodes_easycache.py): EasyCache's rule one
                 level up, on the sampler's denoiser (`LazyCacheStyle`): the input is the sampler's
                 latent, the output the CFG-combined denoised image, and a skipped call returns the
                 latent plus the last computed (denoised - latent), so the whole model is skipped

These are our own readings of the published rules; all but LazyCache's at block-stack level: the reused thing is the
residual h_out - h_in of the block stack, the embedders and the final layer always run. Decisions
are made per model call for the whole batch, as ComfyUI's implementations do. Work is counted in
the engine's units (block branch FLOPs), so the FLOPs speedups compare with the engine's rows.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from procache_core.reference.dit import DiT, modulate, timestep_embedding
from procache_core.reference.sampling import alphas_cumprod

RULES = ("teacache", "first_block", "easycache")


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / (b.abs().mean() + 1e-12))


@dataclasses.dataclass
class RuleStats:
    flops_done: float = 0.0
    flops_full: float = 0.0
    computed_calls: int = 0
    calls: int = 0

    @property
    def flops_speedup(self) -> float:
        return self.flops_full / self.flops_done if self.flops_done else 1.0


class BlockStackWrapper(nn.Module):
    """The reference DiT's forward with its block stack handed to `_stack`; call like the DiT (x, t, y).

    Subclasses decide per call whether to run the blocks (`_run`) or to stand in for them; the
    embedders and the final layer always run. One instance per sampling run (it keeps state).
    """

    def __init__(self, model: DiT):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        flops = model.block_flops()
        self.block_cost = flops["attn"] + flops["mlp"]
        self.stats = RuleStats()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m, cfg = self.model, self.cfg
        b = x.shape[0]
        h = m.x_embedder(x).flatten(2).transpose(1, 2) + m.pos_embed
        c = m.t_embedder(timestep_embedding(t, 256)) + m.y_embedder(y)
        cost = self.block_cost * b
        self.stats.calls += 1
        self.stats.flops_full += cost * len(m.blocks)
        h = self._stack(h, c, float(t.flatten()[0]), cost)
        h = m.final_layer(h, c)
        side, p = cfg.image_size // cfg.patch, cfg.patch
        h = h.view(b, side, side, p, p, cfg.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, cfg.channels, cfg.image_size, cfg.image_size)

    def _stack(self, h: torch.Tensor, c: torch.Tensor, t: float, cost: float) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, h, c, blocks, cost):
        for block in blocks:
            h = block(h, c)
        self.stats.flops_done += cost * len(blocks)
        self.stats.computed_calls += 1
        return h


class DynamicCache(BlockStackWrapper):
    """The reference DiT's forward with one dynamic skip rule; call like the DiT (x, t, y).

    Pass it to procache_core.reference.sampling.sample in place of the model. One instance per
    sampling run (it keeps the previous step's state).
    """

    def __init__(self, model: DiT, rule: str, threshold: float, warmup: float = 0.15, steps: int | None = None):
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
        super().__init__(model)
        self.rule = rule
        self.threshold = threshold
        self.warmup_calls = int(round(warmup * steps)) if steps else 1
        self._residual = None       # h_out - h_in of the stack (teacache, easycache) or of blocks 1.. (first_block)
        self._signal = None         # previous step's decision signal
        self._accumulated = 0.0
        self._rate = None           # easycache: transformation rate
        self._last_in = self._last_out = None
        self._computed = None       # easycache: (input, output) of the last computed step

    def _stack(self, h, c, t, cost):
        return getattr(self, f"_{self.rule}")(h, c, self.model.blocks, cost, self.stats.calls == 1)

    def _shape_ok(self, h):
        return self._residual is not None and self._residual.shape == h.shape

    def _teacache(self, h, c, blocks, cost, first_call):
        block = blocks[0]
        sh1, sc1, *_ = block.adaLN_modulation(c).chunk(6, dim=-1)
        signal = modulate(block.norm1(h), sh1, sc1)
        if not first_call and self._signal is not None and self._shape_ok(h):
            self._accumulated += _rel_l1(signal, self._signal)
        self._signal = signal
        if not first_call and self._shape_ok(h) and self._accumulated < self.threshold:
            return h + self._residual
        self._accumulated = 0.0
        out = self._run(h, c, blocks, cost)
        self._residual = out - h
        return out

    def _first_block(self, h, c, blocks, cost, first_call):
        h1 = blocks[0](h, c)
        self.stats.flops_done += cost
        signal = h1 - h
        reuse = (not first_call and self._signal is not None and self._shape_ok(h)
                 and _rel_l1(signal, self._signal) < self.threshold)
        if reuse:
            return h1 + self._residual
        # the rule compares against the first-block residual of the last *computed* step
        self._signal = signal
        out = h1
        for block in blocks[1:]:
            out = block(out, c)
        self.stats.flops_done += cost * (len(blocks) - 1)
        self.stats.computed_calls += 1
        self._residual = out - h1
        return out

    def _easycache(self, h, c, blocks, cost, first_call):
        calls = self.stats.calls
        if calls > self.warmup_calls and self._rate is not None and self._shape_ok(h):
            moved = float((h - self._last_in).norm() / (self._last_out.norm() + 1e-12))
            self._accumulated += self._rate * moved
            self._last_in = h
            if self._accumulated < self.threshold:
                return h + self._residual
        out = self._run(h, c, blocks, cost)
        # the rate compares this computed step with the last computed one (inputs and outputs alike)
        if self._computed is not None and self._computed[0].shape == h.shape:
            before_in, before_out = self._computed
            self._rate = float((out - before_out).norm() / ((h - before_in).norm() + 1e-12))
        self._computed = (h, out)
        self._accumulated = 0.0
        self._last_in, self._last_out = h, out
        self._residual = out - h
        return out


class LazyCacheStyle:
    """ComfyUI's LazyCache rule around a k-diffusion denoiser `denoise(x, sigma, **kw)`; call like it.

    Inside the window sigma_end < sigma <= sigma_start, each call adds to a running total the
    predicted relative output change rate * mean|x - x_c| / mean|out_c|, where x_c and out_c are
    the input and output of the last computed call and `rate` = mean|Δ output| / mean|Δ input|
    between the last two computed calls. While the total stays below `threshold` the call is
    skipped: it returns x + (out_c - x_c). Otherwise it computes and the total restarts at 0.
    Calls above the window compute and update the state; calls at or below sigma_end compute and
    leave it alone (as the node does). The node compares every 8th pixel of a latent; here
    `subsample` defaults to 1 (the reference DiT's images are 16 pixels wide).
    One instance per sampling run. Work: `cost_per_call` block FLOPs per computed call.
    """

    def __init__(self, denoise, threshold: float, sigma_start: float, sigma_end: float, cost_per_call: float,
                 subsample: int = 1):
        self.denoise, self.threshold = denoise, threshold
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.cost, self.subsample = cost_per_call, subsample
        self.stats = RuleStats()
        self._accumulated = 0.0
        self._rate = None
        self._x = self._out = self._diff = None     # the last computed call's input, output, out - in
        self._out_norm = None

    def _thin(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., ::self.subsample, ::self.subsample]

    def _compute(self, x, sigma, kwargs):
        self.stats.flops_done += self.cost
        self.stats.computed_calls += 1
        return self.denoise(x, sigma, **kwargs)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        s = float(sigma.flatten()[0])
        self.stats.calls += 1
        self.stats.flops_full += self.cost
        if s <= self.sigma_end:
            return self._compute(x, sigma, kwargs)
        input_change = None
        if s <= self.sigma_start and self._x is not None and self._x.shape == x.shape:
            input_change = float((self._thin(x) - self._x).abs().mean())
            if self._rate is not None:
                self._accumulated += self._rate * input_change / self._out_norm
                if self._accumulated < self.threshold:
                    return x + self._diff
                self._accumulated = 0.0
        out = self._compute(x, sigma, kwargs)
        if input_change is not None and self._out is not None:
            self._rate = float((self._thin(out) - self._out).abs().mean()) / max(input_change, 1e-12)
        self._x, self._out = self._thin(x).clone(), self._thin(out).clone()
        self._out_norm = max(float(out.abs().mean()), 1e-12)
        self._diff = out - x
        return out

    @property
    def cache_bytes(self) -> int:
        """What the rule holds between calls: the difference and the thinned input and output."""
        return sum(t.numel() * t.element_size() for t in (self._diff, self._x, self._out) if t is not None)


class LazyCacheDDIM:
    """`LazyCacheStyle` on the reference DiT's DDIM sampler: call like the DiT (x, t, y).

    DDIM's latent x_t = sqrt(a) x0 + sqrt(1 - a) eps is sqrt(a) times the k-diffusion latent
    x0 + sigma eps with sigma = sqrt((1 - a) / a), so the rule sees x / sqrt(a) and the denoised
    image x / sqrt(a) - sigma eps, what ComfyUI hands LazyCache for a discrete epsilon model; a
    skipped call's eps follows from the reused denoised image. DDIM batches the CFG streams in one
    call, so the rule decides for both streams together (the node sees their combination).
    window: the node's start_percent and end_percent.
    """

    def __init__(self, model: DiT, threshold: float, window=(0.15, 0.95)):
        self.model, self.cfg = model, model.cfg
        self.acp = alphas_cumprod().double()
        flops = model.block_flops()
        self._call = None
        self.rule = LazyCacheStyle(self._denoise, threshold, *(sigma_at_percent(p, self.acp) for p in window),
                                   cost_per_call=(flops["attn"] + flops["mlp"]) * len(model.blocks))
        self.stats = self.rule.stats

    def _denoise(self, x, sigma):
        t, y, scale = self._call
        return x - float(sigma) * self.model(x * scale, t, y)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = float(self.acp[int(t.flatten()[0])])
        scale, sigma = math.sqrt(a), math.sqrt((1 - a) / a)
        self._call = (t, y, scale)
        latent = x / scale
        denoised = self.rule(latent, torch.tensor([sigma]))
        return (latent - denoised) / sigma

    @property
    def cache_bytes(self) -> int:
        return self.rule.cache_bytes


def sigma_at_percent(percent: float, acp: torch.Tensor) -> float:
    """The sigma at a share of the training timesteps, as ComfyUI's percent_to_sigma reads a node's
    start_percent / end_percent for a discrete model (0: above every sigma, 1: zero)."""
    if percent <= 0:
        return math.inf
    if percent >= 1:
        return 0.0
    log_sigmas = ((1 - acp) / acp).sqrt().log()
    t = (1 - percent) * (len(acp) - 1)
    low = int(t)
    high = min(low + 1, len(acp) - 1)
    return math.exp(float(log_sigmas[low] + (t - low) * (log_sigmas[high] - log_sigmas[low])))


def calibrate_threshold(run, target: float, low: float = 1e-4, high: float = 20.0, iters: int = 8,
                        exact: bool = False):
    """The threshold of a dynamic rule whose FLOPs speedup is closest to `target`.

    run(threshold) -> (flops speedup, anything); returns (threshold, speedup, anything) of the
    closest run. Bisection in log threshold, as the speedup mostly grows with the threshold.
    `exact`: stop at the first run within 0.1 % of the target (a ratio of call counts is hit
    exactly, and each run costs a sampling run); if bisection misses it, scan `iters` thresholds
    spread over the range: a skipped call changes the rule's later decisions, so the number of computed
    calls is not monotone in the threshold (LazyCache at 20 steps computes 8, 6, then 7 calls
    as its threshold grows).
    """
    lo, hi = math.log(low), math.log(high)
    best = None

    def attempt(log_threshold):
        nonlocal best
        speedup, result = run(math.exp(log_threshold))
        if best is None or abs(speedup - target) < abs(best[1] - target):
            best = (math.exp(log_threshold), speedup, result)
        return speedup

    def hit():
        return exact and abs(best[1] - target) <= 1e-3 * target

    for _ in range(iters):
        mid = (lo + hi) / 2
        if attempt(mid) < target:
            lo = mid
        else:
            hi = mid
        if hit():
            return best
    if exact:
        for i in range(iters):
            attempt(math.log(low) + (i + 0.5) * (math.log(high) - math.log(low)) / iters)
            if hit():
                break
    return best
