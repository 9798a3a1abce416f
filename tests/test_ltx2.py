"""LTX-2 (``model.family: ltx2``) on a tiny real model: video and audio denoised jointly, one flat
latent of two token streams. The token map (each stream's D), the rollout against diffusers'
``LTX2Pipeline.__call__`` at the same seed (latents and decoded video and sound), SPEC invariant 1
over both streams, the frozen audio stream, and a training iteration, its resume and ``sample``
(an mp4 with an audio stream) through the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from flowdppo_video import sde
from flowdppo_video.commands.cli import main as cli_main
from flowdppo_video.models import build_adapter
from flowdppo_video.models.base import ModelError, TextBatch
from flowdppo_video.runs.config import load_config
from flowdppo_video.trainer import Trainer
from flowdppo_video.training import evaluation
from flowdppo_video.training.rollout import rollout

from .conftest import ROOT, max_abs_log_ratio, rows

CONFIG = ROOT / "configs" / "ltx2_tiny.yaml"
PROMPTS = ["a red ball rolls left", "a blue square jumps"]
# The pipeline comparison's tolerances (float32 on the CPU, 6 steps, CFG 3 on both streams): latents
# of both streams, decoded frames in [0, 1] (ours are uint8: rounding is up to 0.5 / 255) and waveforms.
LATENT_ATOL = 1e-4
FRAME_ATOL = 0.5 / 255 + 1e-4
AUDIO_ATOL = 1e-4


def config(tmp_path, *overrides: str):
    return load_config(CONFIG, [f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", "run.report_every=0",
                                f"data.prompts={PROMPTS}", *overrides])


def test_token_map_has_both_streams_with_their_own_d(tmp_path):
    cfg = config(tmp_path)
    adapter = build_adapter(cfg.model, torch.device("cpu"))
    adapter.frame_rate = cfg.video.fps
    shape = adapter.latent_shape(9, 16, 16)
    tokens = adapter.token_map(shape)
    video, audio = tokens.streams
    # 9 frames at 2x temporal, 16x16 at 2x spatial, 4 channels: 5*8*8 tokens of 4; 9/8 s of sound at
    # 16 kHz / hop 160 / 4: 28 audio tokens of 2 channels x 4 mel bins.
    assert (video.tokens, video.elements, video.grid) == (320, 4, (5, 8, 8))
    assert (audio.tokens, audio.elements, audio.grid) == (28, 8, (28,))
    assert shape == (320 * 4 + 28 * 8,) and video.trains and audio.trains
    # The frame rate sets the audio length (and reaches the transformer's rotary time axis).
    adapter.frame_rate = 16.0
    assert adapter.token_map(adapter.latent_shape(9, 16, 16)).streams[1].tokens == 14
    # Per-token sums keep each stream's D: the log-density's constant counts D_v or D_a per token.
    x, mean = torch.randn(2, *shape), torch.randn(2, *shape)
    lp = sde.token_log_prob(x, mean, torch.tensor([0.5, 0.5]), tokens)
    v, a = tokens.split(x - mean)
    const = -(torch.log(torch.tensor(0.5)) + 0.5 * np.log(2 * np.pi))
    assert torch.allclose(lp[:, :320], -v.square().sum(-1) / 0.5 + 4 * const, atol=1e-5)
    assert torch.allclose(lp[:, 320:], -a.square().sum(-1) / 0.5 + 8 * const, atol=1e-5)
    # SPEC invariant 4: token KL summed is the whole-latent KL.
    kl = sde.token_kl(x, mean, torch.tensor([0.5, 0.5]), tokens)
    assert torch.allclose(kl.sum(1), (x - mean).square().sum(1) / 0.5, rtol=1e-5)
    with pytest.raises(ModelError, match="'video' and 'audio'"):
        adapter.frozen_streams = ("sound",)
        adapter.token_map(shape)


def test_rollout_equals_the_diffusers_pipeline(tmp_path):
    """Our rollout at eta 0 (its SDE steps are then Euler steps) against ``LTX2Pipeline.__call__``
    loaded from our ``save_pretrained``: same weights, prompt, initial noise of both streams,
    schedule (LTX-2's shifted sigmas), frame rate and CFG (3 on video and audio; the pipeline's
    STG, modality guidance and rescale off, as the policy has none of them)."""
    from diffusers import LTX2Pipeline

    cfg = config(tmp_path, "model.lora.rank=0", "data.negative_prompt=blurry", "video.height=32", "video.width=32")
    built = build_adapter(cfg.model, torch.device("cpu"))
    built.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "model_index.json").read_text())["_class_name"] == "LTX2Pipeline"
    loaded = load_config(CONFIG, [f"model.path={tmp_path / 'ckpt'}", "model.init=null", "model.lora.rank=0"])
    adapter = build_adapter(loaded.model, torch.device("cpu"))
    assert type(adapter).__name__ == "LTX2Adapter"
    v, smp = cfg.video, dataclasses.replace(cfg.sampler, eta=0.0)
    adapter.frame_rate = v.fps
    shape = adapter.latent_shape(v.num_frames, v.height, v.width)
    seed, prompt = 3, PROMPTS[0]
    traj = rollout(adapter, [prompt], 1, shape, smp, torch.Generator().manual_seed(seed), "blurry", progress=False)
    assert isinstance(traj.text, TextBatch) and set(traj.text.parts) == {"video", "audio", "mask"}
    g = torch.Generator().manual_seed(seed)
    schedule = adapter.schedule(smp.num_steps, smp.shift, shape)
    sde.choose_sde_steps(smp.num_steps, smp.sde_steps, tuple(smp.window), smp.kind, g, schedule)
    noise = torch.randn((1, *shape), generator=g, dtype=torch.float32)
    video_noise, audio_noise = adapter.split(noise)
    pipe = LTX2Pipeline.from_pretrained(tmp_path / "ckpt")
    pipe.set_progress_bar_config(disable=True)
    # The pipeline normalises audio latents it is given: hand it the raw ones of our normalised noise.
    a_vae = pipe.audio_vae
    audio_in = audio_noise * a_vae.latents_std + a_vae.latents_mean
    common = dict(prompt=prompt, negative_prompt="blurry", height=v.height, width=v.width, num_frames=v.num_frames,
                  frame_rate=v.fps, num_inference_steps=smp.num_steps, guidance_scale=smp.guidance_scale,
                  audio_guidance_scale=smp.guidance_scale, stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0,
                  audio_modality_scale=1.0, guidance_rescale=0.0, audio_guidance_rescale=0.0,
                  spatio_temporal_guidance_blocks=None, max_sequence_length=cfg.model.max_sequence_length)
    with torch.no_grad():
        out_lat = pipe(**common, latents=video_noise.clone(), audio_latents=audio_in.clone(), output_type="latent")
        out = pipe(**common, latents=video_noise.clone(), audio_latents=audio_in.clone(), output_type="np")
    assert torch.allclose(pipe.scheduler.sigmas.double(), schedule, atol=1e-6)
    video_diff = float((adapter.video_latents(traj.final) - out_lat.frames.float()).abs().max())
    audio_diff = float((adapter.audio_latents(traj.final) - out_lat.audio.float()).abs().max())
    frame_diff = float(np.abs(traj.videos[0].numpy() / 255.0 - out.frames[0]).max())
    wave_diff = float((traj.audio[0] - torch.as_tensor(out.audio[0]).float()).abs().max())
    print(f"rollout vs LTX2Pipeline: max |video latent diff| {video_diff:.2e}, |audio latent diff| {audio_diff:.2e} "
          f"(atol {LATENT_ATOL:g}), |frame diff| {frame_diff:.2e} (atol {FRAME_ATOL:.2e}), "
          f"|waveform diff| {wave_diff:.2e} (atol {AUDIO_ATOL:g})")
    assert video_diff < LATENT_ATOL and audio_diff < LATENT_ATOL
    assert frame_diff <= FRAME_ATOL and wave_diff < AUDIO_ATOL
    assert traj.audio_rate == int(pipe.vocoder.config.output_sampling_rate) and traj.audio.shape[:2] == (1, 2)
    assert float(traj.final.abs().mean()) > 0.1 and float(traj.audio.abs().mean()) > 1e-4       # not vacuous


def test_ratio_is_one_before_update_over_both_streams(tmp_path):
    """SPEC invariant 1: batch of 6, CFG on, replayed in other batch compositions, every token of
    both streams; a changed policy moves the ratio on both streams."""
    cfg = config(tmp_path, "sampler.num_steps=4", "sampler.sde_steps=2", "sampler.batch_size=2",
                 "data.negative_prompt=blurry")
    trainer = Trainer(cfg)
    traj = rollout(trainer.adapter, PROMPTS, 3, trainer.latent_shape, cfg.sampler,
                   torch.Generator().manual_seed(7), "blurry", progress=False, decode=False)
    assert traj.batch_size == 6 and traj.latents.shape[2:] == trainer.latent_shape
    assert max_abs_log_ratio(trainer, traj, [[5], [4, 0, 2], [1, 3], list(range(6))]) < 1e-5
    with torch.no_grad():
        for p in trainer.adapter.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        out, kl, _ = trainer.replay_step(traj.select(torch.tensor([0, 1])), 0, torch.ones(2))
    video = trainer.adapter.token_map(trainer.latent_shape).spans()["video"]
    assert float(kl[:, video].sum()) > 0 and float(kl[:, video.stop:].sum()) > 0     # both streams moved
    assert out.counts["kl_audio"] > 0 and out.counts["terms_audio"] == 2 * 28
    # The evaluation's KL to the base: the all-token mean, and each stream's own (tokens of D 4 and 8).
    moved = rollout(trainer.adapter, PROMPTS[:1], 2, trainer.latent_shape, cfg.sampler,
                    torch.Generator().manual_seed(8), "blurry", progress=False, decode=False)
    m = evaluation.kl_to_base_metrics(trainer.adapter, moved, chunk=1)
    assert m["eval/kl_base/video/mean"] > 0 and m["eval/kl_base/audio/mean"] > 0
    assert m["eval/kl_base/mean"] == pytest.approx((320 * m["eval/kl_base/video/mean"] + 28 * m["eval/kl_base/audio/mean"])
                                                   / 348, rel=1e-5)


def test_frozen_audio_stream_is_sampled_not_trained(tmp_path):
    """``model.frozen_streams: [audio]``: the objective sees only the video tokens (its D per token),
    the audio's share of the KL is still counted, and its terms are never frozen by the trust region."""
    cfg = config(tmp_path, "sampler.num_steps=4", "sampler.sde_steps=1", "model.frozen_streams=[audio]",
                 "objective.granularity=token")
    trainer = Trainer(cfg)
    assert [s.trains for s in trainer.adapter.token_map(trainer.latent_shape).streams] == [True, False]
    assert tuple(trainer.elements_per_token.shape) == (320,) and bool((trainer.elements_per_token == 4).all())
    traj = rollout(trainer.adapter, PROMPTS, 2, trainer.latent_shape, cfg.sampler,
                   torch.Generator().manual_seed(1), progress=False, decode=False)
    with torch.no_grad():
        for p in trainer.adapter.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        out, kl, _ = trainer.replay_step(traj, 0, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert out.frozen.shape == kl.shape and not bool(out.frozen[:, 320:].any())
    assert float(out.counts["terms"]) == 4 * 320 and "terms_audio" not in out.counts and out.counts["kl_audio"] > 0
    with pytest.raises(ModelError, match="has one token stream"):
        build_adapter(load_config(ROOT / "configs" / "wan_tiny.yaml", ["model.frozen_streams=[audio]"]).model,
                      torch.device("cpu"))
    # Refused before any weight is built: a name the family lacks, or every stream frozen.
    for streams, words in [("[sound]", r"unknown \['sound'\]"), ("[video, audio]", "not all")]:
        with pytest.raises(ModelError, match=words):
            build_adapter(load_config(CONFIG, [f"model.frozen_streams={streams}"]).model, torch.device("cpu"))
    # The flat latent (E,) names its geometry by its size: two video sizes of one E are refused.
    ad = trainer.adapter
    e = ad.latent_shape(9, 32, 64)
    with pytest.raises(ModelError, match="two latent geometries"):
        assert ad.latent_shape(9, 64, 32) == e


def test_train_resume_and_sample_through_the_cli(tmp_path):
    """A full iteration of the tiny config, resumed for a second, then ``sample`` from the checkpoint:
    its mp4 carries the sound; the metrics log the audio's part of the KL and of the frozen share."""
    import av

    run = tmp_path / "run"
    common = ["run.tensorboard=false", "run.report_every=0", "run.num_sample_videos=0", "optim.inner_epochs=1",
              "sampler.num_steps=4", "sampler.sde_steps=1", f"data.prompts={PROMPTS}"]
    assert cli_main(["train", "--config", str(CONFIG), f"run.output_dir={run}", "run.iterations=1", *common]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["ratio/first_max_abs_log"] < 1e-5 and row["kl/mean"] >= 0 and row["grad_norm"] > 0
    assert 0 <= row["kl/share_audio"] <= 1 and abs(row["kl/share_audio"] + row["kl/share_video"] - 1) < 1e-6
    assert 0 <= row["mask/drop_frac_audio"] <= 1 and 0 <= row["mask/drop_frac_video"] <= 1
    assert cli_main(["train", "--resume", str(run), "run.iterations=2"]) == 0
    assert [r["iteration"] for r in rows(run)] == [0, 1]
    model = run / "checkpoints" / "iter_000002" / "model"
    assert sorted(p.name for p in model.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]
    out = tmp_path / "samples"
    assert cli_main(["sample", "--run", str(run), "--out", str(out), "--num", "1", "--prompts", "0"]) == 0
    (mp4,) = out.glob("*.mp4")
    with av.open(str(mp4)) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
        assert c.streams.audio[0].rate == 8000
