"""A run directory: what makes a folder a run's, who may write it, and the checks every command
makes before it reads or writes one.

* **Found**: :func:`require_run_dir` is the one "is this a run directory" check (its
  ``config.yaml``); train ``--resume``, sample, export, eval and report all use it.
* **Owned**: a run marks its folder (:data:`MARKER`) before it writes anything else. A new run
  refuses an empty or ``.`` ``run.output_dir`` (an unset shell variable must not write into the
  current directory), a folder that already holds a run, and a folder holding files no run wrote
  (a user's own ``config.yaml`` would be replaced) unless ``run.allow_foreign_files`` says so
  (:func:`check_new_run`). ``--resume A`` continues in ``A`` only (:func:`check_resume_dir`).
* **Locked**: one process writes a run at a time (:class:`RunLock`): an exclusive ``flock`` on
  :data:`LOCK` held for the whole run. The kernel drops it when the process exits, however it
  ends, so a crash leaves no lock that blocks; the file left behind names a dead process and the
  next run takes it over with a one-line note. A second training or resume stops at once with one
  line naming the holder's pid and host.

A later "run builder" is meant to wrap this module; keep it small, typed and free of the trainer.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from flowdppo_video.exceptions import TrainingError

from .config import ConfigError

MARKER = ".flowdppo_run"          # written first into a folder a run owns
LOCK = ".flowdppo.lock"           # flock'ed by the process writing the run; names it
RUN_FILES = ("metrics.jsonl", "eval.jsonl", "checkpoints")   # a run got past its start
CONFIG = "config.yaml"


class RunDirError(TrainingError):
    """A run directory that must not be written (or read) as asked; one line naming it."""


def require_run_dir(path: str | Path, flag: str = "--run") -> Path:
    """``path/config.yaml`` of an existing run directory, or a one-line :class:`ConfigError`
    (``flag``: how the command names the folder, ``""`` for a positional argument)."""
    p = Path(path)
    cfg = p / CONFIG
    if not cfg.is_file():
        where = f"{flag} {p}" if flag else str(p)
        raise ConfigError(f"{where}: no config.yaml there (not a run directory)")
    return cfg


def check_output_name(value: str, key: str = "run.output_dir") -> None:
    """Refuse an empty output folder (an unset shell variable) or the current directory: both
    would scatter a run among the user's own files."""
    if not str(value).strip():
        raise ConfigError(f"{key} is empty (an unset shell variable?): give the run a folder of its own, "
                          "e.g. runs/NAME")
    if Path(value).resolve() == Path.cwd().resolve():
        raise ConfigError(f"{key}={value} is the current directory: give the run a folder of its own, "
                          "e.g. runs/NAME")


def _shown(names: list[str], most: int = 4) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def check_new_run(path: Path, allow_foreign: bool = False, key: str = "run.output_dir") -> None:
    """Refuse to start a new run in ``path`` when it holds a run, or files no run wrote (unless
    ``allow_foreign``). A folder a run marked but that holds no progress (the run stopped before
    its first iteration) is reused. Creates nothing."""
    check_output_name(str(path), key)
    if not path.is_dir():
        return
    names = sorted(e.name for e in path.iterdir() if e.name != LOCK)
    if not names:
        return
    if any(n in RUN_FILES for n in names):
        raise RunDirError(f"{path} already holds a run; use --resume {path} or another {key}")
    if MARKER in names or allow_foreign:
        return
    raise RunDirError(f"{key} {path} holds files no run wrote ({_shown(names)}): give a new or empty folder, "
                      "or run.allow_foreign_files=true to write the run among them (a config.yaml there is "
                      "replaced)")


def check_resume_dir(resume: Path, output_dir: str) -> None:
    """``--resume A`` continues the run in ``A``: another ``run.output_dir`` would mix two runs."""
    if Path(output_dir).resolve() != resume.resolve():
        raise ConfigError(f"--resume {resume} with run.output_dir={output_dir}: a run resumes in its own folder "
                          f"(to continue it elsewhere, copy it first: cp -r {resume} {output_dir}, then "
                          f"--resume {output_dir})")


def mark_owned(path: Path) -> None:
    """Write the marker that says a run made ``path`` (kept for the folder's life)."""
    m = path / MARKER
    if not m.exists():
        try:
            m.write_text(json.dumps({"made_by": "flowdppo-video", "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
                         + "\n")
        except OSError:
            m.unlink(missing_ok=True)        # a full disk: no half marker left behind
            raise


def _holder(text: str) -> dict[str, object]:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def _describe(info: dict[str, object]) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {info.get('started', '?')})"


def _alive_here(info: dict[str, object]) -> bool:
    """Whether the holder named in a lock file is a live process of this host (a check beside
    flock, for file systems whose flock is local to one client)."""
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def held_by(path: Path) -> str | None:
    """Who holds the lock of run directory ``path`` (words naming pid and host), or None. Takes
    nothing and creates nothing: a cheap look before a run builds its model."""
    f = path / LOCK
    try:
        fd = os.open(f, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(_holder(os.read(fd, 4096).decode(errors="replace")))
        fcntl.flock(fd, fcntl.LOCK_UN)
        info = _holder(os.read(fd, 4096).decode(errors="replace"))
        return _describe(info) if _alive_here(info) else None
    finally:
        os.close(fd)


def check_unlocked(path: Path) -> None:
    """Refuse, before a model is built, a run directory another process holds (one line naming it)."""
    who = held_by(path)
    if who is not None:
        raise _in_use(path, who)


def _in_use(path: Path, who: str) -> RunDirError:
    return RunDirError(f"{path} is in use by {who}: one process writes a run at a time (wait for it to "
                       "finish, or stop it)")


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` (or the process's end)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, path: Path) -> "RunLock":
        """Create ``path`` if needed and lock it, or raise a one-line :class:`RunDirError` naming
        the holder. A lock file left by a process that is gone is taken over, with a note."""
        path.mkdir(parents=True, exist_ok=True)
        f = path / LOCK
        while True:
            fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _holder(os.read(fd, 4096).decode(errors="replace"))
                os.close(fd)
                raise _in_use(path, _describe(info)) from None
            try:                             # the holder may have released (unlinked) it since we opened
                same = os.fstat(fd).st_ino == os.stat(f).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = _holder(os.read(fd, 4096).decode(errors="replace"))
        if _alive_here(info):
            os.close(fd)
            raise _in_use(path, _describe(info))
        if info:
            print(f"flowdppo-video: note: {path} was locked by {_describe(info)}, which is gone; taking the lock "
                  "over", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        lock = cls(path, fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        except OSError:                      # a full disk: unlock rather than hold a lock naming nobody
            lock.release()
            raise
        return lock

    def release(self) -> None:
        """Unlock; the file goes first, so nobody reads a released lock's holder (idempotent)."""
        if self._fd < 0:
            return
        try:
            (self.path / LOCK).unlink()
        except OSError as e:                 # a read-only or vanished folder: the kernel lock still goes
            if e.errno not in (errno.ENOENT, errno.EROFS, errno.EACCES, errno.EPERM):
                raise
        os.close(self._fd)
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0
