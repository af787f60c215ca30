"""HarmoniCa routers: mask semantics, the engine's per-unit execution, SDT + IEPO training, files."""
import dataclasses

import pytest
import torch

from procache_core import Schedule, SchedulePolicy, ScheduleError, find_family
from procache_core.reference.dit import DiT, DiTConfig
from procache_core.reference.sampling import sample
from procache_core.router import Router, unit_columns
from procache_core.router_training import ReferenceProblem, RouterTrainer, SigmaProblem, TrainingConfig, TrainingState

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6




def _model(depth=2):
    torch.manual_seed(0)
    model = DiT(DiTConfig(image_size=8, hidden=32, depth=depth, heads=2))
    model.reset_parameters(zero_gates=False)
    return model.eval()


def _trainer(model, **config):
    family, _ = find_family(model)
    problem = ReferenceProblem(model, STEPS, batch=2, seed=3)
    defaults = dict(iterations=3 * STEPS, beta=1e-3, lr=0.05, lambda_period=2 * STEPS)
    return RouterTrainer(problem, family, TrainingConfig(**{**defaults, **config}))


# ---- mask semantics ------------------------------------------------------------------------------
def test_mask_is_sigmoid_above_tau_and_the_first_step_always_computes():
    logits = torch.tensor([[-5.0, -5.0], [0.0, -1.0], [-2.0, 3.0]])
    router = Router(logits, tau=0.1)
    # sigmoid(0) = 0.5, sigmoid(-1) = 0.27, sigmoid(-2) = 0.12, sigmoid(3) = 0.95
    assert router.mask().tolist() == [[True, True], [True, True], [True, True]]
    assert Router(logits, tau=0.3).mask().tolist() == [[True, True], [True, False], [False, True]]
    assert Router(logits, tau=0.6).mask().tolist() == [[True, True], [False, False], [False, True]]
    assert Router(logits, tau=0.3).cache_usage_ratio() == pytest.approx(2 / 6)
    with pytest.raises(ScheduleError):
        Router(torch.zeros(3, 3))            # not (attention, MLP) pairs
    with pytest.raises(ScheduleError):
        Router(torch.zeros(3, 2), tau=1.0)


def test_router_schedule_kinds_and_unit_order():
    router = Router(torch.tensor([[-5.0] * 4, [5.0] * 4, [5.0, -5.0, 5.0, 5.0]]), tau=0.1)
    schedule = router.to_schedule()
    assert schedule.pattern == "110"        # a step with any unit reused is not a full step
    assert schedule.units[2] == (True, False, True, True)
    assert Schedule.from_json(schedule.to_json()).units == schedule.units
    assert unit_columns(1, "self_attention") == (2,) and unit_columns(1, "mlp") == (3,)
    assert unit_columns(1, "fused") == (2, 3) and unit_columns(1, "cross_attention") == ()
    # windowing forces every unit of the forced steps; resampling keeps units row by row
    windowed = schedule.windowed(0.0, 0.5, force_last_full=True)
    assert windowed.units[2] == (True,) * 4 and windowed.pattern == "111"
    stretched = schedule.resampled(5)
    assert stretched.steps == 5 and stretched.units[0] == (True,) * 4 and stretched.units[-1] == schedule.units[2]


# ---- the engine honours units --------------------------------------------------------------------
def _units(rows):
    return tuple(tuple(bool(int(c)) for c in row) for row in rows)


def test_engine_runs_exactly_the_routed_units():
    model = _model(depth=2)
    labels = torch.tensor([1, 7])
    rows = ["1111", "0110", "1000", "0001", "0000", "1111"]
    schedule = Schedule(kinds=(1, 0, 0, 0, 0, 1), units=_units(rows))
    images, run = sample(model, labels, STEPS, 1.5, seed=4, policy=SchedulePolicy(schedule), return_run=True)
    # one call per step on the [cond; uncond] batch: one count per computed branch
    assert run.branch_calls == [row.count("1") for row in rows]
    assert run.stats.summary()["misses"] == 0
    # the panel's per-step share of block work follows the computed units (equal-cost pairs here)
    shares = run.stats.summary()["compute_share"]
    assert shares[0] == shares[5] == 1.0 and shares[4] == 0.0
    assert shares[1] > shares[2] > 0.0 and shares[2] == pytest.approx(shares[3], rel=0.5)
    full = sample(model, labels, STEPS, 1.5, seed=4)
    assert not torch.allclose(images, full)
    all_on = Schedule(kinds=(1,) * STEPS, units=_units(["1111"] * STEPS))
    assert torch.equal(sample(model, labels, STEPS, 1.5, seed=4, policy=SchedulePolicy(all_on)), full)


