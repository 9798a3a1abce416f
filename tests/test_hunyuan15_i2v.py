"""HunyuanVideo 1.5 image-to-video (``model.family: hunyuan_video_1.5_i2v``) on a tiny real model: a
``HunyuanVideo15ImageToVideoPipeline`` directory (SigLIP image encoder and processor) written and
loaded back, the rollout against diffusers' own ``__call__`` at the same seed (latents and decoded
frames), SPEC invariant 1 with two images in the batch, and a training iteration, its resume and
``sample`` through the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowdppo_video import sde
from flowdppo_video.commands.cli import main as cli_main
from flowdppo_video.runs.config import load_config
from flowdppo_video.runs.images import load_run_images
from flowdppo_video.models import build_adapter
from flowdppo_video.models.base import ModelError, TextBatch
from flowdppo_video.training.rollout import rollout
from flowdppo_video.trainer import Trainer

from .conftest import PROMPTS, ROOT, max_abs_log_ratio, rows, write_image

CONFIG = ROOT / "configs" / "hunyuan15_i2v_tiny.yaml"
# The pipeline comparison's tolerances (float32 on the CPU, 6 steps, CFG 3): latents, and decoded
# frames in [0, 1] (ours are uint8: rounding alone is up to 0.5 / 255, plus float error).
LATENT_ATOL = 1e-4
FRAME_ATOL = 0.5 / 255 + 1e-4


def i2v_config(tmp_path, images, *overrides: str):
    return load_config(CONFIG, [f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", "run.report_every=0",
                                f"data.prompts={PROMPTS}", f"data.images={images}", *overrides])


def test_rollout_equals_the_diffusers_pipeline(tmp_path, images):
    """Our rollout at eta 0 (its SDE steps are then Euler steps) against
    ``HunyuanVideo15ImageToVideoPipeline.__call__`` loaded from our ``save_pretrained``: same weights,
    image, prompts, initial noise (the rollout's generator at the same seed), schedule and CFG. The
    pipeline encodes the text, the image (SigLIP, VAE) itself; its size comes from the image and
    ``target_size`` (32x32 here, the config's)."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from diffusers.guiders import ClassifierFreeGuidance

    cfg = i2v_config(tmp_path, images, "model.lora.rank=0", "data.negative_prompt=blurry")
    built = build_adapter(cfg.model, torch.device("cpu"))
    built.save_pretrained(tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideo15ImageToVideoPipeline"
    assert index["image_encoder"][1] == "SiglipVisionModel" and index["feature_extractor"][0] == "transformers"
    # model.path loads the directory as this family (the rollout below runs on the loaded model).
    loaded = load_config(CONFIG, [f"model.path={tmp_path / 'ckpt'}", "model.init=null", "model.lora.rank=0",
                                  f"data.prompts={PROMPTS}", f"data.images={images}"])
    adapter = build_adapter(loaded.model, torch.device("cpu"))
    assert type(adapter).__name__ == "HunyuanVideo15I2VAdapter"
    load_run_images(adapter, loaded)
    v, smp = cfg.video, dataclasses.replace(cfg.sampler, eta=0.0)
    shape = adapter.latent_shape(v.num_frames, v.height, v.width)
    seed, prompt = 3, PROMPTS[0]
    traj = rollout(adapter, [prompt], 1, shape, smp, torch.Generator().manual_seed(seed), "blurry", progress=False)
    parts = traj.text.parts                                 # the image rides in the text conditioning
    assert set(parts) == {"embeds", "mask", "embeds_2", "mask_2", "cond", "image"}
    assert tuple(parts["cond"].shape) == (1, 4 + 1, *shape[1:]) and tuple(parts["image"].shape) == (1, 16, 8)
    assert torch.all(parts["cond"][:, 4, 0] == 1) and torch.all(parts["cond"][:, :, 1:] == 0)  # frame 0 only
    assert torch.equal(traj.text_uncond.parts["cond"], parts["cond"])        # CFG keeps the row's image
    # The rollout's generator draws the SDE steps, then the initial noise: the same noise for the pipeline.
    g = torch.Generator().manual_seed(seed)
    sde.choose_sde_steps(smp.num_steps, smp.sde_steps, tuple(smp.window), smp.kind, g,
                         sde.flow_schedule(smp.num_steps, smp.shift))
    noise = torch.randn((1, *shape), generator=g, dtype=torch.float32)
    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(tmp_path / "ckpt")
    pipe.guider = ClassifierFreeGuidance(guidance_scale=smp.guidance_scale)
    # The pipeline's fixed numbers for its Qwen tokenizer (crop 108 template tokens, 1000 prompt
    # tokens; what the family uses with it) set to the tiny byte tokenizer's.
    pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length = adapter.crop_start, cfg.model.max_sequence_length
    pipe.set_progress_bar_config(disable=True)
    common = dict(image=Image.open(images / "0.png").convert("RGB"), prompt=prompt, negative_prompt="blurry",
                  num_frames=v.num_frames, num_inference_steps=smp.num_steps)
    with torch.no_grad():
        latents = pipe(**common, latents=noise.clone(), output_type="latent").frames
        frames = pipe(**common, latents=noise.clone(), output_type="np").frames
    assert pipe.scheduler.config.shift == smp.shift and tuple(latents.shape[1:]) == shape
    latent_diff = float((traj.final - latents.float()).abs().max())
    frame_diff = float(np.abs(traj.videos[0].numpy() / 255.0 - frames[0]).max())
    print(f"rollout vs pipeline: max |latent diff| {latent_diff:.2e} (atol {LATENT_ATOL:g}), "
          f"max |frame diff| {frame_diff:.2e} (atol {FRAME_ATOL:.2e})")
    assert latent_diff < LATENT_ATOL and frame_diff <= FRAME_ATOL
    assert float(traj.final.abs().mean()) > 0.1                              # not vacuous
    # The image matters: another image, the same noise, another first frame.
    other = tmp_path / "other.png"
    write_image(other, (40, 220, 60), (20, 2, 38, 30))
    adapter.set_images({prompt: other}, v.num_frames, v.height, v.width)
    again = rollout(adapter, [prompt], 1, shape, smp, torch.Generator().manual_seed(seed), "blurry", progress=False)
    assert float((again.videos[0, 0].float() - traj.videos[0, 0].float()).abs().mean()) > 0.1


def test_ratio_is_one_before_update(tmp_path, images):
    """SPEC invariant 1 with the image condition in the text rows: batch of 6 over two images, CFG
    on, replayed in other batch compositions; a changed policy moves the ratio. (LoRA; full
    fine-tuning takes the same velocity path, as the other families' tests show.)"""
    cfg = i2v_config(tmp_path, images, "sampler.guidance_scale=3.0", "sampler.num_steps=4", "sampler.sde_steps=2",
                     "sampler.batch_size=2", "data.negative_prompt=blurry")
    trainer = Trainer(cfg)
    traj = rollout(trainer.adapter, PROMPTS, 3, trainer.latent_shape, cfg.sampler,
                   torch.Generator().manual_seed(7), "blurry", progress=False, decode=False)
    assert traj.batch_size == 6 and isinstance(traj.text, TextBatch) and len(traj.text) == 6
    for key in ("cond", "image"):                                                 # two images in the batch
        assert not torch.equal(traj.text.parts[key][0], traj.text.parts[key][3])
        assert torch.equal(traj.text_uncond.parts[key], traj.text.parts[key])    # CFG keeps each row's image
    assert max_abs_log_ratio(trainer, traj, [[5], [4, 0, 2], [1, 3], list(range(6))]) < 1e-5
    with torch.no_grad():
        for p in trainer.adapter.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert max_abs_log_ratio(trainer, traj, [[0, 1]]) > 1e-3


def test_errors_name_the_problem(tmp_path, images):
    cfg = i2v_config(tmp_path, images)
    adapter = build_adapter(cfg.model, torch.device("cpu"))
    with pytest.raises(ModelError, match="prompt 'unseen' has no conditioning image: .*data.images"):
        adapter.encode_prompts(["unseen"])
    with pytest.raises(ModelError, match="image_encoder hidden_size 8 != transformer image_embed_dim 12"):
        build_adapter(load_config(CONFIG, ["model.init={transformer: {image_embed_dim: 12}}"]).model,
                      torch.device("cpu"))


def test_train_resume_and_sample_through_the_cli(tmp_path, capsys):
    """A full iteration of the tiny config (the repository's prompts and images), resumed for a
    second, then ``sample`` from the checkpoint."""
    run = tmp_path / "run"
    common = ["run.tensorboard=false", "run.report_every=0", "run.num_sample_videos=0", "optim.inner_epochs=1",
              "sampler.num_steps=4", "sampler.sde_steps=1"]
    assert cli_main(["train", "--config", str(CONFIG), f"run.output_dir={run}", "run.iterations=1", *common]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["ratio/first_max_abs_log"] < 1e-5 and row["kl/mean"] >= 0 and row["grad_norm"] > 0
    assert cli_main(["train", "--resume", str(run), "run.iterations=2"]) == 0
    assert [r["iteration"] for r in rows(run)] == [0, 1]
    model = run / "checkpoints" / "iter_000002" / "model"
    assert sorted(p.name for p in model.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]
    out = tmp_path / "samples"
    assert cli_main(["sample", "--run", str(run), "--out", str(out), "--num", "1", "--prompts", "0"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [v["prompt_index"] for v in index["videos"]] == [0] and len(list(out.glob("*.mp4"))) == 1
