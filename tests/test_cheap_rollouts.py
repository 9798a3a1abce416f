"""Issue 34, cheaper rollouts: a deterministic tail of fewer steps of a higher-order solver
(``sampler.tail_steps``, ``sampler.tail_solver``), shared-noise groups and trees
(``sampler.shared_noise``, ``sampler.branching``), and the transformer evaluations every iteration
logs (``perf/evals/*``).

What must stay exact: the SDE steps a trajectory stores (so replay, the ratio 1 before an update,
and per-group advantages), the evaluation count (a closed formula, written out here), and the
crediting of a tree's shared SDE steps (each leaf's log-probability holds its ancestors' steps, so a
shared transition is pushed with the sum of its leaves' advantages).
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from flowdppo_video import sde
from flowdppo_video.runs.config import ConfigError, load_config
from flowdppo_video.training import evaluation
from flowdppo_video.training.rollout import plain_sampler, rollout
from flowdppo_video.trainer import Trainer

from .conftest import TINY_CONFIG, tiny_config

PROMPTS = ["a red ball rolls to the left", "a blue square slides up"]
NEG = "blurry, static"


# ------------------------------------------------------------------ pure math

def _gaussian_flow(m: float, c: float):
    """The exact flow of data ``x0 ~ N(m, c^2)``: velocity ``E[eps - x0 | x_sigma]`` and the ODE's
    solution (it keeps the standardised value ``z = (x - (1 - sigma) m) / sqrt(V(sigma))``)."""
    def var(s):
        return (1 - s) ** 2 * c * c + s * s

    def velocity(x, s):
        r = x - (1 - s) * m
        return s / var(s) * r - (m + (1 - s) * c * c / var(s) * r)

    def solve(x, s, s_end):
        return (1 - s_end) * m + math.sqrt(var(s_end)) * (x - (1 - s) * m) / math.sqrt(var(s))
    return velocity, solve


def _integrate(solver: str, x, sigmas, velocity):
    prev = None
    for s, sn in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        v = velocity(x, s)
        if solver == "dpm2m":
            x, x0 = sde.dpm2m_step(x, v, s, sn, prev)
            prev = (x0, s)
        elif solver == "heun":
            x = sde.heun_step(x, v, velocity(sde.ode_step(x, v, s, sn), sn), s, sn)
        else:
            x = sde.ode_step(x, v, s, sn)
    return x


def test_higher_order_tails_are_closer_to_the_exact_flow_than_euler():
    velocity, solve = _gaussian_flow(m=1.5, c=0.3)
    x = torch.linspace(-2, 2, 16, dtype=torch.float32).view(16, 1, 1, 1, 1)
    sched = sde.flow_schedule(20, shift=3.0)
    start = 6
    exact = solve(x.double(), float(sched[start]), 0.0)
    err = {}
    for solver in sde.TAIL_SOLVERS:
        sig = sde.tail_schedule(sched, start, 4)
        err[solver] = float((_integrate(solver, x, sig, velocity).double() - exact).abs().max())
    full = float((_integrate("euler", x, sched[start:], velocity).double() - exact).abs().max())
    # Second order: 4 Heun steps beat Euler's 4 and the schedule's own 14; DPM-Solver++(2M) beats
    # Euler's 4, its last step (into sigma 0, the x0 prediction) first order as in diffusers.
    assert err["heun"] < err["euler"] / 10 and err["heun"] < full / 5
    assert err["dpm2m"] < err["euler"]


def test_dpm2m_first_and_last_steps_are_euler_and_x0():
    x, v = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2)
    x1, x0 = sde.dpm2m_step(x, v, 0.7, 0.4)
    assert torch.allclose(x1, sde.ode_step(x, v, 0.7, 0.4), atol=1e-6) and torch.equal(x0, x - 0.7 * v)
    last, _ = sde.dpm2m_step(x, v, 0.3, 0.0, (x0, 0.7))
    assert torch.allclose(last, x - 0.3 * v)
    assert torch.allclose(sde.heun_step(x, v, v, 0.7, 0.4), sde.ode_step(x, v, 0.7, 0.4))


def test_tail_schedule_keeps_the_schedules_own_sigmas():
    sched = sde.flow_schedule(10, shift=3.0)
    sig = sde.tail_schedule(sched, 3, 3)
    assert sig.tolist() == sched[[3, 5, 8, 10]].tolist()          # round(linspace(3, 10, 4))
    assert torch.equal(sde.tail_schedule(sched, 3, 9), sched[3:])    # more steps than are left: all of them
    assert sde.tail_schedule(sched, 10, 2).tolist() == [0.0]         # nothing left
    assert [sde.tail_evaluations(s, 3) for s in sde.TAIL_SOLVERS] == [3, 6, 3]
    assert sde.tail_evaluations("heun", 0) == 0
    assert sde.branch_widths([2, 1, 2], 1) == [1, 2, 2, 4]
    assert sde.leaf_ancestor(torch.arange(8), 4, 2).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# ------------------------------------------------------------------ config

def test_options_are_config_keys_and_bad_values_name_them(tmp_path):
    base = [f"run.output_dir={tmp_path}", "data.group_size=4"]
    cfg = load_config(TINY_CONFIG, [*base, "sampler.tail_steps=3", "sampler.tail_solver=heun",
                                    "sampler.shared_noise=true", "sampler.branching=[2, 2]", "eval.sampler_tail=true"])
    s = cfg.sampler
    got = (s.tail_steps, s.tail_solver, s.shared_noise, s.branching, cfg.eval.sampler_tail)
    assert got == (3, "heun", True, [2, 2], True)
    assert load_config(TINY_CONFIG, base).sampler.tail_steps is None            # the default: the full schedule
    for bad, msg in [("sampler.tail_solver=rk4", "sampler.tail_solver='rk4' is not one of euler, heun, dpm2m"),
                     ("sampler.tail_steps=-1", "sampler.tail_steps must be >= 1"),
                     ("sampler.branching=[2, 2]", "sampler.branching needs sampler.shared_noise=true"),
                     ("sampler.branching=[4]", "sampler.branching must be 2 factors"),
                     ("sampler.branching=[2, 3]", "product is data.group_size=4")]:
        over = [*base, bad] + (["sampler.shared_noise=true"] if "shared_noise" not in msg else [])
        with pytest.raises(ConfigError, match=re.escape(msg)):
            load_config(TINY_CONFIG, over)
    assert plain_sampler(s) == dataclasses.replace(s, tail_steps=None, shared_noise=False, branching=None)
    assert plain_sampler(s, keep_tail=True).tail_steps == 3


# ------------------------------------------------------------------ rollouts on the tiny Wan

@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("cheap"), "data.negative_prompt=" + NEG, "model.keep_text_encoder=true",
                      "sampler.batch_size=3")
    return Trainer(cfg)


def _roll(trainer, sampler, group=4, seed=3, rows=None, decode=False):
    return rollout(trainer.adapter, PROMPTS, group, trainer.latent_shape, sampler, torch.Generator().manual_seed(seed),
                   NEG, progress=False, decode=decode, rows=rows)


def expected_evaluations(steps: list[int], k: int, prompts: int, group: int, width0: int, factors: list[int],
                         cfg: int, tail_steps: int | None, solver: str) -> dict[str, int]:
    """The rollout's transformer row evaluations, written out: ``cfg`` (2 with guidance) times the states
    a step runs on (``prompts x width``, the width growing by each SDE step's factor after it)."""
    def width(step):
        return width0 * math.prod(f for f, s in zip(factors, steps) if s < step)
    last, left = steps[-1], k - steps[-1] - 1
    tail = left if not tail_steps else min(tail_steps, left) * (2 if solver == "heun" else 1)
    return {"prefix": cfg * prompts * width0 * steps[0],
            "sde": cfg * prompts * sum(width(s) for s in range(steps[0], last + 1)),
            "tail": cfg * prompts * group * max(tail, 0)}


def _count_velocity_rows(adapter, monkeypatch) -> list[int]:
    """Rows through ``adapter.velocity``, counted independently of the rollout's own bookkeeping."""
    seen: list[int] = []
    velocity = adapter.velocity

    def counted(x, *a, **k):
        seen.append(x.shape[0])
        return velocity(x, *a, **k)
    monkeypatch.setattr(adapter, "velocity", counted)
    return seen


@pytest.mark.parametrize("solver", ["euler", "heun", "dpm2m"])
def test_a_tail_changes_only_the_video_and_costs_the_formula(trainer, solver, monkeypatch):
    smp = dataclasses.replace(trainer.cfg.sampler, num_steps=10, window=[0.0, 0.3], tail_steps=3, tail_solver=solver)
    full = _roll(trainer, dataclasses.replace(smp, tail_steps=None))
    seen = _count_velocity_rows(trainer.adapter, monkeypatch)
    cheap = _roll(trainer, smp)
    for f in ("steps", "latents", "next_latents", "means", "stds"):      # the policy's steps: replay unchanged
        assert torch.equal(getattr(cheap, f), getattr(full, f)), f
    assert not torch.equal(cheap.final, full.final)
    steps = cheap.steps.tolist()
    want = expected_evaluations(steps, 10, 2, 4, 4, [1, 1], 2, 3, solver)
    assert cheap.evaluations == want and sum(seen) == sum(want.values())
    assert full.evaluations == expected_evaluations(steps, 10, 2, 4, 4, [1, 1], 2, None, solver)


@pytest.mark.parametrize("branching", [None, [2, 2], [1, 4]])
def test_shared_noise_groups_are_trees_of_exact_sde_steps(trainer, branching, monkeypatch):
    smp = dataclasses.replace(trainer.cfg.sampler, shared_noise=True, branching=branching)
    seen = _count_velocity_rows(trainer.adapter, monkeypatch)
    traj = _roll(trainer, smp)
    factors = branching or [4, 1]
    assert traj.batch_size == 8 and traj.prompts == [p for p in PROMPTS for _ in range(4)]
    assert traj.evaluations == expected_evaluations(traj.steps.tolist(), 6, 2, 4, 1, factors, 2, None, "euler")
    assert sum(seen) == sum(traj.evaluations.values())
    # Leaves under one state share it (its x_k, mean and std); children of a step differ in x' only.
    for j, f in enumerate(factors):
        share_x = 4 // sde.branch_widths(factors, 1)[j]
        share_next = 4 // sde.branch_widths(factors, 1)[j + 1]
        for g in range(0, 8, 4):
            for a in range(g, g + 4):
                b = g + (a - g) // share_x * share_x                # the first leaf under a's state
                assert torch.equal(traj.latents[a, j], traj.latents[b, j])
                assert torch.equal(traj.means[a, j], traj.means[b, j]) and traj.stds[a, j] == traj.stds[b, j]
                c = g + (a - g) // share_next * share_next
                assert torch.equal(traj.next_latents[a, j], traj.next_latents[c, j])
                assert (a == c) or share_next > 1
            firsts = list(range(g, g + 4, share_next))
            assert len({traj.next_latents[i, j].sum().item() for i in firsts}) == len(firsts)   # own noise
    assert not torch.equal(traj.latents[0, 0], traj.latents[4, 0])      # groups do not share
    assert len({traj.final[i].sum().item() for i in range(8)}) == 8      # G distinct videos per group
    # A data-parallel rank's rows (here cutting both groups) equal the one-process rollout's.
    part = _roll(trainer, smp, rows=slice(2, 6))
    for f in ("latents", "next_latents", "means", "stds", "final"):
        assert torch.equal(getattr(part, f), getattr(traj, f)[2:6]), f
    # SPEC invariant 1: replay of every leaf's SDE steps gives ratio 1, in any batch composition.
    worst = 0.0
    with torch.no_grad():
        for rows in ([7], [0, 5, 2], [1, 3, 4, 6], list(range(8))):
            idx = torch.tensor(rows)
            for j in range(traj.num_sde_steps):
                _, _, log_ratio = trainer.replay_step(traj.select(idx), j, torch.ones(len(rows)))
                worst = max(worst, float(log_ratio.abs().max()))
    assert worst < 1e-5


def test_a_shared_step_is_credited_with_the_sum_of_its_leaves_advantages(trainer):
    """A tree's SDE step taken before later branching is in every leaf below it: the update's gradient
    is the gradient of one copy of each transition, weighted by the sum of its leaves' advantages."""
    smp = dataclasses.replace(trainer.cfg.sampler, shared_noise=True, branching=[2, 2])
    traj = _roll(trainer, smp)
    adv = torch.tensor([1.5, -0.5, 0.25, -1.0, 0.7, -0.2, -0.9, 0.4])
    params = [p for p in trainer.adapter.trainable_parameters()]
    for j, width in enumerate(sde.branch_widths([2, 2], 1)[1:]):        # states after step j, per group
        loss, *_ = trainer.replay_step(traj, j, adv)
        g_leaves = torch.autograd.grad(loss.loss, params)
        per = 4 // width                                               # leaves under one transition
        firsts = torch.arange(0, 8, per)
        summed = adv.view(-1, per).sum(1)
        once, *_ = trainer.replay_step(traj.select(firsts), j, summed)
        g_once = torch.autograd.grad(once.loss, params)
        # The objective averages over its rows: 8 leaf rows against 8 / per transitions.
        for a, b in zip(g_leaves, g_once):
            assert torch.allclose(a * 8, b * len(firsts), rtol=1e-4, atol=1e-7)


def test_evaluation_keeps_the_full_schedule_and_independent_noise(trainer, monkeypatch):
    got = []

    class Seen(Exception):
        pass

    def record(*a, **k):
        got.append(a[4])
        raise Seen
    monkeypatch.setattr(evaluation, "rollout", record)
    smp = dataclasses.replace(trainer.cfg.sampler, tail_steps=2, shared_noise=True)
    for keep in (False, True):
        with pytest.raises(Seen):
            evaluation.evaluate(trainer.adapter, PROMPTS, 2, trainer.latent_shape, smp, 0, {}, fps=8.0, keep_tail=keep)
    assert [(s.tail_steps, s.shared_noise) for s in got] == [(None, False), (2, False)]


def test_every_iteration_logs_its_evaluations(tmp_path):
    """One training iteration with a shared-noise tree, a tail and CFG: ``perf/evals/*`` is the formula."""
    cfg = tiny_config(tmp_path, "run.iterations=1", "data.group_size=4", "sampler.shared_noise=true",
                      "sampler.branching=[2, 2]", "sampler.tail_steps=1", "sampler.tail_solver=heun",
                      "optim.minibatch_size=4", "objective.beta=0.1")
    trainer = Trainer(cfg)
    batch = trainer.collect(0)
    # Advantages are per group of G leaves (each prompt's rows contiguous), as with independent noise.
    assert torch.allclose(batch.advantages.view(2, 4).sum(1), torch.zeros(2), atol=1e-4)
    row = trainer.run()[0]
    steps, e = row["sde_steps"], cfg.optim.inner_epochs
    want = expected_evaluations(steps, 6, 2, 4, 1, [2, 2], 2, 1, "heun")
    want.update(replay=e * 8 * 2 * 2, reference=e * 8 * 2 * 2)       # epochs x B x S x CFG; beta > 0
    assert {p: row[f"perf/evals/{p}"] for p in want} == want
    assert row["perf/evals_per_video"] == sum(want.values()) / 8
