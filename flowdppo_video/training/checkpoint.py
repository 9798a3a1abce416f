"""Checkpoints: what trains (safetensors), the optimizer (the updater's own files), RNG states and
the iteration.

A checkpoint is written into a temporary folder and renamed into place, so a kill at any
moment leaves either the previous checkpoint or the new one, never a torn one. Its last file,
``manifest.json``, holds the size and SHA-256 of every other file (of its first and last 16 MiB
for a file over 1 GiB, so a save of a large model does not read it all again): a checkpoint
damaged later (a truncated or rewritten file) fails :func:`verify_checkpoint`, and resume falls
back to the newest one that verifies (``resume_checkpoint``), moving the damaged one
aside, never deleting it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowdppo_video.exceptions import TrainingError
from flowdppo_video.models.base import VideoFlowAdapter
from flowdppo_video.parallel.groups import CollectiveTimeout, ParallelState
from flowdppo_video.parallel.updaters import Updater

_PREFIX = "iter_"
MANIFEST = "manifest.json"
CORRUPT_PREFIX = "corrupt_"        # where a damaged checkpoint is moved (not listed, not pruned)


class CheckpointError(OSError):
    """A checkpoint could not be written or read; one line naming the folder or file. ``reason``:
    the cause alone (``SafetensorError: ...``), for callers that name the checkpoint themselves."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def rng_state() -> dict[str, Any]:
    """The process's global random states (torch, Python, NumPy, and CUDA's where there is one)."""
    # The trainer's own streams are seeded per iteration; these global states only matter to
    # code outside it (user rewards drawing random numbers, say). On a GPU that code may draw on
    # the device: its generator (this process's current device, rank 0's) is kept too.
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():    # every rank's device takes rank 0's state, as
        torch.cuda.set_rng_state(state["cuda"])          # the CPU generators do (all seeded alike)


def save_checkpoint(run_dir: Path, adapter: VideoFlowAdapter, updater: Updater,
                    next_iteration: int, extra: dict[str, Any], keep: int = 2,
                    par: ParallelState | None = None, name: str | None = None) -> Path:
    """Write ``run_dir/checkpoints/iter_{next_iteration:06d}`` atomically; prune old ones. With
    ``name``, write ``run_dir/checkpoints/NAME`` instead (replacing one there; ``best``), outside the
    numbered ones: it is neither pruned nor resumed from.

    Collective when several ranks run: each writes its share of the optimizer state (ZeRO), rank
    0 the full trained weights, the RNG state and the meta, then renames the folder into place.
    """
    par = par or ParallelState()
    root = run_dir / "checkpoints"
    final = root / name if name else checkpoint_path(run_dir, next_iteration)
    tmp = root / f".tmp_{final.name}"
    if par.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    par.barrier("checkpoint start")
    with _writing(tmp, final):
        updater.save(tmp)
    with updater.gathered():                 # ZeRO-3: what trains (not a LoRA's frozen base), for rank 0
        if par.is_main:
            with _writing(tmp, final):
                adapter.save_trainable(tmp / "model")
    if par.is_main:
        with _writing(tmp, final):
            torch.save({"rng": rng_state()}, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"next_iteration": next_iteration, **extra}, indent=1))
    par.barrier("checkpoint write")
    if par.is_main:
        with _writing(tmp, final):
            # Last: every rank's files are in place; written after them, it vouches for them all.
            write_manifest(tmp)
        if final.is_symlink() or (final.exists() and not final.is_dir()):   # not ours to delete: set aside
            set_aside_strays(run_dir)
        if final.exists():                   # the same iteration saved again (a resumed run)
            _delete(final)
        tmp.rename(final)
        for old in [] if name else list_checkpoints(run_dir)[:-keep]:
            _delete(old)
        for left in root.glob(".trash_*"):   # what an earlier kill left mid-delete
            shutil.rmtree(left, ignore_errors=True)
    par.barrier("checkpoint rename")
    return final


def checkpoint_path(run_dir: Path, next_iteration: int) -> Path:
    """Where the numbered checkpoint after ``next_iteration`` updates lives."""
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{next_iteration:06d}"


def keep_checkpoint_as(ckpt: Path, name: str) -> Path:
    """A finished checkpoint also as ``checkpoints/NAME`` beside it (``best``), replacing one there:
    hard links where the file system has them (checkpoints are never written in place once renamed,
    and a pruned original leaves the links whole), else copies. Rank 0 only: plain file operations."""
    final, tmp = ckpt.with_name(name), ckpt.with_name(f".tmp_{name}")
    if tmp.exists():
        shutil.rmtree(tmp)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with _writing(tmp, final):
        shutil.copytree(ckpt, tmp, copy_function=link)
    if final.exists():
        _delete(final)
    tmp.rename(final)
    return final


