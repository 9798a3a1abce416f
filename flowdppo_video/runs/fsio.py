"""File-system failures as one line naming the path: output folders checked before a run writes,
and ``OSError`` (disk full, read-only, permissions, missing) worded for the CLI."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from .config import ConfigError


def check_output_dir(path: str | Path, key: str) -> None:
    """Refuse an output folder that cannot be made, before anything is written: ``path`` or one of
    its parents is a file, or the nearest existing parent is not writable. Creates nothing."""
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == p else f"is under {probe}, which is a file"
        raise ConfigError(f"{key} {p} {where}, not a folder")
    # The nearest existing folder must let us create the rest (root ignores the mode bits, so
    # os.access answers for the real process).
    target = p if p.exists() else probe
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {p}: {target} is not writable (permission denied or a read-only file system)")


def check_new_output(path: str | Path, key: str) -> None:
    """Refuse an output folder that already holds anything (nothing is ever written over a user's
    or a run's files), or that cannot be made (:func:`check_output_dir`). Creates nothing."""
    p = Path(path)
    check_output_dir(p, key)
    if p.is_dir() and any(p.iterdir()):
        raise ConfigError(f"{key} {p} exists and is not empty; nothing was written (give a new or empty folder)")


def os_error_line(e: OSError, out: str | Path | None = None) -> str:
    """``PATH: No space left on device``: one line, the path first; an error that names no file
    says the output folder it happened under (``out``), when the command has one."""
    if e.errno is None and e.filename is None:   # already worded (e.g. a checkpoint write)
        return (str(e).splitlines() or [type(e).__name__])[0]
    reason = e.strerror or (str(e).splitlines() or [type(e).__name__])[0]
    names = [n for n in (e.filename, e.filename2) if n is not None]
    if names:
        return f"{' -> '.join(str(n) for n in names)}: {reason}"
    return f"{reason} (writing under --out {out})" if out is not None else reason


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Within: an ``OSError`` that names no file (a ``write()`` on a full disk) names ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            e.filename = str(path)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed over it: a full disk or a kill leaves the
    old content whole, never a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None or str(e.filename) == str(tmp):
            e.filename = str(path)
        raise
