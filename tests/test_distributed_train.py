"""Whole training runs on 2 processes (gloo, CPU) through the real launchers: the layout (data or
sequence parallel, the deepspeed launcher) must not change the result, and a rank that hangs
must end the job with a clear error within ``parallel.timeout_s``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file


from .conftest import ROOT, TINY_CONFIG, run_two_ranks

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# One video per transformer call and CFG as two calls: every layout then runs the same shapes in
# the rollout, so trajectories agree bit for bit and the comparison sees only the update.
COMMON = ["optim.minibatch_size=2", "run.report_every=0", "run.tensorboard=false", "sampler.batch_size=1",
          "sampler.cfg_batch=split", "run.iterations=2"]


def _torchrun(*args: str, module: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_two_ranks(*(["-m", "flowdppo_video.commands.train"] if module else []), *args, timeout=timeout)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _weights(run: Path) -> dict:
    (f,) = (run / "checkpoints" / "iter_000002" / "model").glob("*.safetensors")
    return load_file(f)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run([sys.executable, "-m", "flowdppo_video", "train", "--config", str(TINY_CONFIG),
                           f"run.output_dir={run}", *COMMON], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
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
    proc = _torchrun("--config", str(TINY_CONFIG), f"run.output_dir={run}", *COMMON, *layout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(single, run)
    meta = json.loads((run / "checkpoints" / "iter_000002" / "meta.json").read_text())
    assert meta["world"] == 2 and meta["sequence_parallel"] == (2 if layout else 1)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    """``deepspeed --num_gpus 2 --module flowdppo_video.commands.train`` on the CPU (gloo), ZeRO-3, LoRA."""
    if shutil.which("deepspeed", path=str(BIN)) is None:
        pytest.skip("the deepspeed launcher is not installed")
    run = tmp_path_factory.mktemp("zero3") / "run"
    proc = run_two_ranks("--module", "flowdppo_video.commands.train", "--config", str(TINY_CONFIG), f"run.output_dir={run}",
                         *COMMON, "parallel.zero_stage=3", "parallel.zero_persistence_threshold=0", timeout=600,
                         launcher=[str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "{port}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return run


def test_deepspeed_launcher_zero3_trains_as_one_process(single, zero3_run):
    _assert_same_run(single, zero3_run)
    assert (zero3_run / "checkpoints" / "iter_000002" / "zero").is_dir()      # the engine's own state


def test_export_of_a_zero3_checkpoint_is_a_diffusers_pipeline(zero3_run, tmp_path):
    """``flowdppo-video export``: the gathered LoRA merged into a WanPipeline directory that diffusers
    loads, whose transformer computes what the trained adapter does; ``--lora`` the adapter alone."""
    import torch
    from diffusers import WanPipeline

    from flowdppo_video.training.checkpoint import latest_checkpoint, load_checkpoint
    from flowdppo_video.runs.config import load_config
    from flowdppo_video.models import build_adapter

    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "flowdppo_video", "export", "--run", str(zero3_run), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = WanPipeline.from_pretrained(out)
    cfg = load_config(zero3_run / "config.yaml")
    trained = build_adapter(cfg.model, torch.device("cpu"))
    load_checkpoint(latest_checkpoint(zero3_run), trained, None)
    x, t = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([700.0, 300.0])
    text = trained.encode_prompts(["a red ball", "a blue cube"])
    with torch.no_grad():
        ours = trained.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        theirs = pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        with trained.reference():
            base = trained.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert float((ours - theirs).abs().max()) < 1e-5
    assert float((ours - base).abs().max()) > 1e-6                  # the export carries the training
    lora = tmp_path / "lora"
    proc = subprocess.run([sys.executable, "-m", "flowdppo_video", "export", "--run", str(zero3_run), "--out", str(lora),
                           "--lora"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (lora / "pytorch_lora_weights.safetensors").is_file() and (lora / "adapter_config.json").is_file()
    again = subprocess.run([sys.executable, "-m", "flowdppo_video", "export", "--run", str(zero3_run), "--out", str(lora)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_accelerate_launch_takes_its_deepspeed_stage(single, tmp_path):
    """``accelerate launch`` with a DeepSpeed config (ZeRO-2, 2 CPU processes): the run adopts the
    stage from accelerate and trains as one process."""
    if shutil.which("accelerate", path=str(BIN)) is None:
        pytest.skip("accelerate's launcher is not installed")
    acc = tmp_path / "accelerate.yaml"
    acc.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                   "deepspeed_config: {zero_stage: 2, offload_optimizer_device: none, offload_param_device: none, "
                   "zero3_init_flag: false}\nmachine_rank: 0\nnum_machines: 1\nnum_processes: 2\nuse_cpu: true\n"
                   "mixed_precision: 'no'\n")
    run = tmp_path / "run"
    proc = run_two_ranks("-m", "flowdppo_video.commands.train", "--config", str(TINY_CONFIG), f"run.output_dir={run}", *COMMON,
                         timeout=600, launcher=[str(BIN / "accelerate"), "launch", "--config_file", str(acc),
                                                 "--main_process_port", "{port}"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    _assert_same_run(single, run)
    meta = json.loads((run / "checkpoints" / "iter_000002" / "meta.json").read_text())
    assert meta["zero_stage"] == 2 and meta["world"] == 2


def test_a_hanging_rank_ends_the_job_with_a_clear_error(tmp_path):
    """Rank 1 hangs in its reward: rank 0 stops within parallel.timeout_s and names the cause."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    proc = _torchrun(str(ROOT / "tests" / "dist" / "train_hang.py"), "--config", str(TINY_CONFIG),
                     f"run.output_dir={run}", *COMMON, "rewards={hang_on_rank_1: 1.0}", "parallel.timeout_s=5",
                     module=False, timeout=240)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    assert ("flowdppo-video: error: rank 0/2: gathering rollouts and rewards did not complete within "
            "parallel.timeout_s=5 s") in proc.stderr
    assert took < 120, took                      # not the 600 s the hanging rank sleeps
