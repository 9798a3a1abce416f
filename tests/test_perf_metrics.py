"""Throughput in the metrics (flowdppo_video/perf.py): perf/videos_per_s and seconds per video on
every device, perf/mfu on CUDA from FLOPs counted once and the card's peak."""

from __future__ import annotations

from unittest import mock

import torch

from flowdppo_video.perf import Throughput, forward_flops, peak_flops
from flowdppo_video.trainer import Trainer

from .conftest import tiny_config


def test_rows_carry_positive_throughput(tmp_path):
    """On the CPU, with the peak a CUDA card would have (1 TFLOP/s) so the trainer's MFU path runs too."""
    with mock.patch("flowdppo_video.perf.peak_flops", return_value=1e12):
        row = Trainer(tiny_config(tmp_path, "run.iterations=1", "run.progress=false")).run()[0]
    for key in ("perf/videos_per_s", "perf/rollout_s_per_video", "perf/update_s_per_video", "perf/mfu"):
        assert row[key] > 0, key
    assert row["perf/mfu"] < 1


def test_flops_counted_once_and_mfu_from_the_peak(tmp_path):
    cfg = tiny_config(tmp_path)
    trainer = Trainer(cfg)
    prompt = trainer.prompts[0]
    one = forward_flops(trainer.adapter, trainer.latent_shape, prompt)
    assert one > 0
    perf = Throughput(trainer.adapter, cfg, torch.device("cpu"), trainer.latent_shape)
    perf.peak = 1e6                                   # as a CUDA card of 1 MFLOP/s would give
    assert perf.wants_flops
    perf.count(prompt)
    assert not perf.wants_flops and perf.flops == one   # the trainer counts once per run
    a = perf.metrics(8, 8, 2, True, 1.0, 1.0, 4.0)
    s = cfg.sampler.num_steps + 2 * cfg.optim.inner_epochs * 3
    assert abs(a["perf/mfu"] - one * s * 2 * 8 / (4.0 * 1e6)) < 1e-9 * a["perf/mfu"]


def test_peak_table_by_device_name_and_override():
    cuda = torch.device("cuda", 0)
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H200"):
        assert peak_flops(cuda, torch.bfloat16) == 989.4e12          # not the H20's
        assert peak_flops(cuda, torch.bfloat16, 100.0) == 100e12     # run.peak_tflops
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H20"):
        assert peak_flops(cuda, torch.bfloat16) == 148e12
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA L40S"):
        assert peak_flops(cuda, torch.float16) == 362.1e12
    with mock.patch("torch.cuda.get_device_name", return_value="Some Other GPU"):
        assert peak_flops(cuda, torch.bfloat16) is None


def test_peak_memory_logged_on_cuda_only():
    adapter, cfg = mock.Mock(dtype=torch.bfloat16), mock.Mock(run=mock.Mock(peak_tflops=None))
    with mock.patch("torch.cuda.get_device_name", return_value="Some Other GPU"), \
            mock.patch("torch.cuda.max_memory_allocated", return_value=3 * 2 ** 30):
        row = Throughput(adapter, cfg, torch.device("cuda", 0), (4, 2, 4, 4)).metrics(4, 4, 2, True, 1.0, 1.0, 2.0)
    assert row["perf/peak_memory_gib"] == 3.0 and "perf/mfu" not in row
    row = Throughput(adapter, cfg, torch.device("cpu"), (4, 2, 4, 4)).metrics(4, 4, 2, True, 1.0, 1.0, 2.0)
    assert "perf/peak_memory_gib" not in row
