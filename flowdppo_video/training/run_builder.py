"""From a config, or a run directory, to a ready model: the one way every command builds one.

``train``, ``sample``, ``eval``, ``export`` and ``plan`` (and the benchmark scripts) go through
:func:`open_run` (a run directory's config, with its one-line errors) and :func:`build_model`
(the adapter of the config's family, LoRA or full, its attention backend and compile settings,
the run's images for image-to-video, the latent shape of ``video``). The rule for keeping a frozen
reference model is :func:`keeps_reference`, written once.

A command that names the prompts it conditions on gets a staged start (:func:`build_model`'s
``prompts``): the rows the run's text cache lacks are encoded by the conditioning encoders built
alone, which are released before the transformers and the VAE are built, so the encoders and the
transformers are never in memory together; when the cache covers every prompt no encoder is built.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from flowdppo_video.models import ALL, CONDITIONING, DENOISER, build_adapter, staged
from flowdppo_video.models.text_cache import (
    CACHE_FILE, TextCache, cache_run_prompts, encode_rows, missing_rows, run_key, run_negative)
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
    # The staged start's counts: text/cached_prompts (rows read from the run's cache),
    # text/encoded_prompts, text/encoder_released_bytes; empty when no prompts were named.
    text_stats: dict[str, float] = field(default_factory=dict)


def build_encoders(cfg: Config, device: torch.device) -> Any:
    """The family's conditioning encoders alone (``CONDITIONING``; the transformers are skeletons):
    the first stage of a start or of an export, released by the caller before the denoiser is built."""
    return build_adapter(cfg.model, device, parts=CONDITIONING)


def encode_stage(cfg: Config, device: torch.device, prompts: list[str], images: dict[str, Path] | None,
                 run_dir: Path, progress: bool = False) -> tuple[TextCache, dict[str, float]]:
    """The first stage of a start: the run's text cache (``run_dir/text_cache.safetensors`` when it was
    written for this model), and the rows it lacks (``prompts`` and their CFG negatives) encoded by
    the family's conditioning encoders built alone (``CONDITIONING``) and released before this returns.
    A cache covering every row builds no encoder. The file is not written here (the trainer writes it
    once the run directory is its own)."""
    cache = TextCache(run_key(cfg, images))
    path = run_dir / CACHE_FILE
    read = cache.load(path)
    stats = {"text/cached_prompts": float(read), "text/encoded_prompts": 0.0, "text/encoder_released_bytes": 0.0}
    if not missing_rows(cache, prompts, run_negative(cfg)):
        return cache, stats
    encoder = build_encoders(cfg, device)
    encoder.frame_rate = cfg.video.fps
    attach_images(encoder, images, cfg)        # image-to-video: each prompt's image is in its row
    jobs = missing_rows(cache, prompts, run_negative(cfg, encoder.num_experts))
    encode_rows(cache, encoder, jobs, progress=progress)
    freed = encoder.release_text_encoders()
    del encoder
    gc.collect()                               # nothing of the encoders survives into the next stage
    if device.type == "cuda":
        torch.cuda.empty_cache()
    stats.update({"text/encoded_prompts": float(len(jobs)), "text/encoder_released_bytes": float(freed)})
    if progress:
        tqdm.write(f"prompt conditioning: {len(jobs)} rows encoded, {read} read from {path}; text encoder "
                   f"released ({freed / 2 ** 30:.2f} GiB) before the transformer is built")
    return cache, stats


def build_model(cfg: Config, device: torch.device | None = None, *, reference: bool = False,
                images: dict[str, Path] | None | bool = True,
                transform: Callable[[Any], None] | None = None, prompts: list[str] | None = None,
                run_dir: Path | None = None, progress: bool = False, encoders: bool = True) -> RunModel:
    """The adapter of ``cfg.model`` on ``device`` (default: ``run.device``).

    Args:
        reference: keep the frozen base reachable through ``adapter.reference()``; training
            passes :func:`keeps_reference` (sampling and export never need it).
        images: the run's images (``prompt -> path``, :func:`~flowdppo_video.runs.images.run_images`);
            True reads them from the config, False attaches none (export: the weights only).
        transform: applied to the built adapter before the images are attached (the trainer's
            sequence parallelism: parallelism is applied to a built model from outside).
        prompts: the prompts the command conditions on: a staged start (:func:`encode_stage`, then
            the denoiser alone), the rows served from ``adapter.text_cache`` (``run_dir``'s cache read
            first; ``progress``: the encoding's bar). A family without ``FamilySpec.staged``, or
            ``model.keep_text_encoder``, builds every part, encodes, then releases (or keeps) the
            encoders. None: every part is built and encodes on demand (tools that encode as they go).
        encoders: False: the command needs no text encoder at all (export of a ``model.path``
            model, which copies the encoders' folders from it): the denoiser alone.
    """
    device = device if device is not None else resolve_device(cfg.run.device)
    if images is True:
        images = run_images(cfg.data.prompts, cfg.data.images, cfg.eval.prompts, cfg.eval.images)
    apart = staged(cfg.model) and not cfg.model.keep_text_encoder
    parts, cache, stats = ALL, None, {}
    if prompts is not None and apart:
        if run_dir is None:
            raise ValueError("build_model: prompts need the run directory whose text cache they use")
        cache, stats = encode_stage(cfg, device, prompts, images if images is not False else None, run_dir,
                                    progress)
        parts = DENOISER
    elif not encoders and apart:
        parts = DENOISER
    adapter = build_adapter(cfg.model, device, keep_reference=reference, parts=parts)
    adapter.frame_rate = cfg.video.fps          # one value, from the config to every reader
    if transform is not None:
        transform(adapter)
    if images is not False:
        attach_images(adapter, images, cfg)
    if cache is not None:
        adapter.text_cache = cache
    elif prompts is not None:                   # every part at once: encode, then release (or keep)
        if run_dir is None:
            raise ValueError("build_model: prompts need the run directory whose text cache they use")
        stats = cache_run_prompts(adapter, cfg, prompts, images if images is not False else None, run_dir,
                                  progress)
    v = cfg.video
    return RunModel(adapter, device, adapter.latent_shape(v.num_frames, v.height, v.width), stats)


def build_export_model(cfg: Config, staging: Path) -> Any:
    """The adapter an export saves, on the CPU, without the encoders and the transformers in memory
    together. A ``model.path`` model: the denoiser alone (the export copies the encoders' folders
    from ``model.path``). A ``model.init`` model of a staged family: its encoders exist nowhere else,
    so they are drawn alone first (the same draws as a whole build), saved into ``staging`` and
    released; then the denoiser alone, whose export copies them from there. Otherwise every part."""
    cpu = torch.device("cpu")
    if cfg.model.path is None and staged(cfg.model) and not cfg.model.keep_text_encoder:
        encoders = build_encoders(cfg, cpu)
        encoders.save_encoders(staging)
        del encoders
        gc.collect()                               # the encoders are gone before the denoiser is drawn
        adapter = build_model(cfg, cpu, images=False, encoders=False).adapter
        adapter.source_path = staging
        return adapter
    return build_model(cfg, cpu, images=False, encoders=cfg.model.path is None).adapter


__all__ = ["RunModel", "build_encoders", "build_export_model", "build_model", "encode_stage", "keeps_reference",
           "open_run"]