def test_hard_routing_equals_soft_blending_with_zero_one_weights():
    # Two implementations of one rule: the engine's per-branch reuse, and the trainer's blend
    # r * fresh + (1 - r) * cache with r in {0, 1} (cache written where r > tau).
    model = _model(depth=2)
    trainer = _trainer(model)
    rows = ["1111", "1010", "0101", "0011", "1100", "0000"]
    mask = torch.tensor([[float(c) for c in row] for row in rows])
    with trainer.units.attached():
        soft = trainer.sample_with(list(mask), trajectory=0)
    noise = trainer.problem.start(0)
    labels = trainer.problem.labels
    schedule = Schedule(kinds=(1,) + (0,) * (STEPS - 1), units=_units(rows))
    hard = sample(model, labels, STEPS, 1.5, noise=noise, policy=SchedulePolicy(schedule))
    assert torch.allclose(hard, soft, atol=1e-5)


def test_a_router_for_another_model_is_refused():
    schedule = Schedule(kinds=(1, 0), units=_units(["11", "10"]))      # 1 block; the model has 2
    with pytest.raises(ScheduleError, match="units"):
        sample(_model(depth=2), torch.tensor([0]), 2, 1.5, policy=SchedulePolicy(schedule))


# ---- IEPO and SDT --------------------------------------------------------------------------------
def test_lambda_is_near_zero_when_every_step_computes_and_both_modes_agree_on_one_cached_step():
    model = _model()
    trainer = _trainer(model)
    with torch.no_grad():
        trainer.logits.fill_(5.0)
    with trainer.units.attached():
        near = trainer.image_error_proxy(0)
        with torch.no_grad():
            trainer.logits.fill_(50.0)        # sigmoid = 1 exactly: caching off
            trainer.logits[2] = -2.0          # caching on at step 2 only
        code = trainer.image_error_proxy(0)
    paper = _trainer(model, lambda_mode="paper")
    with torch.no_grad():
        paper.logits.copy_(trainer.logits)
    with paper.units.attached():
        by_paper = paper.image_error_proxy(0)
    assert (near >= 0).all() and float(near.max()) < 1e-3
    assert float(code[2]) > 100 * float(near[2])
    assert torch.allclose(code, by_paper, rtol=1e-5, atol=1e-12)
    assert float(code[1]) == 0.0 and float(code[3:].abs().max()) == 0.0


def test_paper_and_code_lambdas_differ_when_several_steps_cache():
    model = _model()
    code, paper = _trainer(model), _trainer(model, lambda_mode="paper")
    with code.units.attached():
        a = code.image_error_proxy(0)
    with paper.units.attached():
        b = paper.image_error_proxy(0)
    assert (a >= 0).all() and (b >= 0).all() and a[0] == 0 and b[0] == 0
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_a_few_iterations_reduce_the_distillation_loss(mode):
    # beta 0: the loss is lambda * MSE(teacher, student) only, which training must lower
    trainer = _trainer(_model(), beta=0.0, lr=0.2, iterations=6 * STEPS, lambda_period=10 ** 6, lambda_mode=mode)
    router = trainer.run()
    losses = trainer.state.losses
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]
    assert router.steps == STEPS and router.units == 4
    assert router.metadata["lambda_mode"] == mode and float(router.metadata["beta"]) == 0.0


def test_beta_raises_the_cache_usage_ratio_and_training_is_deterministic():
    low = _trainer(_model(), beta=0.0, lr=0.2, iterations=4 * STEPS).run()
    high = _trainer(_model(), beta=1.0, lr=0.2, iterations=4 * STEPS).run()
    again = _trainer(_model(), beta=1.0, lr=0.2, iterations=4 * STEPS).run()
    assert high.cache_usage_ratio() > low.cache_usage_ratio()
    assert torch.equal(high.logits, again.logits)
    assert (high.logits[0] == 5.0).all() and float(high.logits.abs().max()) <= 5.0


def test_resume_from_a_saved_state_continues_the_same_run():
    whole = _trainer(_model(), iterations=4 * STEPS)
    whole.run()
    first = _trainer(_model(), iterations=2 * STEPS)
    first.run()
    state, meta = TrainingState.from_bytes(first.state_bytes())
    assert state.iteration == 2 * STEPS and state.trajectory == 2 and "config" in meta
    model = _model()
    family, _ = find_family(model)
    resumed = RouterTrainer(ReferenceProblem(model, STEPS, batch=2, seed=3), family,
                            dataclasses.replace(whole.config), state=state)
    resumed.run()
    assert torch.allclose(resumed.router().logits, whole.router().logits, atol=1e-6)
    assert resumed.state.losses == pytest.approx(whole.state.losses, rel=1e-5)


