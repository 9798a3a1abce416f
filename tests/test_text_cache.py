"""Prompts encoded once per run (models/text_cache.py): the text encoder is released, the cached rows
give bit-identical rollouts and replays, the file in the run directory is reused on resume and
re-encoded for a changed prompt or model, and the planner counts the encoder as gone."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from flowdppo_video import sde
from flowdppo_video.runs.config import load_config
from flowdppo_video.runs.images import load_run_images
from flowdppo_video.models import build_adapter
from flowdppo_video.models.base import ModelError
from flowdppo_video.models.text_cache import CACHE_FILE, TextCache, cache_prompts
from flowdppo_video.commands.planner import plan_memory
from flowdppo_video.training.rollout import rollout, step_mean
from flowdppo_video.trainer import Trainer

from .conftest import ROOT, tiny_config

PROMPTS = ["a red ball rolls to the left", "a blue square slides up"]


def _rollout(trainer: Trainer, cfg) -> tuple:
    traj = rollout(trainer.adapter, PROMPTS, 2, trainer.latent_shape, cfg.sampler, torch.Generator().manual_seed(3),
                   "blurry", progress=False)
    with torch.no_grad():
        logps = [sde.token_log_prob(traj.next_latents[:, j], step_mean(trainer.adapter, traj, j), traj.stds[:, j],
                                    trainer.adapter.patch_size) for j in range(traj.num_sde_steps)]
    return traj, torch.stack(logps)


def test_cached_prompts_give_identical_videos_and_log_probs(tmp_path):
    over = ("sampler.guidance_scale=3.0", "data.negative_prompt=blurry", f"data.prompts={PROMPTS}")
    cfg = tiny_config(tmp_path / "a", *over)
    cached = Trainer(cfg)
    assert cached.adapter.text_encoder is None and not cached.adapter.text_encoders_resident()
    assert cached.text_stats["text/encoder_released_bytes"] > 0
    assert (cached.run_dir / CACHE_FILE).is_file()
    # Today's path: the encoder kept and no cache, every prompt encoded inside the rollout.
    cfg_b = tiny_config(tmp_path / "b", *over, "model.keep_text_encoder=true")
    plain = Trainer(cfg_b)
    assert plain.adapter.text_encoders_resident()
    plain.adapter.text_cache = None
    plain.adapter.forget_prompt_rows()
    (ta, la), (tb, lb) = _rollout(cached, cfg), _rollout(plain, cfg_b)
    assert torch.equal(ta.videos, tb.videos) and torch.equal(ta.final, tb.final)
    assert torch.equal(ta.means, tb.means) and torch.equal(la, lb)
    # Invariant 1 on the cached path: replay gives mu_old exactly as stored.
    _, _, log_ratio = cached.replay_step(ta, 0, torch.ones(ta.batch_size))
    assert float(log_ratio.abs().max()) < 1e-5
    # A prompt the run never saw: refused in one line naming the key.
    with pytest.raises(ModelError, match="model.keep_text_encoder"):
        cached.adapter.prompt_text(["an unseen prompt"])
    # Kept, the encoder serves an unseen prompt.
    assert plain.adapter.prompt_text(["an unseen prompt"]).shape[0] == 1
    # Resumed, the run reads its rows back and encodes nothing (the first trainer lets go of the run
    # first: one process writes a run at a time).
    cached.close()
    resumed = Trainer(cfg, resume=True)
    assert resumed.text_stats["text/encoded_prompts"] == 0 and resumed.text_stats["text/cached_prompts"] == 4
    ta2, la2 = _rollout(resumed, cfg)
    assert torch.equal(ta2.videos, ta.videos) and torch.equal(la2, la)


def test_cache_file_reused_and_keyed_by_prompt_and_model(tmp_path):
    cfg = tiny_config(tmp_path, f"data.prompts={PROMPTS}", "model.keep_text_encoder=true", "sampler.guidance_scale=1.0")
    trainer = Trainer(cfg)
    path = trainer.run_dir / CACHE_FILE
    adapter, key = trainer.adapter, trainer.adapter.text_cache.key
    first = trainer.adapter.text_cache.entries[(None, PROMPTS[0])]
    stats = cache_prompts(adapter, PROMPTS, None, key, path, keep_encoder=True, progress=False)
    assert stats["text/cached_prompts"] == 2 and stats["text/encoded_prompts"] == 0     # resume: read back
    assert torch.equal(adapter.text_cache.entries[(None, PROMPTS[0])], first)
    stats = cache_prompts(adapter, PROMPTS + ["a new prompt"], None, key, path, keep_encoder=True, progress=False)
    assert stats["text/encoded_prompts"] == 1                                            # only the changed one
    assert TextCache("another model").load(path) == 0                                    # another model: none
    stats = cache_prompts(adapter, PROMPTS, None, "another model", path, keep_encoder=False, progress=False)
    assert stats["text/encoded_prompts"] == 2 and not adapter.text_encoders_resident()


def test_planner_counts_the_released_encoder(tmp_path):
    plan = plan_memory(tiny_config(tmp_path), 1)
    released = plan.row("frozen: text_encoder")
    kept = plan_memory(tiny_config(tmp_path, "model.keep_text_encoder=true"), 1).row("frozen: text_encoder")
    assert released.device == 0 and "released" in released.note and kept.device > 0
    # The start (encoder and VAE; the transformer on the host) still counts toward the peak.
    assert plan.row("total").device >= kept.device + plan.row("frozen: vae").device


def test_transformers_wait_on_the_host_while_encoding(tmp_path):
    adapter = build_adapter(tiny_config(tmp_path).model, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters()}
    encode, seen = adapter.encode_prompts, []

    def spy(prompts):
        seen.append([c.args for c in moved.call_args_list])
        return encode(prompts)

    with mock.patch.object(adapter.transformer, "to", wraps=adapter.transformer.to) as moved, \
            mock.patch.object(adapter, "encode_prompts", side_effect=spy):
        cache_prompts(adapter, PROMPTS, None, "k", None, progress=False, offload_transformers=True)
    assert seen[0] == [("cpu",)] and moved.call_args_list[-1].args == (adapter.device,)   # out, then back
    assert all(torch.equal(p, before[n]) for n, p in adapter.transformer.named_parameters())


def test_the_encoder_is_released_before_the_transformers_come_back(tmp_path):
    """Issue 28, item 10: the transformers came back to the GPU (a ``finally``) while the encoder was
    still there; the encoder is now released first, so the two never share the device."""
    adapter = build_adapter(tiny_config(tmp_path).model, torch.device("cpu"))
    release, seen = adapter.release_text_encoders, []

    def spy():
        seen.append([c.args for c in moved.call_args_list])
        return release()

    with mock.patch.object(adapter.transformer, "to", wraps=adapter.transformer.to) as moved, \
            mock.patch.object(adapter, "release_text_encoders", side_effect=spy):
        stats = cache_prompts(adapter, PROMPTS, None, "k", None, progress=False, offload_transformers=True)
    assert seen == [[("cpu",)]]                                   # released while the transformer was away
    assert moved.call_args_list[-1].args == (adapter.device,) and stats["text/encoder_released_bytes"] > 0
    assert not adapter.text_encoders_resident()


@pytest.mark.parametrize("config", ["hunyuan_tiny.yaml", "hunyuan15_tiny.yaml", "wan_i2v_tiny.yaml",
                                    "hunyuan_i2v_tiny.yaml", "hunyuan15_i2v_tiny.yaml"])
def test_cached_rows_equal_the_encoders_for_every_conditioning(tmp_path, images, config):
    """TextBatch conditionings and image-to-video ones (image latents, CLIP and SigLIP states, Llava states
    of the image; the negative keeps each row's image): the cached rows are the encoder's tensors, bit for bit."""
    over = [f"data.prompts={PROMPTS}", f"data.images={images}"] if "i2v" in config else []
    cfg = load_config(ROOT / "configs" / config, [f"run.output_dir={tmp_path / 'run'}", *over])
    plain, adapter = (build_adapter(cfg.model, torch.device("cpu")) for _ in range(2))   # no shared caches
    if adapter.takes_images:
        load_run_images(plain, cfg), load_run_images(adapter, cfg)
    rows = PROMPTS[::-1] + PROMPTS                       # repeated and reordered, as a rollout's batch
    want, want_u = plain.encode_prompts(rows), plain.encode_negative("blurry", rows)
    cache_prompts(adapter, PROMPTS, "blurry", "k", None, progress=False)
    assert not adapter.text_encoders_resident()
    for a, b in ((adapter.prompt_text(rows), want), (adapter.negative_text("blurry", rows), want_u)):
        assert a.parts.keys() == b.parts.keys() and all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts)
