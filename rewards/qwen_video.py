"""Qwen-VL video input without torchvision: which frames a model sees, the Qwen2-VL /
Qwen2.5-VL patch layout of those frames, and the chat template that renders video parts. Used by
the VLM judge and the VideoAlign reward (both Qwen2-VL based)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from .common import read_json
from .registry import RewardError

VIDEO_TOKEN = "<|video_pad|>"


def sample_frame_indices(num_frames: int, fps: float, sample_fps: float, max_frames: int, multiple: int = 1
                         ) -> list[int]:
    """Indices of the frames a judge sees, uniformly spread (transformers' Qwen-VL rule).

    ``num_frames / fps * sample_fps`` frames, clamped to ``[multiple, min(max_frames, num_frames)]``
    and rounded down to a multiple of ``multiple`` (the temporal patch), at least ``multiple``
    when the video has that many; a shorter video keeps all its frames (the packer pads).
    """
    if num_frames < 1:
        raise RewardError("videos must have at least one frame")
    cap = min(max_frames, num_frames)
    if cap < multiple:
        return list(range(num_frames))
    n = num_frames / fps * sample_fps
    n = min(max(n, multiple), cap)
    n = max(multiple, int(math.floor(n / multiple)) * multiple)
    return torch.arange(0, num_frames, num_frames / n).int()[:n].tolist()


class QwenVideoPacker:
    """The Qwen2-VL / Qwen2.5-VL video preprocessing, without torchvision.

    Built from a checkpoint's ``video_preprocessor_config.json`` (else ``preprocessor_config.json``),
    defaults as transformers' ``Qwen2VLVideoProcessor``. :meth:`pack` turns ``(F, H, W, 3)`` uint8
    frames into ``(T*h*w, 3*tps*p*p)`` patches and the grid ``(T, h, w)``, exactly as that processor
    lays them out (its resize is torchvision's bicubic antialiased resize on uint8, reproduced here
    with ``torch.nn.functional.interpolate`` and rounding).
    """

    def __init__(self, model_dir: Path,
                 config_names: Sequence[str] = ("video_preprocessor_config.json", "preprocessor_config.json")) -> None:
        cfg: dict = {}
        for name in config_names:                                  # the first that exists
            if (model_dir / name).is_file():
                cfg = read_json(model_dir / name)
                break
        size = dict(cfg.get("size") or {})
        self.min_pixels = int(cfg.get("min_pixels") or size.get("shortest_edge") or 128 * 28 * 28)
        self.max_pixels = int(cfg.get("max_pixels") or size.get("longest_edge") or 768 * 28 * 28)
        self.patch_size = int(cfg.get("patch_size", 14))
        self.temporal_patch_size = int(cfg.get("temporal_patch_size", 2))
        self.merge_size = int(cfg.get("merge_size", 2))
        self.rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        normalize = cfg.get("do_normalize", True)
        mean = cfg.get("image_mean", [0.48145466, 0.4578275, 0.40821073]) if normalize else [0.0] * 3
        std = cfg.get("image_std", [0.26862954, 0.26130258, 0.27577711]) if normalize else [1.0] * 3
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def pack(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``frames`` ``(F, H, W, 3)`` uint8 -> patches ``(T*h*w, 3*tps*p*p)`` float32, grid ``(T, h, w)``."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        f, height, width, _ = frames.shape
        p, m, tps = self.patch_size, self.merge_size, self.temporal_patch_size
        try:
            rh, rw = smart_resize(height, width, factor=p * m, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:
            raise RewardError(f"videos of {height}x{width} cannot be judged: {e}") from e
        x = frames.permute(0, 3, 1, 2).float()                                         # (F, 3, H, W)
        if (rh, rw) != (height, width):
            x = torch.nn.functional.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
            x = x.round().clamp(0, 255)                                                # torchvision keeps uint8
        x = (x * self.rescale - self.mean) / self.std
        if pad := -f % tps:                                                            # repeat the last frame
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)], dim=0)
        t, gh, gw = x.shape[0] // tps, rh // p, rw // p
        x = x.view(t, tps, 3, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                                       # (t, h/m, w/m, m, m, C, tps, p, p)
        return x.reshape(t * gh * gw, 3 * tps * p * p).contiguous(), (t, gh, gw)


def find_chat_template(path: Path) -> str:
    """The processor's chat template (it renders video parts), else the tokenizer's."""
    if (path / "chat_template.json").is_file():
        tpl = read_json(path / "chat_template.json").get("chat_template")
        if isinstance(tpl, str):
            return tpl
    for name in ("chat_template.jinja",):
        if (path / name).is_file():
            return (path / name).read_text()
    cfg = path / "tokenizer_config.json"
    tpl = read_json(cfg).get("chat_template") if cfg.is_file() else None
    if not isinstance(tpl, str):
        raise RewardError(f"{path} has no chat template (chat_template.json, chat_template.jinja or "
                          f"tokenizer_config.json)")
    return tpl



def chat_inputs(tokenizer: Any, chat_template: str, model_name: Any, items: Sequence[tuple[str, Sequence[int]]],
                pad_token: str, kind: str, merge_size: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` of one user turn per ``(text, grid)`` item: a
    ``kind`` ("image" or "video") part, then the text; the part's ``pad_token`` is repeated once per
    merged patch of the packed ``grid`` ``(t, h, w)``. One line naming ``model_name`` when the template
    does not render exactly one placeholder."""
    texts = []
    for text, grid in items:
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
        rendered = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                                 add_generation_prompt=True)
        if rendered.count(pad_token) != 1:
            raise RewardError(f"the chat template of {model_name} must render one {pad_token} for the {kind}, "
                              f"rendered {rendered.count(pad_token)}")
        texts.append(rendered.replace(pad_token, pad_token * (math.prod(grid) // merge_size ** 2)))
    enc = tokenizer(texts, padding=True, padding_side="right", return_tensors="pt", add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
