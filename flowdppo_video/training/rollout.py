"""The rollout engine: sample videos with the policy and keep what replay needs.

Denoising runs the whole schedule; steps chosen by the sampler config are SDE (policy)
steps, the rest deterministic ODE steps. Replay (the trainer) calls the same
:func:`guided_velocity` and :func:`flowdppo_video.sde.sde_step` with the same inputs, so the
ratio is 1 before any update by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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
    """
    full = len(prompts) * group_size
    rows = rows or slice(0, full)
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
    # Noise is drawn on the CPU generator and moved, so a seed means the same video anywhere.
    x = torch.randn((full, *latent_shape), generator=generator, dtype=torch.float32)[rows].to(dev)
    s_count = len(steps)
    lat = torch.empty((b, s_count, *latent_shape))
    nxt = torch.empty_like(lat)
    means = torch.empty_like(lat)
    stds = torch.empty((b, s_count))
    experts = torch.zeros(s_count, dtype=torch.long)
    chunk = sampler.batch_size or b
    slot = {k: j for j, k in enumerate(steps)}
    joint = cfg_joint(sampler, dev)
    for k in tqdm(range(sampler.num_steps), desc="rollout", leave=False, disable=not progress):
        sig, sig_next = float(schedule[k]), float(schedule[k + 1])
        expert = adapter.expert_for(sig)
        with adapter.policy_at(sig):                  # model.base_below: the base model below the boundary
            v = torch.cat([
                guided_velocity(adapter, x[i:i + chunk], torch.full((min(chunk, b - i),), sig, device=dev),
                                text[i:i + chunk], None if text_u is None else text_u[i:i + chunk],
                                _guidance(sampler.guidance_scale, g2, expert), joint, expert)
                for i in range(0, b, chunk)])
        if k in slot:
            j = slot[k]
            experts[j] = expert
            mean, std = sde.sde_step(sampler.kind, x, v, sig, sig_next, sampler.eta, sigma_1)
            noise = torch.randn((full, *latent_shape), generator=generator, dtype=torch.float32)[rows].to(dev)
            x_next = mean + std.view(-1, *[1] * len(latent_shape)) * noise
            lat[:, j], nxt[:, j], means[:, j], stds[:, j] = x.cpu(), x_next.cpu(), mean.cpu(), std.cpu()
            x = x_next
        else:
            x = sde.ode_step(x, v, sig, sig_next)
    videos = adapter.decode(x) if decode else None
    sound = adapter.decode_audio(x) if decode and adapter.has_audio else None
    sched = schedule.float()
    idx = torch.tensor(steps, dtype=torch.long)
    return Trajectory(prompts=batch_prompts, text=text.cpu(), text_uncond=None if text_u is None else text_u.cpu(),
                      steps=idx, sigmas=sched[idx], sigmas_next=sched[idx + 1], latents=lat, next_latents=nxt,
                      means=means, stds=stds, final=x.cpu(), videos=videos, sigma_1=sigma_1, kind=sampler.kind,
                      eta=sampler.eta, guidance_scale=sampler.guidance_scale, cfg_joint=joint, experts=experts,
                      guidance_scale_2=g2, audio=None if sound is None else sound[0],
                      audio_rate=None if sound is None else int(sound[1]))
