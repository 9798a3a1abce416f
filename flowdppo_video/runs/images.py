"""Conditioning images of image-to-video models: one image per prompt, named by ``data.images``
(training prompts) and ``eval.images`` (held-out prompts).

A source is one of:

* a text file with one image path a line, in the order of the prompts (blank and ``#`` lines are
  skipped, as in prompt files); relative paths are relative to the file's folder;
* a folder whose images are named by the prompt's 0-based index (``0.png``, ``1.jpg``, ``007.webp``);
* a list of image paths in the config, one per prompt.

Images are checked here (they exist, open, and match the prompts in number) and handed to the
adapter as paths; the adapter opens them with :func:`open_image` and resizes them to the video
size as its pipeline does. The image is looked up by the prompt's text, so two identical prompts
must name the same image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import PIL.Image

from .config import Config
from .data import DataError, load_prompts
from .resources import resolve

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def open_image(path: str | Path) -> Any:
    """An RGB ``PIL.Image`` (EXIF orientation applied, as diffusers' ``load_image`` does)."""
    import PIL.ImageOps

    with PIL.Image.open(path) as im:
        im.load()
        return PIL.ImageOps.exif_transpose(im).convert("RGB")


def image_paths(source: str | list[str], count: int, key: str) -> list[Path]:
    """The ``count`` image paths ``source`` names (see the module doc); one-line :class:`DataError`\\ s
    naming ``key`` and the path."""
    if isinstance(source, list):
        paths, where = [Path(resolve(p)) for p in source], f"{key} (a list)"
    else:
        root = Path(resolve(source))
        if root.is_dir():
            where, found = f"{key} folder {root}", {}
            for f in sorted(root.iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if not f.stem.isdigit():
                    raise DataError(f"{key} folder {root}: {f.name} is not named by a prompt index (0.png, 1.png, ...)")
                i = int(f.stem)
                if i in found:
                    raise DataError(f"{key} folder {root}: {found[i].name} and {f.name} both name prompt {i}")
                found[i] = f
            missing = [i for i in range(count) if i not in found]
            if missing:
                raise DataError(f"{where} has no image for prompt {missing[0]} ({len(found)} images for "
                                f"{count} prompts; name them 0.png, 1.png, ...)")
            extra = sorted(i for i in found if i >= count)
            if extra:
                raise DataError(f"{where} has {found[extra[0]].name} but there are only {count} prompts")
            paths = [found[i] for i in range(count)]
        elif root.is_file():
            try:
                text = root.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{key} file {root} is unreadable: {e}") from None
            lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            paths, where = [p if p.is_absolute() else root.parent / p for p in map(Path, lines)], f"{key} file {root}"
        else:
            raise DataError(f"{key} {root} does not exist (a file of image paths or a folder of images)")
    if len(paths) != count:
        raise DataError(f"{where} names {len(paths)} images for {count} prompts (one image per prompt)")
    for i, p in enumerate(paths):
        if not p.is_file():
            raise DataError(f"{key}: image {p} (prompt {i}) does not exist")
    return paths


def check_image(path: Path, key: str) -> None:
    """Open ``path`` as an image; a one-line :class:`DataError` naming it if that fails."""
    try:
        open_image(path)
    except Exception as e:  # PIL raises many types for a bad file
        raise DataError(f"{key}: image {path} is not a readable image ({type(e).__name__})") from None


def run_images(data_prompts: str | list[str], data_images: str | list[str] | None,
               eval_prompts: str | list[str] | None = None, eval_images: str | list[str] | None = None
               ) -> dict[str, Path] | None:
    """``prompt -> image path`` of a run's training and held-out prompts, checked; None when neither
    ``data.images`` nor ``eval.images`` is set."""
    if data_images is None and eval_images is None:
        return None
    out: dict[str, Path] = {}
    for key, prompts_src, source in (("data.images", data_prompts, data_images),
                                     ("eval.images", eval_prompts, eval_images)):
        if source is None or prompts_src is None:
            continue
        prompts = load_prompts(prompts_src)
        for prompt, path in zip(prompts, image_paths(source, len(prompts), key)):
            if prompt in out and out[prompt].resolve() != path.resolve():
                raise DataError(f"{key}: prompt {prompt!r} has two images ({out[prompt]}, {path}); "
                                "an image is looked up by its prompt's text")
            if prompt not in out:
                check_image(path, key)
            out[prompt] = path
    return out


def attach_images(adapter: Any, images: dict[str, Path] | None, cfg: Config) -> None:
    """Hand a run's images (:func:`run_images`) to ``adapter``, or say in one line why not.

    ``cfg`` is the whole run config: the family, the video size and which of ``data``/``eval`` set images.
    """
    family = cfg.model.family
    if not adapter.takes_images:
        if images is not None:
            key = "data.images" if cfg.data.images is not None else "eval.images"
            raise DataError(f"{key} is set but model.family {family!r} is text-to-video: it takes no images")
        return
    if cfg.data.images is None:
        raise DataError(f"data.images is not set: model.family {family!r} is image-to-video and needs one "
                        "conditioning image per prompt (a file of image paths or a folder 0.png, 1.png, ...)")
    if cfg.eval.prompts is not None and cfg.eval.images is None:
        raise DataError(f"eval.images is not set: model.family {family!r} is image-to-video and needs one "
                        "conditioning image per held-out prompt (eval.prompts)")
    v = cfg.video
    adapter.set_images(images or {}, v.num_frames, v.height, v.width)


def load_run_images(adapter: Any, cfg: Config) -> None:
    """:func:`run_images` of ``cfg`` handed to ``adapter`` (:func:`attach_images`) in one call."""
    attach_images(adapter, run_images(cfg.data.prompts, cfg.data.images, cfg.eval.prompts, cfg.eval.images), cfg)