def test_an_interrupted_run_keeps_the_last_trajectory_boundary():
    trainer = _trainer(_model(), iterations=4 * STEPS)

    def stop(iteration, total, info):
        if iteration == 2 * STEPS + 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        trainer.run(progress=stop)
    state, _ = TrainingState.from_bytes(trainer.state_bytes())
    assert state.trajectory == 2 and state.iteration == 2 * STEPS


def test_sigma_problem_euler_matches_ddim_and_trains():
    # k-diffusion Euler on sigma = sqrt((1 - a) / a) with x scaled by 1 / sqrt(a) is DDIM
    model = _model()
    ref = ReferenceProblem(model, STEPS, batch=2, seed=5)
    from procache_core.reference.sampling import alphas_cumprod
    acp = alphas_cumprod().float()
    ts = ref.timesteps
    sig = [float(((1 - acp[t]) / acp[t]).sqrt()) for t in ts] + [0.0]

    def denoise(x, sigma):
        k = sig.index(sigma)
        a = acp[ts[k]]
        eps = ref.predict(x * a.sqrt(), k)
        return x - sigma * eps
    problem = SigmaProblem(model, denoise, torch.tensor(sig), lambda j: ref.start(j) * (1 + sig[0] ** 2) ** 0.5)
    x = problem.start(0)            # x_T / sqrt(a_T)
    y = ref.start(0)
    for k in range(STEPS):
        x = problem.advance(x, problem.predict(x, k), k)
        y = ref.advance(y, ref.predict(y, k), k)
    assert torch.allclose(x, y, atol=1e-4)
    family, _ = find_family(model)
    router = RouterTrainer(problem, family, TrainingConfig(iterations=2 * STEPS, lambda_period=STEPS)).run()
    assert router.steps == STEPS


# ---- options beyond the method: reuse limit, refresh credit ----------------------------------------
def _runs(column):
    """Longest run of reused steps in a column of a mask."""
    longest = run = 0
    for compute in column:
        run = 0 if compute else run + 1
        longest = max(longest, run)
    return longest


def test_reuse_limit_makes_a_unit_compute_after_max_reuse_steps_in_a_row():
    logits = torch.full((7, 2), -5.0)
    logits[0] = 5.0
    logits[2, 1] = 5.0                       # unit 1 computes at step 2 by itself: its count restarts
    limited = Router(logits, tau=0.1).limit_reuse(2)
    assert limited.mask()[:, 0].tolist() == [True, False, False, True, False, False, True]
    assert limited.mask()[:, 1].tolist() == [True, False, True, False, False, True, False]
    assert limited.metadata["max_reuse"] == "2" and (limited.logits[3, 0] == 5.0)
    assert Router(logits, tau=0.1).limit_reuse(0).mask().equal(Router(logits, tau=0.1).mask())
    with pytest.raises(ScheduleError):
        TrainingConfig(max_reuse=-1)


def test_training_with_a_reuse_limit_trains_and_returns_a_router_within_it():
    free = _trainer(_model(), beta=1.0, lr=0.5, iterations=4 * STEPS).run()
    limited = _trainer(_model(), beta=1.0, lr=0.5, iterations=4 * STEPS, max_reuse=2).run()
    assert max(_runs(c) for c in free.mask().T.tolist()) > 2          # without the limit it reuses longer
    assert max(_runs(c) for c in limited.mask().T.tolist()) <= 2
    assert limited.cache_usage_ratio() < free.cache_usage_ratio()
    assert limited.metadata["max_reuse"] == "2"


