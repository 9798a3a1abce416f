"""``python -m flowdppo_video.train [--config X] [overrides]`` (for launchers)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
