"""Shared fixtures: a tiny real Wan model and tiny run configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "wan_tiny.yaml"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(tmp_path: Path, *overrides: str):
    """The tiny Wan test recipe with its run directory under ``tmp_path``."""
    from flowdppo_video.runs.config import load_config

    return load_config(TINY_CONFIG, [f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", "run.report_every=0",
                                     f"data.prompts={ROOT / 'configs/prompts/demo.txt'}", *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    return tiny_config(tmp_path)


def run_two_ranks(*args: str, timeout: int = 300, env: dict[str, str] | None = None,
                  launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2`` (gloo, one thread each) on a script or ``-m module`` and its
    arguments; a hang fails the test after ``timeout`` seconds instead of blocking the suite."""
    from flowdppo_video.parallel.groups import free_port

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = launcher or [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                       f"--master_port={free_port()}"]
    try:
        return subprocess.run([*cmd, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the 2-process run {' '.join(args[:3])} ... did not finish in {e.timeout} s")


def write_image(path: Path, colour: tuple[int, int, int], box: tuple[int, int, int, int], size=(40, 48)) -> Path:
    im = Image.new("RGB", size, (20, 20, 20))
    ImageDraw.Draw(im).rectangle(box, fill=colour)
    im.save(path)
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder with one image per prompt of PROMPTS (0.png, 1.png), not at the video size."""
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "0.png", (230, 40, 40), (4, 4, 20, 20))
    write_image(folder / "1.png", (40, 60, 230), (18, 24, 36, 44))
    return folder


def record_transformer_calls(pipe) -> list:
    """Wrap a diffusers pipeline's transformer so every call's keyword inputs and output are kept:
    ``[(kwargs, output), ...]`` in call order (to compare our inputs with the pipeline's own)."""
    calls: list = []
    forward = pipe.transformer.forward

    def record(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append((kwargs, out[0]))
        return out

    pipe.transformer.forward = record
    return calls
