"""``model.attention_backend`` and ``model.compile`` (models/speed.py): refused in one line where they
cannot run, and invariant 1 (ratio 1 before the first update) with each on, on the CPU.

Tolerances: another attention backend runs the rollout and the replay through the same kernel, so
the log-ratio stays under the 1e-5 of tests/test_ratio_invariant.py; under ``torch.compile`` the
rollout's no-grad graph and the replay's training graph may fuse differently, and we allow 1e-4 (on
this CPU both were bit-identical: 0.0).
"""

from __future__ import annotations

import pytest
import torch

from flowdppo_video.models import build_adapter
from flowdppo_video.models.base import ModelError
from flowdppo_video.training.rollout import rollout
from flowdppo_video.trainer import Trainer

from .conftest import tiny_config

PROMPTS = ["a red ball rolls to the left", "a blue square slides up"]
COMPILE_TOLERANCE = 1e-4


def _worst_log_ratio(tmp_path, *overrides: str, groups: tuple = ([0, 1, 2, 3], [2, 0])) -> tuple[Trainer, float]:
    cfg = tiny_config(tmp_path, f"data.prompts={PROMPTS}", "model.lora.rank=4", "sampler.guidance_scale=3.0",
                      "data.negative_prompt=blurry", *overrides)
    trainer = Trainer(cfg)
    traj = rollout(trainer.adapter, PROMPTS, 2, trainer.latent_shape, cfg.sampler, torch.Generator().manual_seed(5),
                   "blurry", progress=False, decode=False)
    worst, adv = 0.0, torch.ones(traj.batch_size)
    for rows in groups:                                  # the rollout's batch, and another composition
        idx = torch.tensor(rows)
        for j in range(traj.num_sde_steps):
            _, _, log_ratio = trainer.replay_step(traj.select(idx), j, adv[idx])
            worst = max(worst, float(log_ratio.abs().max()))
    return trainer, worst


@pytest.mark.parametrize("name, match", [
    ("bogus", "model.attention_backend 'bogus' is not one of"),
    ("flash_hub", "model.attention_backend 'flash_hub' is not one of"),      # Hub downloads: refused
    ("cudnn", "model.attention_backend 'cudnn' needs a CUDA device"),
    ("flex", "model.attention_backend 'flex' needs a CUDA device"),          # no backward on the CPU
    ("xformers", "model.attention_backend 'xformers' needs (the xformers package|a CUDA device)")])
def test_unavailable_backends_are_refused_in_one_line(tiny_cfg, name, match):
    tiny_cfg.model.attention_backend = name
    with pytest.raises(ModelError, match=match) as e:
        build_adapter(tiny_cfg.model, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_invariant_one_with_another_attention_backend(tmp_path):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    trainer, worst = _worst_log_ratio(tmp_path, "model.attention_backend=_native_math")
    attn = trainer.adapter.transformer.blocks[0].attn1
    assert getattr(attn.processor, "_attention_backend").value == "_native_math"
    assert _AttentionBackendRegistry._active_backend == default      # the process default is left alone
    assert worst < 1e-5


def test_invariant_one_with_compiled_blocks(tmp_path, monkeypatch):
    """Regional compilation through dynamo and AOT autograd (the ``aot_eager`` backend: the same
    tracing as inductor without its C++ build, which takes minutes here; the slow test below runs it)."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: original(self, *a, **{**k, "backend": "aot_eager"}))
    torch._dynamo.reset()
    trainer, worst = _worst_log_ratio(tmp_path, "model.compile=true", groups=([0, 1, 2, 3],))  # one shape: one graph
    assert all(b._compiled_call_impl is not None for b in trainer.adapter.transformer.blocks)
    # Parameter names are unchanged: checkpoints of compiled and plain runs are interchangeable.
    assert not any("_orig_mod" in n for n, _ in trainer.adapter.transformer.named_parameters())
    assert worst < COMPILE_TOLERANCE


@pytest.mark.slow
def test_invariant_one_with_inductor_compiled_blocks(tmp_path):
    torch._dynamo.reset()
    _, worst = _worst_log_ratio(tmp_path, "model.compile=true")
    assert worst < COMPILE_TOLERANCE


@pytest.mark.parametrize("family", ["hunyuan_video", "hunyuan_video_1.5", "hunyuan_video_i2v"])
@pytest.mark.parametrize("name, instead", [("flash", "flash_varlen or native"), ("sage", "sage_varlen or native")])
def test_backends_without_masks_are_refused_for_masked_attention(tiny_cfg, family, name, instead):
    """Issue 28, item 4: HunyuanVideo's attention always has a mask, which diffusers' flash-attn 2 (and
    sage) path refuses at the first forward; refused before any weight loads, naming what works."""
    tiny_cfg.model.family, tiny_cfg.model.attention_backend = family, name
    with pytest.raises(ModelError) as e:
        build_adapter(tiny_cfg.model, torch.device("cpu"))
    assert str(e.value) == (f"model.attention_backend {name!r} takes no attention mask, and this model's "
                            f"attention always has one; use {instead}")


def test_wan_is_not_refused_flash_for_masks(tiny_cfg):
    tiny_cfg.model.attention_backend = "flash"              # Wan: no mask (one GPU): only the CPU refuses
    with pytest.raises(ModelError, match="needs (the flash_attn package|a CUDA device)"):
        build_adapter(tiny_cfg.model, torch.device("cpu"))
