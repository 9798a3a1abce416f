"""Whole training runs on 2 processes (gloo, CPU) through the real launchers: the layout (data or
sequence parallel, the deepspeed launcher) must not change the result, and a rank that hangs
must end the job with a clear error within ``parallel.timeout_s``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from .conftest import ROOT, TINY_CONFIG

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# One video per transformer call and CFG as two calls: every layout then runs the same shapes in
# the rollout, so trajectories agree bit for bit and the comparison sees only the update.
COMMON = ["optim.minibatch_size=2", "run.report_every=0", "run.tensorboard=false", "sampler.batch_size=1",
          "sampler.cfg_batch=split", "run.iterations=2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    return proc


def _torchrun(*args: str, module: bool = True) -> list[str]:
    launch = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={_port()}"]
    return launch + (["-m", "flowdppo_video.train"] if module else []) + list(args)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _weights(run: Path) -> dict:
    (f,) = (run / "checkpoints" / "iter_000002" / "model").glob("*.safetensors")
    return load_file(f)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    proc = _run([sys.executable, "-m", "flowdppo_video", "train", "--config", str(TINY_CONFIG),
                 f"run.output_dir={run}", *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _assert_same_run(a: Path, b: Path, weight_tol: float = 1e-5) -> None:
    ra, rb = _metrics(a), _metrics(b)
    assert [r["iteration"] for r in rb] == [0, 1]
    for x, y in zip(ra, rb):
        assert y["reward/mean"] == pytest.approx(x["reward/mean"], rel=1e-5)
        for k in ("loss", "kl/mean", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-3, abs=1e-9), k
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff <= weight_tol, diff


@pytest.mark.parametrize("layout", [["parallel.sequence_parallel=2"], []], ids=["sp2", "dp2"])
def test_two_ranks_train_as_one_process(single, tmp_path, layout):
    """SP=2 (both ranks hold every video, half the tokens each) and DP=2 (half the videos each):
    the same losses, KL and updated weights as one process."""
    run = tmp_path / "run"
    proc = _run(_torchrun("--config", str(TINY_CONFIG), f"run.output_dir={run}", *COMMON, *layout))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(single, run)
    meta = json.loads((run / "checkpoints" / "iter_000002" / "meta.json").read_text())
    assert meta["world"] == 2 and meta["sequence_parallel"] == (2 if layout else 1)


def test_deepspeed_launcher_runs_two_iterations(single, tmp_path):
    """``deepspeed --num_gpus 2 --module flowdppo_video.train`` on the CPU (gloo), ZeRO-3."""
    if shutil.which("deepspeed", path=str(BIN)) is None:
        pytest.skip("the deepspeed launcher is not installed")
    run = tmp_path / "run"
    proc = _run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()), "--module",
                 "flowdppo_video.train", "--config", str(TINY_CONFIG), f"run.output_dir={run}", *COMMON,
                 "parallel.zero_stage=3", "parallel.zero_persistence_threshold=0"], timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _assert_same_run(single, run)


def test_a_hanging_rank_ends_the_job_with_a_clear_error(tmp_path):
    """Rank 1 hangs in its reward: rank 0 stops within parallel.timeout_s and names the cause."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = _run(_torchrun(str(ROOT / "tests" / "dist" / "train_hang.py"), "--config", str(TINY_CONFIG),
                          f"run.output_dir={run}", *COMMON, "rewards={hang_on_rank_1: 1.0}",
                          "parallel.timeout_s=5", module=False), timeout=240)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    assert ("flowdppo-video: error: rank 0/2: gathering rollouts and rewards did not complete within "
            "parallel.timeout_s=5 s") in proc.stderr
    assert took < 120, took                      # not the 600 s the hanging rank sleeps
