"""Files shipped inside the package, named ``builtin:<path>`` in configs.

``builtin:weights/shapes-world`` is the shapes-world model; ``builtin:prompts/train.txt`` and
``builtin:prompts/heldout.txt`` its prompt split.
"""

from __future__ import annotations

from pathlib import Path

BUILTIN_ROOT = Path(__file__).parents[1] / "world"
PREFIX = "builtin:"


def resolve(path: str) -> str:
    """A ``builtin:`` path as a real path; any other path unchanged."""
    if path.startswith(PREFIX):
        return str(BUILTIN_ROOT / path[len(PREFIX):])
    return path
