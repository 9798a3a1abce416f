"""The one interface every model family gives the rollout and the trainer."""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path

import torch


class ModelError(ValueError):
    """A model that cannot be loaded or used as asked; one line naming the cause."""


class VideoFlowAdapter(abc.ABC):
    """A text-to-video flow model seen as a velocity field over latents ``(B, C, F, H, W)``.

    The adapter owns the transformer (the only part that trains), the frozen text encoder
    and autoencoder. It is a pure container: parallelism, optimisers and precision policy
    are applied from outside.
    """

    transformer: torch.nn.Module
    patch_size: tuple[int, int, int]
    device: torch.device

    @abc.abstractmethod
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(C, F, H, W)`` of the latent for a video of that size; a clear error if impossible."""

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings ``(P, L, D_text)`` in the transformer dtype, cached per prompt."""

    @abc.abstractmethod
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``v(x, sigma, c)``: ``x`` ``(B, C, F, H, W)``, ``sigma`` ``(B,)``, ``text`` ``(B, L, D)``.

        Returns float32 ``(B, C, F, H, W)``. The single forward path of rollout and replay.
        """

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, F, H, W)`` -> videos ``(B, F_px, H_px, W_px, 3)`` uint8 on the CPU."""

    @abc.abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimiser updates (LoRA adapters, or the whole transformer)."""

    @abc.abstractmethod
    def save_trainable(self, directory: Path) -> None:
        """Write what trains (safetensors) into ``directory``."""

    @abc.abstractmethod
    def load_trainable(self, directory: Path) -> None:
        """Load what :meth:`save_trainable` wrote, in place (optimiser state stays valid)."""

    @abc.abstractmethod
    def reference(self) -> contextlib.AbstractContextManager[None]:
        """Within this context, :meth:`velocity` is the frozen base model's."""

    @abc.abstractmethod
    def save_pretrained(self, directory: Path) -> None:
        """Write the whole model as a diffusers-format directory (``from_pretrained`` loads it)."""
