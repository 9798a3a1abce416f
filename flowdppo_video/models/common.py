"""What several families share and none owns: the dtype names of ``model.dtype``, a VAE's latent
statistics, transformers' image processor classes, the check that a diffusers directory holds a
pipeline's folders, and the parts of a staged build (:func:`building`: the conditioning encoders
alone, or the denoiser alone)."""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

from ..runs.images import open_image
from .base import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The folders of a pipeline with two text encoders (HunyuanVideo 1.0, its I2V, 1.5).
TWO_ENCODER_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def vae_latent_stats(vae: Any, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """A Wan-style VAE's per-channel ``latents_mean`` and ``latents_std`` (its config), each
    ``(1, C, 1, 1, 1)``: the transformer's latents are the posterior minus the mean, over the std."""
    c = len(vae.config.latents_mean)
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=dtype).view(1, c, 1, 1, 1)
    return mean, std


@contextlib.contextmanager
def built_in(dtype: torch.dtype) -> Iterator[None]:
    """Within: new floating-point parameters are created (and randomly initialised) in ``dtype``.

    A random build of a real size must never exist in float32 first: UMT5-XXL's 5.7B parameters are
    23 GB in float32, 11.4 GB in bfloat16. Buffers a constructor computes in an explicit dtype keep
    it (cast after the build, as before)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def clip_processor_class(name: str = "CLIPImageProcessor") -> Any:
    """transformers' image processor ``name`` (CLIP's by default, or ``SiglipImageProcessor``): the
    default one with torchvision, else its PIL backend (what it falls back to anyway, without the warning)."""
    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, f"{name}Pil"):
        return getattr(transformers, f"{name}Pil")
    return getattr(transformers, name)


def check_pipeline_folders(path: Path, transformer_class: str, family: str,
                           parts: tuple[str, ...] = TWO_ENCODER_PARTS) -> None:
    """``path`` holds a ``transformer_class`` and every folder of ``parts``; one-line errors naming
    what is missing (``family``: the ``model.family`` the user asked for)."""
    cfg_file = path / "transformer" / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"model.path {path} has no transformer/config.json")
    cls = json.loads(cfg_file.read_text()).get("_class_name")
    if cls != transformer_class:
        raise ModelError(f"model.path {path} holds a {cls}, not a {transformer_class} "
                         f"(model.family is {family!r})")
    for sub in parts:
        if not (path / sub).is_dir():
            raise ModelError(f"model.path {path} has no {sub}/ folder")


# ---------------------------------------------------------------- a staged build
# What one build of a family makes (``models.build_adapter(..., parts=)``): every part, the
# conditioning encoders alone (the text encoders, and for image-to-video the image encoder and the VAE
# that encode each prompt's image), or the denoiser alone (the transformers and the VAE). A part left
# out is a skeleton on the meta device: its class and config, no memory, so the adapter's checks
# between parts still run. A family that honours this sets ``FamilySpec.staged``.
ALL, CONDITIONING, DENOISER = "all", "conditioning", "denoiser"
_PARTS: contextvars.ContextVar[str] = contextvars.ContextVar("parts", default=ALL)
M = TypeVar("M", bound=torch.nn.Module)


@contextlib.contextmanager
def building(parts: str) -> Iterator[None]:
    """Within: the family's build makes ``parts`` (:data:`ALL`, :data:`CONDITIONING`, :data:`DENOISER`)."""
    if parts not in (ALL, CONDITIONING, DENOISER):
        raise ValueError(f"parts must be one of {ALL!r}, {CONDITIONING!r}, {DENOISER!r}, got {parts!r}")
    token = _PARTS.set(parts)
    try:
        yield
    finally:
        _PARTS.reset(token)


def is_skeleton(module: Any) -> bool:
    """Whether ``module`` is a part left out of this build (its tensors on the meta device)."""
    return isinstance(module, torch.nn.Module) and any(
        t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def skeleton(cls: Any, folder: Path, dtype: torch.dtype | None = None) -> Any:
    """``cls`` (a diffusers or transformers model class) from ``folder``'s config.json on the meta
    device: the part's shape without its weights (nothing is read but the config)."""
    with torch.device("meta"):
        if hasattr(cls, "load_config"):                       # diffusers
            model = cls.from_config(cls.load_config(folder))
        else:                                                 # transformers
            model = cls(cls.config_class.from_pretrained(folder))
    return model.to(dtype) if dtype is not None else model


def encoder_part(load: Callable[[], M], meta: Callable[[], M] | None = None) -> M:
    """A conditioning encoder of this build: ``load()``, or (the denoiser's build) ``meta()``, by
    default ``load()`` under the meta device (a random build: nothing drawn, the generator untouched)."""
    if _PARTS.get() != DENOISER:
        return load()
    if meta is not None:
        return meta()
    with torch.device("meta"):
        return load()


def denoiser_part(load: Callable[[], M], meta: Callable[[], M], *, conditions: bool = False) -> M:
    """A part of the denoiser (a transformer, the VAE): ``load()``, or in the conditioning build
    ``meta()``; ``conditions``: the part also encodes the prompts' conditioning (an image-to-video
    VAE), so that build loads it too."""
    return meta() if _PARTS.get() == CONDITIONING and not conditions else load()


def drawn_denoiser(module: M, *, conditions: bool = False) -> M:
    """A randomly drawn part of the denoiser: in the conditioning build, moved to the meta device at
    once (drawn all the same, so the generator reaches the encoders where a whole build has it)."""
    return module.to("meta") if _PARTS.get() == CONDITIONING and not conditions else module


def place(module: M, device: torch.device) -> M:
    """``module`` on ``device``; a skeleton (:func:`is_skeleton`) stays where it is."""
    return module if is_skeleton(module) else module.to(device=device)


class PromptImages:
    """What an image-to-video adapter keeps of its conditioning images: ``prompt -> image`` given by
    :meth:`set_images` (paths, opened when the prompt is first encoded, or PIL images), the video
    size they are for, and the per-prompt condition cache (``_cond_cache``) a changed image or size
    invalidates. Mixed in before the family's adapter class; call :meth:`_init_images` in ``__init__``."""

    takes_images = True
    _images: dict[str, Any]
    _size: tuple[int, int, int] | None
    _cond_cache: dict[str, Any]

    def _init_images(self) -> None:
        self._images, self._size, self._cond_cache = {}, None, {}

    def set_images(self, images: dict[str, Any], num_frames: int, height: int, width: int) -> None:
        """``prompt -> image`` (a path, opened when the prompt is first encoded, or a PIL image)."""
        self.latent_shape(num_frames, height, width)            # type: ignore[attr-defined]  # a clear error
        size = (num_frames, height, width)
        if size != self._size:
            self._forget_image_rows(None)
        for prompt, image in images.items():
            if prompt in self._images and self._images[prompt] != image:
                self._forget_image_rows(prompt)
            self._images[prompt] = image
        self._size = size

    def _forget_image_rows(self, prompt: str | None) -> None:
        """Drop what was computed from ``prompt``'s image (``None``: from every image: the size changed)."""
        if prompt is None:
            self._cond_cache.clear()
        else:
            self._cond_cache.pop(prompt, None)

    def _image(self, prompt: str) -> Any:
        """``prompt``'s image, opened (RGB); a one-line error naming ``data.images`` if it has none."""
        if prompt not in self._images or self._size is None:
            raise ModelError(f"prompt {prompt!r} has no conditioning image: an image-to-video model needs "
                             "data.images (and eval.images for held-out prompts), one image per prompt")
        image = self._images[prompt]
        if isinstance(image, (str, Path)):
            image = open_image(image)
        return image
