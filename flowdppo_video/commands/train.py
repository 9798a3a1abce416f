"""``python -m flowdppo_video.commands.train [--config X] [overrides]`` (for launchers).

The ``deepspeed`` launcher appends ``--local_rank=N``: it is taken out here (and becomes
``LOCAL_RANK`` if the launcher did not set that too), so the CLI sees only its own arguments.
"""

import os
import sys

from .cli import main


def strip_local_rank(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out


if __name__ == "__main__":
    sys.exit(main(["train", *strip_local_rank(sys.argv[1:])]))
