"""Training a HarmoniCa router: Step-Wise Denoising Training (SDT) with the Image-Error-Proxy-guided
objective (IEPO), as the method's released code does it (method.md §4.3-4.5).

No images: every "epoch" is one whole sampling trajectory from fresh noise. Step 0 runs in full
without gradients and fills the cache. At every later step k the frozen model runs twice on the
same (perturbed) x: a teacher pass with every unit computed that never writes the cache, and a
student pass in which unit u outputs r_u * fresh_u + (1 - r_u) * cache_u with r = sigmoid(logits[k]);
afterwards unit u's cache is set to that blended output only where r_u > tau (the hard rule of
inference). The loss is lambda[k] * mean((out_T - out_S)^2) + beta * sum_u r_u, one AdamW step on
the logits (clamped to [-5, 5]) per sampler step, and the trajectory continues from the STUDENT's
output, so training sees the drift that caching causes at inference.

lambda[k] (the image error proxy) is recomputed without gradients every C training iterations:
  "code"  (default, the released code): switch caching on step by step in denoising order;
          lambda[k] = mean((x0 with caching on at steps <= k - x0 with caching on at steps < k)^2)
  "paper" (the paper's definition): lambda[t] = mean((x0 with the router everywhere - x0 with
          the router everywhere except step t, which computes)^2)
Each refresh costs T samplings of T model calls.

The model is reached through a small `Problem` (start a trajectory, predict, advance one step),
so the same trainer runs on the reference DiT and inside ComfyUI.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from .families.base import FamilySpec, resolve
from .router import FIRST_STEP_LOGIT, LOGIT_BOUND, ReuseLimit, Router, tied_columns, unit_columns
from .safetensors_header import metadata as header_metadata
from .safetensors_header import sorted_header
from .schedule import ScheduleError

LAMBDA_MODES = ("code", "paper")
STATE_FORMAT = "procache.router-training"


class Interrupted(Exception):
    """Raised by a progress callback to stop training; the last trajectory boundary is kept."""


class Problem(Protocol):
    """What the trainer needs from a model and a sampler."""

    model: nn.Module        # the diffusion model whose blocks the family describes
    steps: int

    def start(self, trajectory: int) -> torch.Tensor:
        """The initial latent of trajectory `trajectory` (seeded by it: reproducible, resumable)."""

    def predict(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The model output at `step` with guidance applied (what teacher and student compare)."""

    def advance(self, x: torch.Tensor, output: torch.Tensor, step: int) -> torch.Tensor:
        """One sampler step from `output` (called in order, once per step of a trajectory)."""


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    iterations: int = 2000      # training steps, each trajectory's no-grad first step included
    beta: float = 1e-4          # weight of sum(r): the speed/quality knob
    lr: float = 0.01
    tau: float = 0.1            # the same threshold at training and inference
    lambda_period: int = 500    # C: lambda is recomputed every C training steps
    lambda_mode: str = "code"
    seed: int = 0               # logits init (trajectory seeds come from the problem)
    # Two options beyond the method (off by default), for models where the learned table reuses
    # one stale cache for many steps in a row (docs/harmonica.md, "Options beyond the paper"):
    max_reuse: int = 0          # > 0: a unit computes after reusing this many steps in a row
    refresh_credit: bool = False    # credit a step's compute with what its fresher cache saves later

    def __post_init__(self):
        if self.lambda_mode not in LAMBDA_MODES:
            raise ScheduleError(f"lambda_mode must be one of {LAMBDA_MODES}, got {self.lambda_mode!r}")
        if not 0.0 < self.tau < 1.0:
            raise ScheduleError(f"tau must be in (0, 1), got {self.tau}")
        if self.iterations < 1 or self.lambda_period < 1:
            raise ScheduleError("iterations and lambda_period must be at least 1")
        if self.beta < 0 or self.lr <= 0:
            raise ScheduleError("beta must be >= 0 and lr > 0")
        if self.max_reuse < 0:
            raise ScheduleError(f"max_reuse must be >= 0 (0: no limit), got {self.max_reuse}")


