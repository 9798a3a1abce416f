"""Prompts: loading, and a deterministic per-iteration order."""

from __future__ import annotations

from pathlib import Path

import torch

from .resources import resolve


class DataError(ValueError):
    """Unusable prompt data; one line naming the file or key."""


def load_prompts(source: str | list[str]) -> list[str]:
    """A list from the config, or a text file with one prompt a line (``#`` lines are comments)."""
    if isinstance(source, list):
        prompts = [p.strip() for p in source if p.strip()]
        where = "data.prompts"
    else:
        path = Path(resolve(source))
        if not path.is_file():
            raise DataError(f"prompt file {path} (data.prompts) does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"prompt file {path} is unreadable: {e}") from None
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        where = f"prompt file {path}"
    if not prompts:
        raise DataError(f"{where} holds no prompts")
    return prompts


def prompts_for_iteration(prompts: list[str], iteration: int, per_iteration: int, seed: int) -> list[str]:
    """The ``per_iteration`` prompts of ``iteration``: epochs of seeded permutations, back to back.

    A pure function of its arguments, so a resumed run sees the same prompts.
    """
    n = len(prompts)
    out = []
    for pos in range(iteration * per_iteration, (iteration + 1) * per_iteration):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(prompts[int(perm[i])])
    return out