def _delete(ckpt: Path) -> None:
    """Rename out of the listing first (atomic), then delete: a kill inside the delete leaves a
    hidden folder, never a half-deleted checkpoint that still lists."""
    trash = ckpt.with_name(f".trash_{ckpt.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    ckpt.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


class _writing:
    """Turn a failed write into ``tmp`` (disk full, read-only, ...; torch and safetensors wrap
    them in their own errors) into one :class:`CheckpointError` naming the checkpoint; the
    partial folder is removed, the previous checkpoints are untouched."""

    def __init__(self, tmp: Path, final: Path) -> None:
        self.tmp, self.final = tmp, final

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type | None, e: BaseException | None, tb: object) -> bool:
        if e is None or not isinstance(e, Exception) or isinstance(e, CollectiveTimeout):
            return False
        try:
            free = shutil.disk_usage(self.tmp.parent).free
        except OSError:
            free = -1
        lines = str(e).splitlines()
        reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {lines[0] if lines else ''}"
        if getattr(e, "errno", None) == errno.ENOSPC or 0 <= free < (1 << 20):
            reason = f"no space left on the device ({free} bytes free)"
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {self.final}: {reason}; "
                              f"the previous checkpoints are kept") from None


WHOLE_HASH_BYTES = 1 << 30   # files up to this size are hashed whole
ENDS_BYTES = 16 << 20        # larger ones (a big model's shards): size, and the hash of both ends


