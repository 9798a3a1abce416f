"""Throughput of an iteration: ``perf/videos_per_s``, rollout and update seconds per video, and on CUDA
``perf/mfu`` (model FLOPs over the card's peak) and ``perf/peak_memory_gib`` (``max_memory_allocated``
since the process started, to set beside ``flowdppo-video plan``).

The FLOPs of one transformer forward for one video are counted once, by
``torch.utils.flop_counter.FlopCounterMode`` on the run's own latent and conditioning; an iteration's
are that times the forwards it makes per video: every denoising step of the rollout, and per pass
over the SDE steps a forward and a backward (3 forwards' worth) in the update, plus the reference's
forward when ``objective.beta > 0``; CFG doubles each. Gradient checkpointing's re-run is not model
FLOPs and is not counted (the usual MFU convention). Under sequence parallelism the counted forward
is the rank's own shard, so the figure is per GPU either way.
"""

from __future__ import annotations

import torch

from .models.base import VideoFlowAdapter

# Dense peak TFLOPS per card: (bf16/fp16 tensor, tf32 tensor, plain fp32). The first name that the
# CUDA device's name contains wins, so the longer names come first (an "H200" is not an "H20").
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H200": (989.4, 494.7, 66.9),
    "H100": (989.4, 494.7, 66.9),
    "H20": (148.0, 74.0, 44.0),
    "A100": (312.0, 156.0, 19.5),
    "L40S": (362.1, 183.2, 91.6),
}


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None = None) -> float | None:
    """The card's dense peak in FLOP/s for ``dtype`` (``run.peak_tflops`` overrides it); None on the
    CPU or for a card not in :data:`PEAK_TFLOPS` (then no ``perf/mfu`` is logged)."""
    if device.type != "cuda":
        return None
    if override_tflops:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    for card, (half, tf32, fp32) in PEAK_TFLOPS.items():
        if card in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12
            return (tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32) * 1e12
    return None


@torch.no_grad()
def forward_flops(adapter: VideoFlowAdapter, latent_shape: tuple[int, ...], prompt: str) -> float:
    """FLOPs of one forward of expert 0 for one video ``(1, C, F, H, W)`` conditioned on ``prompt``."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, *latent_shape))
    text = adapter.prompt_text([prompt])
    with FlopCounterMode(display=False) as counter:
        adapter.velocity(x, torch.full((1,), 0.5), text, 0)
    return float(counter.get_total_flops())


class Throughput:
    """The ``perf/*`` metrics of a run's iterations (FLOPs counted at the first, on CUDA only)."""

    def __init__(self, adapter: VideoFlowAdapter, cfg: object, device: torch.device,
                 latent_shape: tuple[int, ...]) -> None:
        self.adapter, self.cfg, self.latent_shape, self.device = adapter, cfg, latent_shape, device
        self.peak = peak_flops(device, adapter.dtype, getattr(cfg.run, "peak_tflops", None))
        self.flops: float | None = None

    @property
    def wants_flops(self) -> bool:
        """Whether :meth:`count` has yet to run (only where MFU is logged: a card of known peak)."""
        return self.peak is not None and self.flops is None

    def count(self, prompt: str) -> None:
        """Count one forward's FLOPs (called where the model runs as in the rollout, so ZeRO-3's
        parameters are gathered and every sequence-parallel rank takes part)."""
        self.flops = forward_flops(self.adapter, self.latent_shape, prompt)

    def metrics(self, videos: int, local_videos: int, num_sde_steps: int, cfg_on: bool,
                rollout_s: float, update_s: float, total_s: float) -> dict[str, float]:
        """``videos``: the iteration's batch (all ranks); ``local_videos``: this rank's share of the
        rollout; the seconds are this rank's wall times."""
        out = {"perf/videos_per_s": videos / max(total_s, 1e-9),
               "perf/rollout_s_per_video": rollout_s / max(local_videos, 1),
               "perf/update_s_per_video": update_s / max(local_videos, 1)}
        if self.device.type == "cuda":               # the process's peak so far (the planner's figure)
            out["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if self.peak is None or self.flops is None:
            return out
        c = self.cfg
        per_video = c.sampler.num_steps + num_sde_steps * c.optim.inner_epochs * (3 + (c.objective.beta > 0))
        flops = self.flops * per_video * (2 if cfg_on else 1) * local_videos
        out["perf/mfu"] = flops / (max(total_s, 1e-9) * self.peak)
        out["perf/tflops_per_gpu"] = flops / max(total_s, 1e-9) / 1e12
        return out
