"""HunyuanVideo image-to-video (``model.family: hunyuan_video_i2v``) on tiny real models: a
``HunyuanVideoImageToVideoPipeline`` directory (Llava text encoder, CLIP, image processor) loaded
through ``build_adapter``, rollouts whose first frame depends on the image, the transformer inputs
checked against diffusers' own pipeline for both ``image_condition_type``\\ s, SPEC invariant 1, and
one training iteration through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from flowdppo_video.runs.config import load_config
from flowdppo_video.runs.images import load_run_images
from flowdppo_video.models import build_adapter
from flowdppo_video.models.base import ModelError, TextBatch
from flowdppo_video.training.rollout import rollout
from flowdppo_video.trainer import Trainer

from .conftest import PROMPTS, ROOT, max_abs_log_ratio, record_transformer_calls, write_image

CONFIG = ROOT / "configs" / "hunyuan_i2v_tiny.yaml"
# model.init of each image_condition_type (over configs/hunyuan_i2v_tiny.yaml's latent_concat default).
VARIANTS = {"latent_concat": "{}",
            "token_replace": "{transformer: {image_condition_type: token_replace, in_channels: 4}}"}


def i2v_config(tmp_path, images: Path | str, variant: str = "latent_concat", *overrides: str):
    return load_config(CONFIG, [f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", "run.report_every=0",
                                f"data.prompts={PROMPTS}", f"data.images={images}",
                                f"model.init={VARIANTS[variant]}", *overrides])


def test_loads_a_pipeline_directory_and_the_first_frame_follows_the_image(tmp_path, images):
    cfg = i2v_config(tmp_path, images, "latent_concat", "model.lora.rank=0")
    built = build_adapter(cfg.model, torch.device("cpu"))
    built.save_pretrained(tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideoImageToVideoPipeline"
    assert index["text_encoder"][1] == "LlavaForConditionalGeneration" and index["image_processor"][0] == "transformers"
    loaded_cfg = load_config(CONFIG, [f"model.path={tmp_path / 'ckpt'}", "model.init=null", f"data.prompts={PROMPTS}",
                                      f"data.images={images}"])
    adapter = build_adapter(loaded_cfg.model, torch.device("cpu"))
    load_run_images(adapter, loaded_cfg)
    v = cfg.video
    shape = adapter.latent_shape(v.num_frames, v.height, v.width)
    assert shape == (4, (v.num_frames - 1) // 4 + 2, v.height // 8, v.width // 8)   # + the image's latent frame
    traj = rollout(adapter, PROMPTS, 1, shape, loaded_cfg.sampler, torch.Generator().manual_seed(0), progress=False)
    assert traj.videos.shape == (2, v.num_frames, v.height, v.width, 3) and traj.videos.dtype == torch.uint8
    parts = traj.text.parts                                 # the image rides in the text conditioning
    assert set(parts) == {"embeds", "mask", "pooled", "cond"}
    # 16 image features, every 2nd kept, then max_sequence_length - 4 text tokens (padded, masked)
    assert tuple(parts["embeds"].shape) == (2, 8 + 48 - 4, 16) and tuple(parts["pooled"].shape) == (2, 8)
    assert torch.all(parts["mask"][:, :8] == 1) and 8 < int(parts["mask"][0].sum()) < 52
    assert tuple(parts["cond"].shape) == (2, 4 + 1, *shape[1:])
    mask = parts["cond"][:, 4]
    assert torch.all(mask[:, 0] == 1) and torch.all(mask[:, 1:] == 0)        # latent frame 0 only
    assert torch.all(parts["cond"][:, :4, 1:] == 0) and not torch.equal(parts["cond"][0], parts["cond"][1])
    # The loaded model is the built one.
    x, sigma = torch.randn(2, *shape), torch.tensor([0.9, 0.4])
    load_run_images(built, cfg)
    with torch.no_grad():
        assert torch.allclose(built.velocity(x, sigma, built.encode_prompts(PROMPTS)),
                              adapter.velocity(x, sigma, traj.text), atol=1e-5)
    # Same prompt and noise, another image: another first frame; the image changed the Llava text too.
    other = tmp_path / "other.png"
    write_image(other, (40, 220, 60), (20, 2, 38, 30))
    adapter.set_images({PROMPTS[0]: other}, v.num_frames, v.height, v.width)
    again = rollout(adapter, PROMPTS, 1, shape, loaded_cfg.sampler, torch.Generator().manual_seed(0), progress=False)
    assert not torch.allclose(again.text.parts["embeds"][0], parts["embeds"][0])
    assert torch.equal(again.text.parts["embeds"][1], parts["embeds"][1])
    first = (traj.videos[:, 0].float() - again.videos[:, 0].float()).abs().mean(dim=(1, 2, 3))
    assert first[0] > 0.1 and first[1] == 0.0                            # (mean |difference| in uint8 levels)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformer_inputs_match_the_diffusers_pipeline(tmp_path, images, variant):
    """Our velocity at the pipeline's first step equals what HunyuanVideoImageToVideoPipeline's
    transformer computes (Llava text with image tokens, CLIP pooled, image latents with the mask or
    as frame 0, embedded guidance), for the conditional and the true-CFG (negative, black image) call."""
    from diffusers import HunyuanVideoImageToVideoPipeline

    cfg = i2v_config(tmp_path, images, variant, "model.lora.rank=0")
    adapter = build_adapter(cfg.model, torch.device("cpu"))
    load_run_images(adapter, cfg)
    adapter.save_pretrained(tmp_path / "ckpt")
    pipe = HunyuanVideoImageToVideoPipeline.from_pretrained(tmp_path / "ckpt")
    calls = record_transformer_calls(pipe)
    v = cfg.video
    shape = adapter.latent_shape(v.num_frames, v.height, v.width)
    # latent_concat: the pipeline makes (and later drops) the image's frame within num_frames.
    frames = v.num_frames + (4 if variant == "latent_concat" else 0)
    with torch.no_grad():
        pipe(image=Image.open(images / "0.png").convert("RGB"), prompt=PROMPTS[0], negative_prompt="blurry",
             height=v.height, width=v.width, num_frames=frames, num_inference_steps=2, true_cfg_scale=3.0,
             guidance_scale=cfg.model.embedded_guidance, prompt_template=adapter.prompt_template,
             max_sequence_length=cfg.model.max_sequence_length, output_type="latent",
             generator=torch.Generator().manual_seed(1))
        (cond_in, cond_out), (uncond_in, uncond_out) = calls[:2]
        hs = cond_in["hidden_states"]
        assert tuple(hs.shape[2:]) == shape[1:]
        sigma = (cond_in["timestep"].reshape(-1)[:1] / 1000.0).float()
        text, text_u = adapter.encode_prompts(PROMPTS[:1]), adapter.encode_negative("blurry", PROMPTS[:1])
        n = cond_in["encoder_hidden_states"].shape[1]
        assert torch.allclose(cond_in["encoder_hidden_states"], text.parts["embeds"][:, :n], atol=1e-5)
        assert torch.allclose(cond_in["pooled_projections"], text.parts["pooled"], atol=1e-5)
        if variant == "latent_concat":
            x, keep = hs[:, :4], slice(None)
            assert torch.allclose(hs[:, 4:], text.parts["cond"], atol=1e-5)    # [image latents, mask]
        else:
            x, keep = hs, slice(1, None)                                       # frame 0: the image, not the model's
            assert torch.allclose(hs[:, :, :1], text.parts["cond"], atol=1e-5)
            assert n < text.parts["embeds"].shape[1]                           # padded to the negative's length
        ours, ours_u = adapter.velocity(x, sigma, text), adapter.velocity(x, sigma, text_u)
    assert torch.allclose(ours[:, :, keep], cond_out[:, :, keep].float(), atol=1e-4)
    assert torch.allclose(ours_u[:, :, keep], uncond_out[:, :, keep].float(), atol=1e-4)
    assert not torch.allclose(ours, ours_u, atol=1e-3)                      # the negative prompt mattered
    if variant == "token_replace":
        assert torch.all(ours[:, :, 0] == 0)            # frame 0 already is the image latent


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ratio_is_one_before_update(tmp_path, images, variant):
    """SPEC invariant 1 with the image condition in the text rows: batch of 6, true CFG on (negative
    rows with a black image), replayed in other batch compositions; a changed policy moves the ratio."""
    cfg = i2v_config(tmp_path, images, variant, "sampler.guidance_scale=3.0", "sampler.sde_steps=2",
                     "sampler.batch_size=2", "data.negative_prompt=blurry")
    trainer = Trainer(cfg)
    traj = rollout(trainer.adapter, PROMPTS, 3, trainer.latent_shape, cfg.sampler,
                   torch.Generator().manual_seed(7), "blurry", progress=False, decode=False)
    assert traj.batch_size == 6 and isinstance(traj.text, TextBatch) and len(traj.text) == 6
    assert not torch.equal(traj.text.parts["cond"][0], traj.text.parts["cond"][3])   # two images in the batch
    assert torch.equal(traj.text_uncond.parts["cond"], traj.text.parts["cond"])      # CFG keeps each row's image
    assert max_abs_log_ratio(trainer, traj, [[5], [4, 0, 2], [1, 3], list(range(6))]) < 1e-5
    if variant == "token_replace":        # the first latent frame ends as the image latent
        assert torch.allclose(traj.final[:, :, 0], traj.text.parts["cond"][:, :, 0].float(), atol=1e-5)
    with torch.no_grad():
        for p in trainer.adapter.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert max_abs_log_ratio(trainer, traj, [[0, 1]]) > 1e-3


def test_checkpoint_and_model_errors(tmp_path, images):
    cfg = i2v_config(tmp_path, images)
    adapter = build_adapter(cfg.model, torch.device("cpu"))
    with pytest.raises(ModelError, match="prompt 'unseen' has no conditioning image: .*data.images"):
        adapter.encode_prompts(["unseen"])
    adapter.save_pretrained(tmp_path / "i2v")
    with pytest.raises(ModelError, match="holds a HunyuanVideoImageToVideoPipeline checkpoint \\(family "
                                         "'hunyuan_video_i2v'\\), but model.family is 'hunyuan_video'"):
        build_adapter(load_config(CONFIG, [f"model.path={tmp_path / 'i2v'}", "model.init=null",
                                           "model.family=hunyuan_video"]).model, torch.device("cpu"))
    with pytest.raises(ModelError, match="transformer in_channels 4 != 9 for image_condition_type 'latent_concat'"):
        build_adapter(load_config(CONFIG, ["model.init={transformer: {in_channels: 4}}"]).model, torch.device("cpu"))
    with pytest.raises(ModelError, match="transformer image_condition_type None is not one of latent_concat, "
                                         "token_replace"):
        build_adapter(load_config(CONFIG, ["model.init={transformer: {image_condition_type: null}}"]).model,
                      torch.device("cpu"))


@pytest.mark.slow
def test_one_training_iteration_through_the_cli(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "flowdppo_video", "train", "--config", str(CONFIG),
                           f"run.output_dir={run}", "run.iterations=1", "run.tensorboard=false", "run.report_every=0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["ratio/first_max_abs_log"] < 1e-5 and row["kl/mean"] > 0 and row["grad_norm"] > 0
    model = run / "checkpoints" / "iter_000001" / "model"
    assert sorted(p.name for p in model.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]
