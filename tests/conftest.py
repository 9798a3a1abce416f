"""Shared fixtures: a tiny real Wan model and tiny run configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "wan_tiny.yaml"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(tmp_path: Path, *overrides: str):
    """The tiny Wan test recipe with its run directory under ``tmp_path``."""
    from flowdppo_video.config import load_config

    return load_config(TINY_CONFIG, [f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", "run.report_every=0",
                                     f"data.prompts={ROOT / 'configs/prompts/demo.txt'}", *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    return tiny_config(tmp_path)
