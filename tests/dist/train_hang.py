"""A training run in which rank 1 hangs in its reward (a stuck reward service, say): rank 0 must
stop with a clear error within ``parallel.timeout_s``. Launched by tests/test_distributed_train.py
with torchrun; arguments are the CLI's ``train`` arguments."""

import os
import sys
import time

import torch

from flowdppo_video.commands.cli import main
from rewards.registry import register


@register("hang_on_rank_1")
class HangOnRank1:
    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        if os.environ.get("RANK") == "1":
            time.sleep(600)
        return videos.float().mean(dim=(1, 2, 3, 4)) / 255.0


if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
