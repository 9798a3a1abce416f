"""From a config, or a run directory, to a ready model: the one way every command builds one.

``train``, ``sample``, ``eval``, ``export`` and ``plan`` (and the benchmark scripts) go through
:func:`open_run` (a run directory's config, with its one-line errors) and :func:`build_model`
(the adapter of the config's family, LoRA or full, its attention backend and compile settings,
the run's images for image-to-video, the latent shape of ``video``). The rule for keeping a frozen
reference model is :func:`keeps_reference`, written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from flowdppo_video.models import build_adapter
from flowdppo_video.runs.config import Config, load_config
from flowdppo_video.runs.images import attach_images, run_images
from flowdppo_video.runs.run_dir import require_run_dir
from flowdppo_video.runs.seeding import resolve_device


def keeps_reference(cfg: Config) -> bool:
    """Whether a training run keeps the frozen base reachable (``adapter.reference()``): for the KL
    to the reference (``objective.beta > 0``) or the evaluation's KL to the base model
    (``eval.kl_to_base`` with held-out prompts). Routing by noise level keeps it regardless (the
    adapter's own rule: the base denoises below the boundary)."""
    return cfg.objective.beta > 0 or (cfg.eval.prompts is not None and cfg.eval.kl_to_base)


def open_run(run_dir: str | Path, overrides: list[str] | None = None, flag: str = "RUN") -> Config:
    """The config of an existing run directory with ``overrides`` applied; a folder that is no run
    is one line naming it and ``flag`` (the argument that gave it)."""
    return load_config(require_run_dir(Path(run_dir), flag), overrides or [])


@dataclass
class RunModel:
    """What a command samples or trains with: the adapter, its device, and the latent shape
    ``(C, F', H', W')`` of the config's video size."""

    adapter: Any
    device: torch.device
    latent_shape: tuple[int, int, int, int]


def build_model(cfg: Config, device: torch.device | None = None, *, reference: bool = False,
                images: dict[str, Path] | None | bool = True,
                transform: Callable[[Any], None] | None = None) -> RunModel:
    """The adapter of ``cfg.model`` on ``device`` (default: ``run.device``).

    Args:
        reference: keep the frozen base reachable through ``adapter.reference()``; training
            passes :func:`keeps_reference` (sampling and export never need it).
        images: the run's images (``prompt -> path``, :func:`~flowdppo_video.runs.images.run_images`);
            True reads them from the config, False attaches none (export: the weights only).
        transform: applied to the built adapter before the images are attached (the trainer's
            sequence parallelism: parallelism is applied to a built model from outside).
    """
    device = device if device is not None else resolve_device(cfg.run.device)
    adapter = build_adapter(cfg.model, device, keep_reference=reference)
    adapter.frame_rate = cfg.video.fps          # one value, from the config to every reader
    if transform is not None:
        transform(adapter)
    if images is not False:
        if images is True:
            images = run_images(cfg.data.prompts, cfg.data.images, cfg.eval.prompts, cfg.eval.images)
        attach_images(adapter, images, cfg)
    v = cfg.video
    return RunModel(adapter, device, adapter.latent_shape(v.num_frames, v.height, v.width))


__all__ = ["RunModel", "build_model", "keeps_reference", "open_run"]
