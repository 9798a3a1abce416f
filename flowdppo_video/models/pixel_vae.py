"""An identity autoencoder: pixel-space latents for small models (the shapes world).

It speaks the part of ``AutoencoderKLWan``'s interface the adapters use (``config.z_dim``,
``config.temperal_downsample``, ``config.latents_mean``/``latents_std``, ``decode``), so the
rollout and the trainer cannot tell it from a real video VAE.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class PixelAutoencoder(ModelMixin, ConfigMixin):
    """``encode``: video in ``[-1, 1]`` ``(B, 3, F, H, W)`` -> the same tensor; ``decode``: the inverse."""

    @register_to_config
    def __init__(self, z_dim: int = 3, latents_mean: list[float] | None = None,
                 latents_std: list[float] | None = None, temperal_downsample: list[bool] | None = None,
                 scale_factor_temporal: int = 1, scale_factor_spatial: int = 1) -> None:
        super().__init__()
        # diffusers saves and loads a weights file; a scalar buffer keeps the format standard.
        self.register_buffer("scale", torch.ones(()))
        if latents_mean is None:
            self.register_to_config(latents_mean=[0.0] * z_dim)
        if latents_std is None:
            self.register_to_config(latents_std=[1.0] * z_dim)
        if temperal_downsample is None:
            self.register_to_config(temperal_downsample=[])

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video * self.scale

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> tuple[torch.Tensor] | dict:
        video = z / self.scale
        return (video,) if not return_dict else {"sample": video}
