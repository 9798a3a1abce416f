"""Shared fixtures and helpers: a tiny real Wan model, tiny run configs, the CLI, run outputs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# Before torch: OpenMP threads that spin while they wait made contended runs ~10x slower on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from flowdppo_video.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "wan_tiny.yaml"
PROMPTS = ["a red ball rolls to the left", "a blue square slides up"]   # the tiny families' two prompts

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test`: one worker per core) each worker computes on one thread, so the
# workers together use the cores without oversubscribing them; a plain `pytest` run uses two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


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
    arguments; a hang fails the test after ``timeout`` seconds instead of blocking the suite.

    ``launcher`` replaces torchrun; ``{port}`` in its arguments becomes the rendezvous port. A start
    that loses its port to another process (address already in use) is tried once more on a new one:
    that is the machine's, not the code under test's."""
    from flowdppo_video.parallel.groups import free_port

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), **(env or {})}
    template = launcher or [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            "--master_port={port}"]
    for attempt in range(2):
        port = str(free_port())
        try:
            proc = subprocess.run([*(a.replace("{port}", port) for a in template), *args], cwd=ROOT, env=full_env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"the 2-process run {' '.join(args[:3])} ... did not finish in {e.timeout} s")
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stdout + proc.stderr:
            break
    return proc


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


# ------------------------------------------------------------- helpers several test modules share

def cli(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m flowdppo_video ARGS`` from the repository root; raises with the stderr tail on a
    non-zero exit unless ``check=False``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "flowdppo_video", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def train(run_dir: Path, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    """Train the tiny Wan recipe into ``run_dir`` through the CLI (or resume it)."""
    if resume:
        return cli("train", "--resume", str(run_dir), *overrides)
    return cli("train", "--config", str(TINY_CONFIG), f"run.output_dir={run_dir}", *overrides)


def rows(run_dir: Path, name: str = "metrics") -> list[dict]:
    """The rows of ``run_dir/NAME.jsonl``."""
    return [json.loads(x) for x in (run_dir / f"{name}.jsonl").read_text().splitlines() if x.strip()]


def max_abs_log_ratio(trainer: Trainer, traj, groups: list[list[int]]) -> float:
    """The largest |log ratio| of new and old policy over ``traj``'s SDE steps, replayed group by group
    (SPEC invariant 1: 0 before the first update)."""
    worst, adv = 0.0, torch.ones(traj.batch_size)
    with torch.no_grad():
        for g in groups:
            idx = torch.tensor(g)
            for j in range(traj.num_sde_steps):
                _, _, log_ratio = trainer.replay_step(traj.select(idx), j, adv[idx])
                worst = max(worst, float(log_ratio.abs().max()))
    return worst


def write_lossless(path: Path, frames: np.ndarray, fps: float) -> Path:
    """``(F, H, W, 3)`` uint8 frames as an FFV1 .mkv at ``fps``: decodes to the very same pixels
    (H.264, as write_video writes, changes them, and differently at different rates)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode())
    return path


def score_rows(out: Path) -> tuple[list[dict], list[dict]]:
    """``scores.csv`` and ``scores.jsonl`` rows that ``score`` wrote into ``out``."""
    with open(out / "scores.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    jsonl_rows = [json.loads(ln) for ln in (out / "scores.jsonl").read_text().splitlines()]
    return csv_rows, jsonl_rows
