"""The rollout engine: sample videos with the policy and keep what replay needs.

Denoising runs the whole schedule; steps chosen by the sampler config are SDE (policy)
steps, the rest deterministic ODE steps (after the last SDE step, optionally fewer steps of a
higher-order solver: ``sampler.tail_steps``). A group may share its initial noise and branch at its SDE
steps (``sampler.shared_noise``, ``sampler.branching``). Replay (the trainer) calls the same
:func:`guided_velocity` and :func:`flowdppo_video.sde.sde_step` with the same inputs, so the
ratio is 1 before any update by construction.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from tqdm.auto import tqdm

from flowdppo_video import sde
from flowdppo_video.models.base import ModelError, Text, VideoFlowAdapter, cat_text
from flowdppo_video.runs.config import SamplerConfig
from rewards import Audio


def guided_velocity(adapter: VideoFlowAdapter, x: torch.Tensor, sigma: torch.Tensor, text: Text,
                    text_uncond: Text | None, guidance_scale: float, joint: bool = True,
                    expert: int = 0) -> torch.Tensor:
    """The policy's velocity, classifier-free guidance included.

    ``v = v_u + w (v_c - v_u)``. With ``joint`` the conditional and unconditional rows go through
    the transformer as one batch ``[cond; uncond]`` of ``2B`` (fewer, larger calls: faster on
    GPUs); otherwise as two calls of ``B`` (on CPUs the doubled activation buffers cost more in
    page faults than they save). Rollout and replay pass the same ``joint``.

    Args:
        x: ``(B, C, F, H, W)``; sigma: ``(B,)``; text, text_uncond: ``B`` rows (``(B, L, D)`` or a
        ``TextBatch``); expert: the transformer that takes this step (Wan 2.2 A14B).
    Returns:
        float32 ``(B, C, F, H, W)``.
    """
    if text_uncond is None or guidance_scale == 1.0:
        return adapter.velocity(x, sigma, text, expert)
    if joint:
        v = adapter.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_text([text, text_uncond]), expert)
        v_c, v_u = v.chunk(2)
    else:
        v_c, v_u = adapter.velocity(x, sigma, text, expert), adapter.velocity(x, sigma, text_uncond, expert)
    return v_u + guidance_scale * (v_c - v_u)


def cfg_joint(sampler: SamplerConfig, device: torch.device) -> bool:
    """Resolve ``sampler.cfg_batch`` (``auto``: joint on accelerators, split on the CPU)."""
    if sampler.cfg_batch == "auto":
        return device.type != "cpu"
    return sampler.cfg_batch == "joint"


@dataclass
class Trajectory:
    """Rollout of ``B`` videos with ``S`` SDE steps. Latent tensors are float32 on the CPU.

    Attributes:
        prompts: the ``B`` prompts, grouped: video ``b`` is sample ``b % G`` of prompt ``b // G``.
        text: ``(B, L, D)`` prompt embeddings (or a ``TextBatch`` of ``B`` rows); text_uncond: same,
            or None without CFG.
        steps: ``(S,)`` schedule indices of the SDE steps.
        sigmas, sigmas_next: ``(S,)`` sigma before and after each SDE step.
        latents: ``(B, S, C, F, H, W)`` ``x_k`` before each SDE step.
        next_latents: ``(B, S, C, F, H, W)`` ``x'`` drawn at each SDE step.
        means: ``(B, S, C, F, H, W)`` ``mu_old``.
        stds: ``(B, S)`` step stds.
        final: ``(B, C, F, H, W)`` the denoised latent.
        videos: ``(B, F_px, H_px, W_px, 3)`` uint8, decoded ``final`` (None if not decoded).
        sigma_1: the schedule's second sigma (Flow-SDE at sigma = 1).
        cfg_joint: whether CFG ran cond and uncond as one batch (replay does the same).
        experts: ``(S,)`` the transformer that made each SDE step (0 = ``transformer``, 1 =
            ``transformer_2`` of Wan 2.2 A14B); replay goes through the same one.
        guidance_scale_2: CFG scale of expert 1's steps (None: ``guidance_scale``).
        audio: ``(B, channels, T)`` float32 waveforms decoded with the videos (a family with sound,
            :attr:`VideoFlowAdapter.has_audio`), None otherwise; audio_rate: their sample rate.

    A family of several token streams (LTX-2) carries its latent flat: ``C, F, H, W`` above are then
    one axis ``E`` (:meth:`VideoFlowAdapter.token_map`).
        evaluations: the rollout's transformer evaluations per phase, ``{"prefix", "sde", "tail"}``: rows
            through the transformer (CFG's unconditional rows counted) before the first SDE step, from it
            to the last one, and after it; summed over the parts by :meth:`concat`.
    """

    prompts: list[str]
    text: torch.Tensor
    text_uncond: torch.Tensor | None
    steps: torch.Tensor
    sigmas: torch.Tensor
    sigmas_next: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    final: torch.Tensor
    videos: torch.Tensor | None
    sigma_1: float
    kind: str
    eta: float
    guidance_scale: float
    cfg_joint: bool = True
    experts: torch.Tensor | None = None
    guidance_scale_2: float | None = None
    audio: torch.Tensor | None = None
    audio_rate: int | None = None
    evaluations: dict[str, int] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def num_sde_steps(self) -> int:
        return int(self.steps.numel())

    def select(self, index: torch.Tensor) -> "Trajectory":
        """The rows ``index`` (a minibatch), sharing step data."""
        out = {}
        idx = index.tolist()
        # `experts` and the other step data are per SDE step, shared by every row.
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "prompts":
                v = [v[i] for i in idx]
            elif f.name in ("text", "text_uncond", "latents", "next_latents", "means", "stds", "final",
                            "videos", "audio") and v is not None:
                v = v[index]
            out[f.name] = v
        return Trajectory(**out)

    @staticmethod
    def concat(parts: list["Trajectory"]) -> "Trajectory":
        """Rows of several trajectories of the same rollout (data-parallel ranks' slices), in order."""
        if len(parts) == 1:
            return parts[0]
        first, out = parts[0], {}
        for f in fields(first):
            vals = [getattr(p, f.name) for p in parts]
            if f.name == "prompts":
                out[f.name] = [x for v in vals for x in v]
            elif f.name in ("text", "text_uncond"):
                out[f.name] = None if vals[0] is None else cat_text(vals)
            elif f.name in ("latents", "next_latents", "means", "stds", "final", "videos", "audio"):
                out[f.name] = None if vals[0] is None else torch.cat(vals)
            elif f.name == "evaluations":           # each part's own spending
                out[f.name] = None if vals[0] is None else {k: sum(v[k] for v in vals) for k in vals[0]}
            else:                                   # per-step data and settings: the same on every part
                out[f.name] = vals[0]
        return Trajectory(**out)


def reward_audio(traj: Trajectory) -> Audio | None:
    """The rollout's sound as the rewards take it (None: a silent family)."""
    return None if traj.audio is None else Audio(traj.audio, int(traj.audio_rate))


def sound(traj: Trajectory, i: int) -> dict:
    """``write_video``'s sound arguments for video ``i`` of ``traj`` (none for a silent family)."""
    if traj.audio is None:
        return {}
    return {"audio": traj.audio[i], "audio_rate": traj.audio_rate}


def step_mean(adapter: VideoFlowAdapter, traj: Trajectory, j: int) -> torch.Tensor:
    """``mu`` of SDE step ``j`` recomputed for every row of ``traj`` with the adapter's weights now.

    The same inputs and functions as the rollout (CFG included), so before any update this is
    the stored ``mu_old`` and the ratio is 1. Gradients flow when enabled. Returns float32
    ``(B, C, F, H, W)`` on ``adapter.device``.
    """
    dev, b = adapter.device, traj.batch_size
    x = traj.latents[:, j].to(dev)
    sigma, sigma_next = traj.sigmas[j].expand(b).to(dev), traj.sigmas_next[j].expand(b).to(dev)
    text_u = None if traj.text_uncond is None else traj.text_uncond.to(dev)
    # The recorded expert, never one re-derived from sigma: replay must use the transformer that
    # produced the step even if routing rules (boundary_ratio) change between rollout and update.
    expert = 0 if traj.experts is None else int(traj.experts[j])
    v = guided_velocity(adapter, x, sigma, traj.text.to(dev), text_u, _guidance(traj.guidance_scale,
                        traj.guidance_scale_2, expert), traj.cfg_joint, expert)
    mean, _ = sde.sde_step(traj.kind, x, v, sigma, sigma_next, traj.eta, traj.sigma_1)
    return mean


def step_evaluations(traj: Trajectory, j: int) -> int:
    """Transformer row evaluations :func:`step_mean` makes for SDE step ``j`` of ``traj``'s rows (CFG's
    unconditional rows counted, as :func:`guided_velocity` runs them)."""
    expert = 0 if traj.experts is None else int(traj.experts[j])
    scale = _guidance(traj.guidance_scale, traj.guidance_scale_2, expert)
    return traj.batch_size * (2 if traj.text_uncond is not None and scale != 1.0 else 1)


def _guidance(scale: float, scale_2: float | None, expert: int) -> float:
    """CFG scale of a step of ``expert`` (Wan 2.2 A14B's low-noise expert may use its own)."""
    return scale_2 if expert == 1 and scale_2 is not None else scale


def _choose_steps(adapter: VideoFlowAdapter, sampler: SamplerConfig, generator: torch.Generator,
                  schedule: torch.Tensor) -> list[int]:
    """SDE steps of this rollout: drawn from the window, and only among steps whose expert trains
    (a step of a frozen Wan 2.2 expert would carry no gradient), and never below ``model.base_below``
    (the base model takes those steps)."""
    frozen = any(not adapter.expert_trains(e) for e in range(adapter.num_experts))
    routed = adapter.base_below is not None

    def allowed(k: int) -> bool:
        sig = float(schedule[k])
        return adapter.expert_trains(adapter.expert_for(sig)) and not adapter.uses_base(sig)

    label = ("steps that the training expert(s) take (model.train_experts)" if frozen else
             f"steps at or above model.base_below={adapter.base_below}" if routed else "candidate steps")
    try:
        return sde.choose_sde_steps(sampler.num_steps, sampler.sde_steps, tuple(sampler.window), sampler.kind,
                                    generator, schedule, allowed if frozen or routed else None, label)
    except ValueError as e:
        raise ModelError(str(e)) from None


def plain_sampler(sampler: SamplerConfig, keep_tail: bool = False) -> SamplerConfig:
    """``sampler`` with independent noise per video and (unless ``keep_tail``) the full schedule: what
    evaluation and ``sample`` use, so their videos do not depend on the training rollout's economies."""
    return dataclasses.replace(sampler, shared_noise=False, branching=None,
                               tail_steps=sampler.tail_steps if keep_tail else None)


def branching(sampler: SamplerConfig, group_size: int, num_sde_steps: int) -> tuple[int, list[int]]:
    """``(width0, factors)``: states per group before the first SDE step (``G``, or 1 with
    ``sampler.shared_noise``) and the children each state gets at each SDE step."""
    if not sampler.shared_noise:
        return group_size, [1] * num_sde_steps
    if num_sde_steps == 0:
        raise ModelError("sampler.shared_noise needs at least one SDE step to branch at (sampler.sde_steps)")
    factors = list(sampler.branching) if sampler.branching else [group_size] + [1] * (num_sde_steps - 1)
    if len(factors) != num_sde_steps or math.prod(factors) != group_size:
        raise ModelError(f"sampler.branching={factors} needs one factor per SDE step ({num_sde_steps}) and the "
                         f"product {group_size} (the group size of this rollout)")
    return 1, factors


ROLLOUT_PHASES = ("prefix", "sde", "tail")


@torch.no_grad()
def rollout(adapter: VideoFlowAdapter, prompts: list[str], group_size: int, latent_shape: tuple[int, ...],
            sampler: SamplerConfig, generator: torch.Generator, negative_prompt: str | None = None,
            progress: bool = True, decode: bool = True, rows: slice | None = None) -> Trajectory:
    """Sample ``G`` videos for each prompt with the current policy.

    Args:
        prompts: ``P`` prompts; the batch is ``B = P * G``, each prompt's samples contiguous.
        latent_shape: ``(C, F, H, W)`` (or a multi-stream family's flat ``(E,)``).
        generator: a CPU generator; it draws the initial noise, the SDE steps and their noise,
            so the same seed gives the same trajectory on any device.
        negative_prompt: the unconditional prompt for CFG (used when ``guidance_scale != 1``).
        rows: only these rows of the ``P * G`` batch (a data-parallel rank's share). Noise is still
            drawn for the whole batch and sliced, so the rows equal those of a one-process rollout.

    With ``sampler.shared_noise`` a group is a tree: it starts as one state, its steps before the first
    SDE step run once (one row per prompt), and at SDE step ``j`` every state gets ``branching[j]``
    children (its mean, their own noise). The trajectory's rows are the ``G`` leaves; a leaf's SDE steps
    are its path's (shared ancestors' steps repeated in every leaf below them), so replay is unchanged.
    With ``sampler.tail_steps`` the steps after the last SDE step are :func:`_tail`'s.
    ``Trajectory.evaluations`` counts the transformer's row evaluations per phase.
    """
    full = len(prompts) * group_size
    rows = rows or slice(0, full)
    leaves = torch.arange(full)[rows]
    batch_prompts = [p for p in prompts for _ in range(group_size)][rows]
    b = len(batch_prompts)
    text = adapter.prompt_text(batch_prompts)            # the run's cached rows, or encoded now
    g2 = sampler.guidance_scale_2 if adapter.num_experts > 1 else None
    cfg_on = sampler.guidance_scale != 1.0 or (g2 is not None and g2 != 1.0)
    # Per row: an image-to-video model keeps each row's image in its unconditional branch.
    text_u = adapter.negative_text(negative_prompt or "", batch_prompts) if cfg_on else None

    schedule = adapter.schedule(sampler.num_steps, sampler.shift, tuple(latent_shape))
    steps = _choose_steps(adapter, sampler, generator, schedule)
    sigma_1 = float(schedule[1])
    dev = adapter.device
    s_count = len(steps)
    width0, factors = branching(sampler, group_size, s_count)
    widths = sde.branch_widths(factors, width0)
    # The states the rows descend from, at each depth: the rows themselves with independent noise,
    # their whole groups with shared noise (a group split between data-parallel ranks runs on both).
    lo = int(sde.leaf_ancestor(leaves[:1], group_size, width0)) if b else 0
    hi = int(sde.leaf_ancestor(leaves[-1:], group_size, width0)) + 1 if b else 0

    def span(d: int) -> slice:
        scale = widths[d] // width0
        return slice(lo * scale, hi * scale)

    texts: dict[int, tuple[Text, Text | None]] = {group_size: (text, text_u)} if width0 == group_size else {}

    def state_text(d: int) -> tuple[Text, Text | None]:
        w = widths[d]
        if w not in texts:
            ps = [prompts[n // w] for n in range(span(d).start, span(d).stop)]
            texts[w] = (adapter.prompt_text(ps), adapter.negative_text(negative_prompt or "", ps) if cfg_on else None)
        return texts[w]

    joint = cfg_joint(sampler, dev)
    evaluations = dict.fromkeys(ROLLOUT_PHASES, 0)

    def velocity(x: torch.Tensor, sig: float, d: int, phase: str) -> torch.Tensor:
        txt, txt_u = state_text(d)
        expert = adapter.expert_for(sig)
        scale = _guidance(sampler.guidance_scale, g2, expert)
        n = x.shape[0]
        chunk = sampler.batch_size or n
        with adapter.policy_at(sig):                  # model.base_below: the base model below the boundary
            v = torch.cat([
                guided_velocity(adapter, x[i:i + chunk], torch.full((min(chunk, n - i),), sig, device=dev),
                                txt[i:i + chunk], None if txt_u is None else txt_u[i:i + chunk], scale, joint, expert)
                for i in range(0, n, chunk)])
        # guided_velocity's own rule: CFG runs the unconditional rows too unless its scale is 1.
        evaluations[phase] += n * (2 if txt_u is not None and scale != 1.0 else 1)
        return v

    n_prompts = len(prompts)
    # Noise is drawn on the CPU generator and moved, so a seed means the same video anywhere.
    x = torch.randn((n_prompts * width0, *latent_shape), generator=generator, dtype=torch.float32)[span(0)].to(dev)

    def at_leaves(t: torch.Tensor, depth: int) -> torch.Tensor:
        """Each row's ancestor among the states ``t`` of ``depth`` (identity with independent noise)."""
        if widths[depth] == group_size and span(depth) == rows:
            return t
        return t[sde.leaf_ancestor(leaves, group_size, widths[depth]) - span(depth).start]

    # Each SDE step's x_k, mu, std and x' go straight to the trajectory's host tensors (per leaf), so the
    # rollout never holds a second copy of them (a list of per-step states doubled the host memory).
    lat = torch.empty((b, s_count, *latent_shape))
    nxt = torch.empty_like(lat)
    means = torch.empty_like(lat)
    stds = torch.empty((b, s_count))
    experts = torch.zeros(s_count, dtype=torch.long)
    slot = {k: j for j, k in enumerate(steps)}
    tail_on = bool(sampler.tail_steps) and s_count > 0
    end = steps[-1] + 1 if tail_on else sampler.num_steps
    first = steps[0] if steps else sampler.num_steps
    d = 0
    for k in tqdm(range(end), desc="rollout", leave=False, disable=not progress):
        sig, sig_next = float(schedule[k]), float(schedule[k + 1])
        phase = "prefix" if k < first else "sde" if k <= steps[-1] else "tail"
        v = velocity(x, sig, d, phase)
        if k in slot:
            j = slot[k]
            experts[j] = adapter.expert_for(sig)
            mean, std = sde.sde_step(sampler.kind, x, v, sig, sig_next, sampler.eta, sigma_1)
            noise = torch.randn((n_prompts * widths[d + 1], *latent_shape), generator=generator,
                                dtype=torch.float32)[span(d + 1)].to(dev)
            f = factors[j]            # children of each state: its mean, their own noise
            x_next = (mean if f == 1 else mean.repeat_interleave(f, 0)) + \
                (std if f == 1 else std.repeat_interleave(f)).view(-1, *[1] * len(latent_shape)) * noise
            lat[:, j], means[:, j] = at_leaves(x.cpu(), d), at_leaves(mean.cpu(), d)
            stds[:, j], nxt[:, j] = at_leaves(std.cpu(), d), at_leaves(x_next.cpu(), d + 1)
            x = x_next
            d += 1
        else:
            x = sde.ode_step(x, v, sig, sig_next)
    if tail_on:
        x = _tail(x, schedule, end, sampler, lambda y, sig: velocity(y, sig, d, "tail"))
    final = at_leaves(x, s_count)
    videos = adapter.decode(final) if decode else None
    sound = adapter.decode_audio(final) if decode and adapter.has_audio else None
    sched = schedule.float()
    idx = torch.tensor(steps, dtype=torch.long)
    return Trajectory(prompts=batch_prompts, text=text.cpu(), text_uncond=None if text_u is None else text_u.cpu(),
                      steps=idx, sigmas=sched[idx], sigmas_next=sched[idx + 1], latents=lat, next_latents=nxt,
                      means=means, stds=stds, final=final.cpu(), videos=videos, sigma_1=sigma_1, kind=sampler.kind,
                      eta=sampler.eta, guidance_scale=sampler.guidance_scale, cfg_joint=joint, experts=experts,
                      guidance_scale_2=g2, audio=None if sound is None else sound[0],
                      audio_rate=None if sound is None else int(sound[1]), evaluations=evaluations)


def _tail(x: torch.Tensor, schedule: torch.Tensor, start: int, sampler: SamplerConfig,
          velocity: Callable[[torch.Tensor, float], torch.Tensor]) -> torch.Tensor:
    """Finish the deterministic rest of the schedule from ``schedule[start]`` in ``sampler.tail_steps``
    steps of ``sampler.tail_solver`` (:func:`flowdppo_video.sde.tail_schedule`). ``velocity(x, sigma)``
    is the policy's (guided, routed) velocity; Heun evaluates it at the predictor's ``sigma'`` too, so
    routing by noise level (``model.base_below``, Wan 2.2's experts) applies to each evaluation."""
    sig = sde.tail_schedule(schedule, start, int(sampler.tail_steps or 0))
    prev: tuple[torch.Tensor, float] | None = None
    for i in range(sig.numel() - 1):
        s, sn = float(sig[i]), float(sig[i + 1])
        v = velocity(x, s)
        if sampler.tail_solver == "dpm2m":
            x, x0 = sde.dpm2m_step(x, v, s, sn, prev)
            prev = (x0, s)
        elif sampler.tail_solver == "heun":
            x = sde.heun_step(x, v, velocity(sde.ode_step(x, v, s, sn), sn), s, sn)
        else:
            x = sde.ode_step(x, v, s, sn)
    return x