def file_sha256(path: Path, ends: int = 0) -> str:
    """SHA-256 of the file, or of its first and last ``ends`` bytes (a bounded cost per save)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if ends:
            h.update(f.read(ends))
            f.seek(max(0, path.stat().st_size - ends))
            h.update(f.read(ends))
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _fingerprint(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size <= WHOLE_HASH_BYTES:
        return {"bytes": size, "sha256": file_sha256(path)}
    return {"bytes": size, "sha256_ends": file_sha256(path, ENDS_BYTES), "ends_bytes": ENDS_BYTES}


def write_manifest(folder: Path) -> None:
    """``folder/manifest.json``: the size and hash of every file in ``folder`` (and below)."""
    files = {str(f.relative_to(folder)): _fingerprint(f) for f in sorted(folder.rglob("*"))
             if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is damaged (one line), or None if its manifest vouches for
    every file. A checkpoint from before manifests were written also gives None: only loading it
    can tell (``resume_checkpoint`` does)."""
    m = path / MANIFEST
    if not m.is_file():
        return None
    try:
        files = json.loads(m.read_text())["files"]
        entries = [(str(name), want, int(want["bytes"])) for name, want in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, want, size_want in entries:
        f = path / name
        try:       # a file the manifest names but that cannot be read is named itself, not the manifest
            if not f.is_file():
                return f"{name} is missing"
            size = f.stat().st_size
            if size != size_want:
                return f"{name} has {size} bytes, the manifest says {size_want}"
            if "sha256" in want and file_sha256(f) != want["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
            if "sha256_ends" in want and file_sha256(f, int(want["ends_bytes"])) != want["sha256_ends"]:
                return f"{name} does not match the SHA-256 of its ends in the manifest"
        except OSError as e:
            return f"{name} is unreadable ({e.strerror or type(e).__name__})"
        except (ValueError, KeyError, TypeError) as e:
            return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    return None


def has_manifest(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``corrupt_<name>`` beside it (never deleted; a second one of
    the same name gets a counter) and return where it went."""
    target = path.with_name(CORRUPT_PREFIX + path.name)
    k = 1
    while target.exists():
        k += 1
        target = path.with_name(f"{CORRUPT_PREFIX}{path.name}.{k}")
    path.rename(target)
    return target


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (folders only: a symlink or a file of that name is a
    stray, see :func:`strays`)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and not p.is_symlink()
                  and (p / "meta.json").is_file())


def strays(run_dir: Path) -> list[Path]:
    """Entries named like checkpoints that are not folders of their own: symlinks (dangling or
    not) and files. A save would fail on one (a rename onto it) or load what it points at."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p.is_symlink() or not p.is_dir()))


def set_aside_strays(run_dir: Path) -> None:
    """Move each stray (:func:`strays`) to ``corrupt_<name>`` (the link itself, never its target),
    naming it on one warning line."""
    for p in strays(run_dir):
        what = f"a symlink to {os.readlink(p)}" if p.is_symlink() else "not a folder"
        aside = move_aside(p)
        print(f"flowdppo-video: warning: checkpoints/{p.name} is {what}, not a checkpoint; moved it to {aside}",
              file=sys.stderr)


def _expects_manifest(found: list[Path]) -> bool:
    """Whether this run writes manifests: then a checkpoint without one is damaged (a manifest
    deleted, or a folder put there by hand), not one from before manifests."""
    return any(has_manifest(c) for c in found)


def check_checkpoint(path: Path, expect_manifest: bool) -> str | None:
    """:func:`verify_checkpoint`, and a missing manifest where the run's checkpoints have them."""
    if expect_manifest and not has_manifest(path):
        return f"{MANIFEST} is missing (the run's other checkpoints have one)"
    return verify_checkpoint(path)


def latest_checkpoint(run_dir: Path, verified: bool = True) -> Path | None:
    """The newest checkpoint (``verified``: the newest whose manifest verifies; each newer one is
    named on a warning line with why, and left where it is, as are strays)."""
    for p in strays(run_dir) if verified else []:
        print(f"flowdppo-video: warning: skipping checkpoints/{p.name}: a symlink or a file, not a checkpoint folder",
              file=sys.stderr)
    found = list_checkpoints(run_dir)
    expect = verified and _expects_manifest(found)
    for ckpt in reversed(found):
        reason = check_checkpoint(ckpt, expect) if verified else None
        if reason is None:
            return ckpt
        print(f"flowdppo-video: warning: skipping checkpoint {ckpt} ({reason})", file=sys.stderr)
    return None


class _reading:
    """A checkpoint file that fails to load (truncated, garbled, of another shape) is one
    :class:`CheckpointError` naming it, not its reader's traceback."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp: type | None, e: BaseException | None, tb: object) -> bool:
        if e is None or not isinstance(e, Exception) or isinstance(e, (CollectiveTimeout, CheckpointError)):
            return False
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
        raise CheckpointError(f"could not load checkpoint {self.path}: {reason}", reason) from e


def load_checkpoint(path: Path, adapter: VideoFlowAdapter, updater: Updater | None) -> dict[str, Any]:
    """Load weights (and the optimizer and RNG states when ``updater`` is given); return the meta.
    A file that does not load is a :class:`CheckpointError` naming it."""
    with _reading(path / "meta.json"):
        meta = json.loads((path / "meta.json").read_text())   # first: a torn meta changes nothing
    if updater is None or not updater.restores_weights:
        with _reading(path / "model"):
            adapter.load_trainable(path / "model")
    if updater is not None:
        with _reading(path):                              # the updater's own files
            updater.load(path)
        with _reading(path / "state.pt"):
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
            set_rng_state(state["rng"])
    return meta


def resume_checkpoint(run_dir: Path, adapter: VideoFlowAdapter, updater: Updater, par: ParallelState,
                      zero_stage: int, iterations: int) -> tuple[Path | None, dict[str, Any]]:
    """The newest checkpoint of ``run_dir`` whose manifest verifies (one written before manifests:
    that loads), loaded into the model, updater and RNGs, and its meta; ``(None, {})`` if the run
    has none. A newer damaged one is moved aside with one warning line; a checkpoint that this run
    cannot continue (another ZeRO layout, more iterations done than ``iterations``) is a
    one-line :class:`TrainingError`, nothing changed. Rank 0 verifies and decides."""
    if par.is_main:
        set_aside_strays(run_dir)
    found = par.broadcast_object(list_checkpoints(run_dir), "finding the checkpoints")
    expect = _expects_manifest(found) if par.is_main else False
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(found):
        reason = par.broadcast_object(check_checkpoint(ckpt, expect) if par.is_main else None,
                                      "verifying a checkpoint")
        meta: dict[str, Any] = {}
        if reason is None:
            try:
                meta = json.loads((ckpt / "meta.json").read_text())
                int(meta["next_iteration"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                reason = f"meta.json is unreadable ({type(e).__name__})"
        if reason is None:
            _check_resumable(run_dir, ckpt, meta, par, zero_stage, iterations)
            try:
                meta = load_checkpoint(ckpt, adapter, updater)
                error = None
            except Exception as e:   # noqa: BLE001 - any damage a file can do to its reader
                if has_manifest(ckpt):
                    raise             # verified files that do not load: not damage, a real error
                # CheckpointError names the file's own error; anything else, its first line
                error = getattr(e, "reason", None) or f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            if par.all_true(error is None, "loading a checkpoint"):
                break
            reason = error or "it failed to load on another rank"
        skipped.append((ckpt, reason))
    else:
        if skipped:      # none loads: keep every one where it is, and say why
            raise TrainingError(f"--resume {run_dir}: no checkpoint verifies or loads (newest "
                                f"{skipped[0][0].name}: {skipped[0][1]}); nothing was moved or changed")
        return None, {}
    if par.is_main:
        for bad, reason in skipped:
            aside = move_aside(bad)
            print(f"flowdppo-video: warning: skipped checkpoint {bad.name} ({reason}); moved it to "
                  f"{aside}; resuming from {ckpt.name}", file=sys.stderr)
    par.barrier("moving damaged checkpoints aside")
    return ckpt, meta


def _check_resumable(run_dir: Path, ckpt: Path, meta: dict[str, Any], par: ParallelState, zero_stage: int,
                     iterations: int) -> None:
    """What no other checkpoint would change: one line and exit 2, nothing rewritten."""
    was, now = meta.get("zero_stage", 0), zero_stage
    if was != now or (now and meta.get("world") != par.world):
        raise TrainingError(f"--resume {run_dir}: its checkpoint was written with parallel.zero_stage={was} "
                            f"on {meta.get('world', 1)} rank(s); this run has zero_stage={now} on "
                            f"{par.world} (a ZeRO checkpoint resumes with the same stage and ranks)")
    done = int(meta["next_iteration"])
    if iterations < done:
        raise TrainingError(f"--resume {run_dir}: run.iterations={iterations} is below the {done} iterations "
                            f"already done ({ckpt.name}); give run.iterations >= {done} (nothing was changed)")