class SoftUnits:
    """Taps on every routed branch of a model's blocks, for the duration of `attached()`.

    weights None: teacher (every branch computes, the cache is left alone). Otherwise each routed
    branch outputs w * fresh + (1 - w) * cached with w its unit's weight, and stores that blend
    (detached) where w > tau. The fresh branch is always computed (the gradient needs it). The
    cache is keyed per model call of a pass, so cond and uncond run in separate calls keep theirs.
    """

    def __init__(self, family: FamilySpec, model: nn.Module, tau: float, max_reuse: int = 0,
                 refresh_credit: bool = False):
        self.family, self.model, self.tau = family, model, tau
        self.blocks = family.blocks(model)
        self.units = 2 * len(self.blocks)
        tied = tied_columns(family, model)
        self.owner = torch.tensor([tied.get(j, j) for j in range(self.units)])
        self.cache: dict = {}
        self.weights: torch.Tensor | None = None
        self.limit = ReuseLimit(self.units, max_reuse)
        self.refresh_credit = refresh_credit
        self.history: dict = {}     # cache key -> [(step, column, w, delta, written)], oldest first
        self.used: list = []        # (cache key, the cached tensor as a leaf) read by this step's student
        self.pending: list = []     # this step's history entries, added after its credit is given
        self.forced: torch.Tensor | None = None    # [units] bool: made to compute by the limit this pass
        self._call = -1
        self._step = 0

    def clear(self) -> None:
        self.cache.clear()
        self.history.clear()
        self.used.clear()
        self.pending.clear()
        self.limit.reset()

    @contextlib.contextmanager
    def attached(self):
        from .engine import _instance_forward
        with contextlib.ExitStack() as stack:
            for index, block_stack, block in self.blocks:
                for branch in block_stack.branches:
                    columns = unit_columns(index, branch.role)
                    module = resolve(block, branch.path)
                    if module is None or not columns:
                        continue
                    stack.enter_context(_instance_forward(module, self._tap(index, branch.name, columns[0])))
            handle = self.model.register_forward_pre_hook(self._new_call)
            stack.callback(handle.remove)
            yield self

    @contextlib.contextmanager
    def weighted(self, weights: torch.Tensor | None, step: int = 0):
        """One pass with these [units] weights (None: teacher), once per sampler step and in order
        for the reuse limit; units it makes compute get weight 1 (and no gradient)."""
        self.forced = None
        if weights is not None and self.limit.max_reuse:     # no limit: no host sync per pass
            self.forced = self.limit.forced(weights.detach() > self.tau)
            weights = torch.where(self.forced.to(weights.device), torch.ones_like(weights), weights)
        self.weights, self._call, self._step = weights, -1, step
        try:
            yield
        finally:
            self.weights = None

    def give_refresh_credit(self, grad: torch.Tensor, logits: torch.Tensor) -> None:
        """After a student pass's backward: add to `grad` (of `logits`, [steps, units]) what each
        earlier step's weight is worth through the cache this step read. A unit's cache after step j
        is C_j = C_{j-1} + w_j * (f_j - C_{j-1}) where written (w_j > tau), so d C_{k-1} / d w_j =
        (f_j - C_{j-1}) * prod over later writes i of (1 - w_i); a reused step (not written) is
        credited as if its weight had moved the cache by that much, which is what computing it
        would have done. Then this step's entries join the history."""
        for key, leaf in self.used:
            if leaf.grad is None:
                continue
            entries, carry = self.history.get(key, []), 1.0
            for n in range(len(entries) - 1, -1, -1):
                step, column, w, delta, written = entries[n]
                if w is not None:
                    p = torch.sigmoid(logits[step, self.owner[column]].detach())
                    dot = float((leaf.grad.float() * delta.float()).sum())
                    grad[step, self.owner[column]] += carry * dot * p * (1 - p)
                if written:
                    carry *= 1.0 - (1.0 if w is None else w)
                if carry < 1e-4:
                    del entries[:n]     # older entries can no longer reach any later step
                    break
        self.used.clear()
        for key, entry in self.pending:
            self.history.setdefault(key, []).append(entry)
        self.pending.clear()

    def _new_call(self, module, args):
        self._call += 1

    def _tap(self, index: int, name: str, column: int):
        def make(original):
            def forward(*args, **kwargs):
                fresh = original(*args, **kwargs)
                if self.weights is None:
                    return fresh
                w = self.weights[column]
                key = (self._call, index, name)
                cached = self.cache.get(key)
                written = cached is None or float(w.detach()) > self.tau
                if cached is None or cached.shape != fresh.shape:
                    out = fresh
                elif self.refresh_credit and torch.is_grad_enabled():
                    leaf = cached.detach().requires_grad_(True)
                    self.used.append((key, leaf))
                    out = w.to(fresh.dtype) * fresh + (1 - w.to(fresh.dtype)) * leaf
                    # a unit the reuse limit made compute has weight 1 and no logit to credit
                    learnable = w.requires_grad and not (self.forced is not None and bool(self.forced[column]))
                    self.pending.append((key, (self._step, column, float(w.detach()) if learnable else None,
                                               (fresh - cached).detach(), written)))
                else:
                    out = w.to(fresh.dtype) * fresh + (1 - w.to(fresh.dtype)) * cached
                if written:
                    self.cache[key] = out.detach()
                return out
            return forward
        return make


