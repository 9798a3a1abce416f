"""Seeds and devices: independent random streams per (seed, iteration, purpose), and the device a
process trains on."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from .config import ConfigError


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers: independent streams for (seed, iteration, purpose)."""
    h = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def seed_global_rngs(seed: int) -> None:
    """Seed ``random``, numpy and torch's global generators from ``run.seed``."""
    s = derive_seed(seed, 2)                  # its own stream (0: rollouts, 1: minibatch order)
    random.seed(s)
    np.random.seed(s % (1 << 32))
    torch.manual_seed(s)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``run.device``; "auto" is this process's GPU (``LOCAL_RANK``) if there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"run.device={name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():   # torch would assert deep inside the first .to()
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"run.device={name} but {why}; use run.device=cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"run.device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev
