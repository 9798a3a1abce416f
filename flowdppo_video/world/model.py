"""The shapes world's text-to-video model: a small Wan in pixel space, shipped with the package.

It names no model family: the shipped checkpoint's pipeline picks one from the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from flowdppo_video.models import family, ModelError, checkpoint_family
from flowdppo_video.runs.config import ModelConfig

from .grammar import vocabulary
from .render import FRAMES, SIZE

WEIGHTS_DIR = Path(__file__).parent / "weights" / "shapes-world"

# WanTransformer3DModel on 16x16 RGB frames, one token per 2x2 pixels of a frame.
TRANSFORMER: dict[str, Any] = {"patch_size": [1, 2, 2], "num_attention_heads": 3, "attention_head_dim": 32,
                               "in_channels": 3, "out_channels": 3, "text_dim": 64, "freq_dim": 64,
                               "ffn_dim": 256, "num_layers": 4, "rope_max_seq_len": 64}
TEXT_ENCODER: dict[str, Any] = {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
                                "relative_attention_num_buckets": 8}
MAX_TEXT_TOKENS = 10


POSITION_CHANNELS = 5   # (frame, row, column, frame*row, frame*column) appended to the latent by the adapter


def world_init(position_channels: int = POSITION_CHANNELS) -> dict[str, Any]:
    """``model.init`` of the world model: the sub-configs above, the pixel autoencoder, the word
    tokenizer over the grammar's vocabulary and ``position_channels`` absolute-position channels."""
    return {"transformer": {**TRANSFORMER, "in_channels": 3 + position_channels}, "text_encoder": dict(TEXT_ENCODER),
            "vae": {"_class_name": "PixelAutoencoder", "z_dim": 3}, "tokenizer": {"words": vocabulary()},
            "pipeline": {"position_channels": position_channels}}


def build_world_adapter(device: torch.device, seed: int = 0, position_channels: int = POSITION_CHANNELS) -> Any:
    """A randomly initialised world model (pretraining starts here), built by the family of the
    shipped checkpoint (its ``model_index.json`` names the pipeline) from :func:`world_init`.

    With ``position_channels`` the transformer also sees each token's absolute (frame, row,
    column): Wan's RoPE is relative only, and a 0.5M-parameter model given only relative
    positions learnt colour and shape but ignored the direction words entirely (the flow loss
    with a wrong direction word equalled the loss with the right one to 4 digits at 6,500 steps).
    """
    name = _family_of(WEIGHTS_DIR)
    cfg = ModelConfig(family=name, init=world_init(position_channels), init_seed=seed, dtype="float32",
                      max_sequence_length=MAX_TEXT_TOKENS)
    return family(name).build(cfg, None, device)


def load_world_adapter(path: str | Path = WEIGHTS_DIR, device: torch.device = torch.device("cpu")) -> Any:
    """The world model saved at ``path`` (a diffusers directory; the shipped one by default), loaded
    by the family its ``model_index.json`` names; everything in it as saved (nothing set to train)."""
    name = _family_of(Path(path))
    cfg = ModelConfig(family=name, path=str(path), max_sequence_length=MAX_TEXT_TOKENS)
    return family(name).build(cfg, str(path), device)


def _family_of(path: Path) -> str:
    name = checkpoint_family(path)
    if name is None:
        raise ModelError(f"{path}: not a checkpoint of any model family")
    return name


def world_modules(adapter: Any) -> torch.nn.ModuleDict:
    """The modules a pretraining state holds: ``{"transformer", "text_encoder"}`` (its state-dict keys)."""
    return torch.nn.ModuleDict({"transformer": adapter.transformer, "text_encoder": adapter.text_encoder})


def flow_matching_loss(adapter: Any, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor,
                       text: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the predicted velocity at ``x_sigma = (1 - sigma) x0 + sigma eps``
    against ``eps - x0`` (SPEC conventions); ``x0, eps (B, C, F, H, W)``, ``sigma (B,)``.
    ``weight (B, 1, F, H, W)``, broadcast over channels: the weighted mean instead (a region's
    loss alone with a 0/1 mask)."""
    return flow_matching_losses(adapter, x0, eps, sigma, text, [weight])[0]


def flow_matching_losses(adapter: Any, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor,
                         text: torch.Tensor, weights: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """:func:`flow_matching_loss` under each of ``weights`` (``None``: the plain mean) from one
    forward pass: several regions' losses for the price of one."""
    s = sigma.view(-1, 1, 1, 1, 1)
    sq = (adapter.velocity((1 - s) * x0 + s * eps, sigma, text) - (eps - x0)).square()
    out = []
    for weight in weights:
        if weight is None:
            out.append(sq.mean())
        else:
            w = weight.to(sq.dtype).expand_as(sq)
            out.append((w * sq).sum() / w.sum())
    return out


def draw_sigmas(n: int, gen: torch.Generator, logit_mean: float, high_noise_frac: float) -> torch.Tensor:
    """``n`` pretraining noise levels ``(n,)``: logit-normal around ``logit_mean``, the first
    ``high_noise_frac`` of them uniform in [0.85, 1), where a video's motion is decided."""
    sigma = torch.sigmoid(torch.randn(n, generator=gen) + logit_mean)
    n_high = round(high_noise_frac * n)
    if n_high:
        sigma[:n_high] = 0.85 + 0.15 * torch.rand(n_high, generator=gen)
    return sigma


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], modules: torch.nn.Module, trainable: set[str], decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * weights`` for the ``trainable`` state-dict keys; the
    frozen ones copied, so they stay bit-exact (``x * d + x * (1 - d)`` is not always ``x``)."""
    for k, p in modules.state_dict().items():
        if k in trainable:
            ema[k].mul_(decay).add_(p, alpha=1 - decay)
        else:
            ema[k].copy_(p)


def video_to_latent(videos: torch.Tensor) -> torch.Tensor:
    """``(B, F, H, W, 3)`` uint8 -> pixel latents ``(B, 3, F, H, W)`` in ``[-1, 1]``."""
    return videos.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


__all__ = ["FRAMES", "MAX_TEXT_TOKENS", "draw_sigmas", "ema_update", "POSITION_CHANNELS", "SIZE", "TEXT_ENCODER", "TRANSFORMER", "WEIGHTS_DIR",
           "build_world_adapter", "flow_matching_loss", "load_world_adapter", "video_to_latent", "world_init",
           "world_modules"]