@dataclasses.dataclass
class TrainingState:
    """Everything needed to continue training: saved at trajectory boundaries."""

    logits: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    adam_steps: int = 0
    iteration: int = 0
    trajectory: int = 0
    lambdas: torch.Tensor | None = None
    next_refresh: int = 0
    losses: list = dataclasses.field(default_factory=list)     # mean loss per trajectory

    def to_bytes(self, metadata: dict) -> bytes:
        from safetensors.torch import save
        tensors = {"logits": self.logits, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.lambdas is not None:
            tensors["lambdas"] = self.lambdas
        meta = {**{k: str(v) for k, v in metadata.items()}, "format": STATE_FORMAT,
                "counters": json.dumps({"adam_steps": self.adam_steps, "iteration": self.iteration,
                                        "trajectory": self.trajectory, "next_refresh": self.next_refresh,
                                        "losses": self.losses})}
        return sorted_header(save({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()},
                                  metadata=meta))

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple["TrainingState", dict]:
        from safetensors.torch import load
        tensors = load(data)
        meta = dict(header_metadata(data))
        if meta.get("format") != STATE_FORMAT:
            raise ScheduleError("not a router training state")
        counters = json.loads(meta.pop("counters"))
        state = cls(tensors["logits"], tensors["exp_avg"], tensors["exp_avg_sq"], counters["adam_steps"],
                    counters["iteration"], counters["trajectory"], tensors.get("lambdas"), counters["next_refresh"],
                    counters["losses"])
        return state, meta

    def copy(self) -> "TrainingState":
        return dataclasses.replace(self, logits=self.logits.clone(), exp_avg=self.exp_avg.clone(),
                                   exp_avg_sq=self.exp_avg_sq.clone(),
                                   lambdas=None if self.lambdas is None else self.lambdas.clone(),
                                   losses=list(self.losses))


class RouterTrainer:
    """SDT + IEPO on `problem`'s model. `state` continues an earlier run (resume)."""

    def __init__(self, problem: Problem, family: FamilySpec, config: TrainingConfig,
                 state: TrainingState | None = None, metadata: dict | None = None,
                 grad_context: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.problem, self.family, self.config = problem, family, config
        # entered around each student pass and its backward (e.g. saved-tensor hooks for models
        # whose blocks add into their residual stream in place)
        self.grad_context = grad_context or contextlib.nullcontext
        self.metadata = dict(metadata or {})
        self.units = SoftUnits(family, problem.model, config.tau, config.max_reuse, config.refresh_credit)
        steps, width = problem.steps, self.units.units
        if steps < 2:
            raise ScheduleError("a router needs at least 2 steps (the first always computes)")
        if state is None:
            init = Router.initial(steps, width // 2, seed=config.seed, tau=config.tau).logits
            state = TrainingState(init, torch.zeros_like(init), torch.zeros_like(init), next_refresh=0)
        if tuple(state.logits.shape) != (steps, width):
            raise ScheduleError(f"the saved training state is for {tuple(state.logits.shape)} logits, "
                                f"this model and step count need {(steps, width)}")
        self.state = state
        self.checkpoint = state.copy()      # the last trajectory boundary
        device = self._device()
        self.logits = nn.Parameter(state.logits.clone().to(device))
        self.optimizer = torch.optim.AdamW([self.logits], lr=config.lr, weight_decay=0.0)
        if state.adam_steps:
            self.optimizer.state[self.logits] = {"step": torch.tensor(float(state.adam_steps)),
                                                 "exp_avg": state.exp_avg.clone().to(device),
                                                 "exp_avg_sq": state.exp_avg_sq.clone().to(device)}

    def _device(self):
        try:
            return next(self.problem.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    # ---- the router table --------------------------------------------------------------------
    def weights(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        """[steps, units] soft compute weights; tied units share their owner's logit."""
        logits = self.logits if logits is None else logits
        return torch.sigmoid(logits[:, self.units.owner.to(logits.device)])

    def router(self) -> Router:
        logits = self.logits.detach()[:, self.units.owner.to(self.logits.device)].cpu().clone()
        logits[0] = FIRST_STEP_LOGIT
        meta = {**self.metadata, "beta": repr(self.config.beta), "lr": repr(self.config.lr),
                "lambda_mode": self.config.lambda_mode, "lambda_period": str(self.config.lambda_period),
                "iterations": str(self.state.iteration), "steps": str(self.problem.steps)}
        if self.config.refresh_credit:
            meta["refresh_credit"] = "on"
        return Router(logits, self.config.tau, meta).limit_reuse(self.config.max_reuse)

    # ---- sampling with soft units (no gradients) ---------------------------------------------
    @torch.no_grad()
    def sample_with(self, step_weights: Sequence[torch.Tensor | None], trajectory: int) -> torch.Tensor:
        """The final latent of trajectory `trajectory` with per-step unit weights (1 = compute)."""
        problem, units = self.problem, self.units
        x = problem.start(trajectory)
        units.clear()
        for k in range(problem.steps):
            with units.weighted(step_weights[k], k):
                out = problem.predict(x, k)
            x = problem.advance(x, out, k)
        units.clear()
        return x

    @torch.no_grad()
    def image_error_proxy(self, trajectory: int) -> torch.Tensor:
        """lambda per step (index 0 unused, 0), by `config.lambda_mode`."""
        steps = self.problem.steps
        r = self.weights().detach()
        ones = torch.ones_like(r[0])
        lambdas = torch.zeros(steps)
        if self.config.lambda_mode == "code":
            weights = [ones] * steps
            previous = self.sample_with(weights, trajectory)
            for k in range(1, steps):
                weights = weights[:k] + [r[k]] + weights[k + 1:]
                current = self.sample_with(weights, trajectory)
                lambdas[k] = float(((current - previous) ** 2).mean())
                previous = current
        else:
            cached = [ones] + [r[k] for k in range(1, steps)]
            x0 = self.sample_with(cached, trajectory)
            for t in range(1, steps):
                computed = cached[:t] + [ones] + cached[t + 1:]
                lambdas[t] = float(((x0 - self.sample_with(computed, trajectory)) ** 2).mean())
        return lambdas

    # ---- training ----------------------------------------------------------------------------
    def run(self, progress: Callable[[int, int, dict], None] | None = None) -> Router:
        """Train until `config.iterations`; progress(iteration, total, info) may raise to stop
        (the state then holds the last trajectory boundary)."""
        cfg, state = self.config, self.state
        with self.units.attached():
            while state.iteration < cfg.iterations:
                self._trajectory(progress)
        return self.router()

    def _trajectory(self, progress):
        cfg, state, problem, units = self.config, self.state, self.problem, self.units
        if state.lambdas is None or state.iteration >= state.next_refresh:
            state.lambdas = self.image_error_proxy(state.trajectory)
            state.next_refresh = (state.iteration // cfg.lambda_period + 1) * cfg.lambda_period
        lambdas = state.lambdas.tolist()
        x = problem.start(state.trajectory)
        units.clear()
        with torch.no_grad(), units.weighted(torch.ones(units.units, device=self.logits.device)):
            out = problem.predict(x, 0)
        x = problem.advance(x, out, 0).detach()
        state.iteration += 1
        losses = []
        for k in range(1, problem.steps):
            if state.iteration >= cfg.iterations:
                break
            with torch.no_grad(), units.weighted(None):
                teacher = problem.predict(x, k)
            r = self.weights()[k]
            with torch.enable_grad(), self.grad_context():
                with units.weighted(r, k):
                    student = problem.predict(x, k)
                distill = ((teacher.float() - student.float()) ** 2).mean()
                loss = lambdas[k] * distill + cfg.beta * r.sum()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if cfg.refresh_credit:
                units.give_refresh_credit(self.logits.grad, self.logits)
            self.logits.grad[0] = 0.0       # the first row is fixed at +5
            self.optimizer.step()
            with torch.no_grad():
                self.logits.clamp_(-LOGIT_BOUND, LOGIT_BOUND)
                self.logits[0] = FIRST_STEP_LOGIT
            losses.append(float(loss.detach()))
            x = problem.advance(x, student.detach(), k).detach()
            state.iteration += 1
            if progress is not None:
                progress(state.iteration, cfg.iterations, {"loss": losses[-1], "trajectory": state.trajectory})
        units.clear()
        state.trajectory += 1
        state.losses.append(sum(losses) / len(losses) if losses else math.nan)
        self._snapshot()

    def _snapshot(self):
        st = self.optimizer.state.get(self.logits, {})
        state = self.state
        state.logits = self.logits.detach().cpu().clone()
        if st:
            state.exp_avg = st["exp_avg"].detach().cpu().clone()
            state.exp_avg_sq = st["exp_avg_sq"].detach().cpu().clone()
            state.adam_steps = int(st["step"])
        self.checkpoint = state.copy()

    def state_bytes(self) -> bytes:
        """The last trajectory boundary, for resuming later."""
        return self.checkpoint.to_bytes({**self.metadata, "config": json.dumps(dataclasses.asdict(self.config))})


# ---- problems ------------------------------------------------------------------------------------
class ReferenceProblem:
    """DDIM (eta 0) with CFG on the pack's reference DiT; each trajectory draws its class labels
    uniformly and its noise from (seed, trajectory), as the authors' training draws ImageNet classes."""

    def __init__(self, model, steps: int, cfg: float = 1.5, batch: int = 8, seed: int = 0):
        from .reference.sampling import alphas_cumprod, ddim_timesteps
        self.model, self.steps, self.cfg, self.batch, self.seed = model, steps, cfg, batch, seed
        self.acp = alphas_cumprod().float()
        self.timesteps = ddim_timesteps(steps)
        self.labels = None

    def start(self, trajectory: int) -> torch.Tensor:
        c = self.model.cfg
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + trajectory)
        self.labels = torch.randint(0, c.classes, (self.batch,), generator=gen)
        return torch.randn(self.batch, c.channels, c.image_size, c.image_size, generator=gen)

    def predict(self, x: torch.Tensor, step: int) -> torch.Tensor:
        t = self.timesteps[step]
        y = torch.cat([self.labels, torch.full_like(self.labels, self.model.cfg.classes)])
        eps = self.model(torch.cat([x, x]), torch.full((2 * x.shape[0],), t, dtype=torch.long), y)
        cond, uncond = eps.chunk(2)
        return uncond + self.cfg * (cond - uncond)

    def advance(self, x: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
        ts = self.timesteps
        a_t = self.acp[ts[step]]
        a_prev = self.acp[ts[step + 1]] if step + 1 < len(ts) else torch.tensor(1.0)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


class SigmaProblem:
    """A k-diffusion style problem: denoise(x, sigma) -> denoised (guidance applied), sigmas
    decreasing to 0. The compared output is (x - denoised) / sigma: the noise prediction of
    epsilon models and the velocity of flow models. Samplers: "euler" (DDIM for epsilon models)
    and "dpmpp_2m"."""

    SAMPLERS = ("euler", "dpmpp_2m")

    def __init__(self, model: nn.Module, denoise: Callable, sigmas: torch.Tensor, start: Callable[[int], torch.Tensor],
                 sampler: str = "euler"):
        if sampler not in self.SAMPLERS:
            raise ScheduleError(f"training samplers: {', '.join(self.SAMPLERS)}; got {sampler!r}")
        self.model, self.denoise, self.sampler = model, denoise, sampler
        self.sigmas = [float(s) for s in sigmas]
        self.steps = len(self.sigmas) - 1
        self._start = start
        self._previous = None

    def start(self, trajectory: int) -> torch.Tensor:
        self._previous = None
        return self._start(trajectory)

    def predict(self, x: torch.Tensor, step: int) -> torch.Tensor:
        sigma = self.sigmas[step]
        denoised = self.denoise(x, sigma)
        return (x - denoised) / sigma

    def advance(self, x: torch.Tensor, output: torch.Tensor, step: int) -> torch.Tensor:
        s, s_next = self.sigmas[step], self.sigmas[step + 1]
        denoised = x - s * output
        if self.sampler == "euler" or s_next == 0:
            self._previous = denoised
            return x + (s_next - s) * output
        # DPM-Solver++(2M), as k-diffusion's sample_dpmpp_2m
        t, t_next = -math.log(s), -math.log(s_next)
        h = t_next - t
        if self._previous is None or step == 0:
            d = denoised
        else:
            h_last = t - (-math.log(self.sigmas[step - 1]))
            ratio = h_last / h
            d = (1 + 1 / (2 * ratio)) * denoised - (1 / (2 * ratio)) * self._previous
        self._previous = denoised
        return (s_next / s) * x - math.expm1(-h) * d
