"""Throughput of an iteration: ``perf/videos_per_s``, rollout and update seconds per video, and on CUDA
``perf/mfu`` (model FLOPs over the card's peak) and ``perf/peak_memory_gib`` (``max_memory_allocated``
since the process started, to set beside ``flowdppo-video plan``).

Every iteration logs the transformer evaluations it spent (``perf/evals/<phase>``: rows through the
transformer, CFG's unconditional rows counted, over all ranks; :data:`EVALUATION_PHASES`) and
``perf/evals_per_video``. The FLOPs of one transformer forward for one video are counted once, by
``torch.utils.flop_counter.FlopCounterMode`` on the run's own latent and conditioning; an iteration's
are that times its evaluations: the rollout's, and per replayed SDE step a forward and a backward
(3 forwards' worth) in the update, plus the reference's forward when ``objective.beta > 0``. Gradient checkpointing's re-run is not model
FLOPs and is not counted (the usual MFU convention). Under sequence parallelism the counted forward
is the rank's own shard, so the figure is per GPU either way. flash_attn's kernels are counted as
SDPA of the same sizes (:data:`FLASH_OPS`). With ``model.compile``, ``perf/compiled_graphs`` is the
number of graphs Dynamo compiled in the process (0 would mean the blocks ran eagerly).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from flowdppo_video.models.base import VideoFlowAdapter

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


def _flash_forward_flops(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """flash_attn's ``_flash_attn_forward``: ``q`` ``(B, S_q, H, d)``, ``k``/``v`` ``(B, S_k, H_kv, d)``
    (shapes: FlopCounterMode passes them), counted as aten's SDPA of the same sizes."""
    return sdpa_flop_count(_bhsd(q), _bhsd(k), _bhsd(v))


def _flash_varlen_forward_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                cu_seqlens_k: torch.Tensor, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """flash_attn's ``_flash_attn_varlen_forward``: ``q`` ``(sum S_q, H, d)`` packed by ``cu_seqlens_q``;
    each sequence counted as SDPA of its own lengths (raw tensors: the lengths are values)."""
    (_, hq, dq), (_, hk, dk), (_, hv, dv) = q.shape, k.shape, v.shape
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    return sum(sdpa_flop_count((1, hq, a, dq), (1, hk, b, dk), (1, hv, b, dv)) for a, b in zip(lq, lk))


_flash_varlen_forward_flops._get_raw = True     # type: ignore[attr-defined]  # FlopCounterMode: tensors, not shapes


def _bhsd(shape: Any) -> tuple[int, int, int, int]:
    b, s, h, d = shape
    return b, h, s, d


# flash_attn (>= 2.6) registers its kernels as torch ops, which FlopCounterMode sees but has no formula
# for: without these, MFU under model.attention_backend=flash misses the attention (about a quarter
# of a Wan forward at 3,510 tokens). Only forwards: the count is of one no-grad forward.
FLASH_OPS: dict[str, Callable[..., int]] = {"_flash_attn_forward": _flash_forward_flops,
                                            "_flash_attn_varlen_forward": _flash_varlen_forward_flops}


def flash_attn_formulas(namespace: str = "flash_attn") -> dict[Any, Callable[..., int]]:
    """FlopCounterMode ``custom_mapping`` for the ops of :data:`FLASH_OPS` registered under
    ``torch.ops.<namespace>`` (empty where flash_attn is not installed or registers none)."""
    out: dict[Any, Callable[..., int]] = {}
    ns = getattr(torch.ops, namespace)
    for name, formula in FLASH_OPS.items():
        try:
            out[getattr(ns, name)] = formula
        except (AttributeError, RuntimeError):     # not registered: flash_attn absent or too old
            continue
    return out


@torch.no_grad()
def forward_flops(adapter: VideoFlowAdapter, latent_shape: tuple[int, ...], prompt: str) -> float:
    """FLOPs of one forward of expert 0 for one video ``(1, C, F, H, W)`` conditioned on ``prompt``.

    Run eagerly (``set_stance("force_eager")``): this is the first call into ``model.compile``'s
    blocks, and Dynamo (torch 2.13) skips a frame entered under FlopCounterMode and marks its code
    skipped for good, so compilation would never happen. The eager count is the same FLOPs."""
    x = torch.zeros((1, *latent_shape))
    text = adapter.prompt_text([prompt])
    with torch.compiler.set_stance("force_eager"), \
            FlopCounterMode(display=False, custom_mapping=flash_attn_formulas()) as counter:
        adapter.velocity(x, torch.full((1,), 0.5), text, 0)
    return float(counter.get_total_flops())


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process (0: ``model.compile`` compiled nothing)."""
    from torch._dynamo.utils import counters   # heavy: Dynamo, only when asked

    return int(counters["stats"]["unique_graphs"])


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

    def metrics(self, videos: int, local_videos: int, evaluations: dict[str, float],
                rollout_s: float, update_s: float, total_s: float) -> dict[str, float]:
        """``videos``: the iteration's batch (all ranks); ``local_videos``: this rank's share of the
        rollout; ``evaluations``: the iteration's transformer row evaluations (all ranks) per phase of
        :data:`EVALUATION_PHASES`; the seconds are this rank's wall times."""
        out = {"perf/videos_per_s": videos / max(total_s, 1e-9),
               "perf/rollout_s_per_video": rollout_s / max(local_videos, 1),
               "perf/update_s_per_video": update_s / max(local_videos, 1)}
        ev = {p: float(evaluations.get(p, 0.0)) for p in EVALUATION_PHASES}
        out.update({f"perf/evals/{p}": n for p, n in ev.items()})
        out["perf/evals/total"] = sum(ev.values())
        out["perf/evals_per_video"] = out["perf/evals/total"] / max(videos, 1)
        if self.device.type == "cuda":               # the process's peak so far (the planner's figure)
            out["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if getattr(self.cfg.model, "compile", False):   # proof that model.compile compiled (tools/gpu_check.py)
            out["perf/compiled_graphs"] = compiled_graphs()
        if self.peak is None or self.flops is None:
            return out
        # A replayed forward is also a backward (3 forwards' worth); this rank's share of the work.
        forwards = ev["prefix"] + ev["sde"] + ev["tail"] + 3 * ev["replay"] + ev["reference"]
        flops = self.flops * forwards * local_videos / max(videos, 1)
        out["perf/mfu"] = flops / (max(total_s, 1e-9) * self.peak)
        out["perf/tflops_per_gpu"] = flops / max(total_s, 1e-9) / 1e12
        return out


# Where an iteration's transformer evaluations go: the rollout's steps before its first SDE step, from
# the first to the last SDE step, after it (the tail), and the update's replays of the SDE steps by the
# policy and (objective.beta > 0) by the reference.
EVALUATION_PHASES = ("prefix", "sde", "tail", "replay", "reference")
