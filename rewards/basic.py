"""Weight-free rewards that need nothing but pixels."""

from __future__ import annotations

import torch

from .registry import register


@register("frame_change")
class FrameChange:
    """Mean absolute change between consecutive frames, in ``[0, 1]`` (0 = static video).

    A crude motion-amount signal: it lets the loop run before the real motion rewards land,
    and it is trivially hackable by flicker, so do not use it to judge motion quality.
    """

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        # per frame pair, not per second: the frame rate does not enter
        v = videos.float() / 255.0                                    # (B, F, H, W, 3)
        if v.shape[1] < 2:
            return torch.zeros(v.shape[0])
        return (v[:, 1:] - v[:, :-1]).abs().mean(dim=(1, 2, 3, 4))