def test_refresh_credit_is_the_gradient_of_a_later_loss_through_the_cache():
    # tau tiny: every student step writes its blend, so the cache is the soft chain
    # C_j = C_{j-1} + w_j (f_j - C_{j-1}) and the credit must equal its exact derivative
    from procache_core.router_training import SoftUnits
    model = _model()
    family, _ = find_family(model)
    units = SoftUnits(family, model, tau=1e-3, refresh_credit=True)
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(2, 1, 8, 8, generator=gen) for _ in range(4)]
    y = torch.tensor([1, 2])
    ts = [900, 700, 500, 300]

    def run(logits, credit):
        units.clear()
        loss = None
        for k, x in enumerate(xs):
            t = torch.full((2,), ts[k], dtype=torch.long)
            if k == 0:
                with torch.no_grad(), units.weighted(torch.ones(units.units), 0):
                    model(x, t, y)
                continue
            with torch.no_grad(), units.weighted(None):
                teacher = model(x, t, y)
            with torch.set_grad_enabled(credit), units.weighted(torch.sigmoid(logits[k]), k):
                student = model(x, t, y)
            loss = ((teacher - student) ** 2).mean()
            if credit and k < len(xs) - 1:
                units.give_refresh_credit(torch.zeros_like(logits), logits)     # records step k
        return loss

    logits = torch.randn(4, units.units, generator=gen).requires_grad_(True)
    with units.attached():
        loss = run(logits, credit=True)
        loss.backward()
        grad = logits.grad.clone()
        units.give_refresh_credit(grad, logits)
        numeric = torch.zeros_like(grad)
        with torch.no_grad():
            for j in range(1, 4):
                for u in range(units.units):
                    step = torch.zeros_like(logits)
                    step[j, u] = 1e-2
                    numeric[j, u] = (run(logits + step, False) - run(logits - step, False)) / 2e-2
    assert float(numeric[1:3].abs().max()) > 0          # earlier steps do matter through the cache
    assert torch.allclose(grad[1:], numeric[1:], rtol=2e-2, atol=2e-2 * float(numeric.abs().max()))


def test_refresh_credit_gives_nothing_to_a_unit_the_reuse_limit_made_compute():
    from procache_core.router_training import SoftUnits
    model = _model()
    family, _ = find_family(model)
    units = SoftUnits(family, model, tau=0.1, max_reuse=1, refresh_credit=True)
    logits = torch.full((4, units.units), -3.0, requires_grad=True)     # w = 0.047: every unit reuses
    x, y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 2])
    added = []
    with units.attached():
        units.clear()
        for k in range(4):
            t = torch.full((2,), 900 - 200 * k, dtype=torch.long)
            if k == 0:
                with torch.no_grad(), units.weighted(torch.ones(units.units), 0):
                    model(x, t, y)
                continue
            with torch.no_grad(), units.weighted(None):
                teacher = model(x, t, y)
            with units.weighted(torch.sigmoid(logits[k]), k):
                student = model(x, t, y)
                forced = units.forced.clone()
            ((teacher - student) ** 2).mean().backward()
            grad = torch.zeros_like(logits)
            units.give_refresh_credit(grad, logits)
            added.append((forced, grad))
    # max_reuse 1: step 1 reuses, step 2 is made to compute, step 3 reuses its fresh cache
    assert [bool(f.all()) for f, _ in added] == [False, True, False]
    assert float(added[2][1].abs().sum()) == 0      # step 2 was forced: no credit to it, nor past it
    assert float(added[1][1].abs().sum()) == 0      # step 2 read no cache (weight 1)


# ---- files ----------------------------------------------------------------------------------------
def test_router_files_do_not_depend_on_the_order_metadata_was_given_in():
    logits = torch.randn(4, 6)
    a = Router(logits, 0.1, {"model": "m", "beta": "1e-07", "steps": "4", "sampler": "euler"}).to_bytes()
    b = Router(logits, 0.1, {"sampler": "euler", "steps": "4", "beta": "1e-07", "model": "m"}).to_bytes()
    assert a == b and Router.from_bytes(a).metadata["beta"] == "1e-07"


def test_safetensors_and_text_round_trips_are_exact(tmp_path):
    router = Router(torch.randn(5, 6) * 3, tau=0.15,
                    metadata={"model": "DiT", "sampler": "ddim", "steps": 5, "cfg": 1.5, "beta": 1e-4})
    path = tmp_path / "r.safetensors"
    router.save(str(path))
    for back in (Router.load(str(path)), Router.from_text(router.to_text())):
        assert torch.equal(back.logits, router.logits)
        assert back.tau == 0.15 and back.metadata["sampler"] == "ddim" and back.metadata["cfg"] == "1.5"
        assert back.to_schedule().units == router.to_schedule().units
    with pytest.raises(ScheduleError):
        Router.from_bytes(b"not a file")
    with pytest.raises(ScheduleError):
        Router.from_text('{"format": "procache.router", "version": 1, "shape": [2, 2], "tau": 0.1, '
                         '"logits_float32_base64": "AAAA"}')


def test_authors_checkpoint_rows_are_reversed():
    routers = {"0.prob": torch.tensor([1.0, 2.0]), "1.prob": torch.tensor([3.0, 4.0]),
               "2.prob": torch.tensor([5.0, 5.0])}
    router = Router.from_authors_checkpoint(routers)
    assert router.logits.tolist() == [[5.0, 5.0], [3.0, 4.0], [1.0, 2.0]]
