"""What several families share and none owns: the dtype names of ``model.dtype``, transformers'
CLIP image processor class, and the check that a diffusers directory holds a pipeline's folders."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from .base import ModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The folders of a pipeline with two text encoders (HunyuanVideo 1.0, its I2V, 1.5).
TWO_ENCODER_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


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


def clip_processor_class() -> Any:
    """transformers' CLIP image processor: the default one with torchvision, else its PIL backend (what
    ``CLIPImageProcessor`` falls back to anyway, without the warning)."""
    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


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
