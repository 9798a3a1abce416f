"""Model families on tiny real models: Wan 2.1, Wan 2.2 (two experts; TI2V per-token timesteps),
HunyuanVideo 1.0 and 1.5. SPEC invariant 1 with each family's own conditioning, save/load of what trains,
loading from a diffusers directory, Wan 2.2 expert routing, and the errors a user can cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from flowdppo_video.runs.config import ConfigError, load_config
from flowdppo_video.models import build_adapter
from flowdppo_video.models.base import ModelError, TextBatch
from flowdppo_video.training.rollout import rollout, step_mean
from flowdppo_video.trainer import Trainer

from .conftest import ROOT, max_abs_log_ratio

CONFIGS = {"wan2.1": "wan_tiny.yaml", "wan2.2_a14b": "wan22_tiny.yaml", "wan2.2_ti2v": "wan22_ti2v_tiny.yaml",
           "hunyuan_video": "hunyuan_tiny.yaml", "hunyuan_video_1.5": "hunyuan15_tiny.yaml"}
TEXT_PARTS = {"hunyuan_video": {"embeds", "mask", "pooled"},
              "hunyuan_video_1.5": {"embeds", "mask", "embeds_2", "mask_2"}}
PROMPTS = ["a red ball rolls to the left", "a blue square slides up"]


def family_config(tmp_path, name: str, *overrides: str):
    return load_config(ROOT / "configs" / CONFIGS[name], [
        f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false",
        f"data.prompts={ROOT / 'configs/prompts/demo.txt'}", *overrides])


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lora_rank, guidance", [(4, 3.0), (0, 1.0)])
def test_ratio_is_one_before_update(tmp_path, name, lora_rank, guidance):
    """SPEC invariant 1 per family, batch of 6, replayed in other batch compositions."""
    cfg = family_config(tmp_path, name, f"model.lora.rank={lora_rank}", f"sampler.guidance_scale={guidance}",
                        "sampler.sde_steps=4", "sampler.batch_size=2", "data.negative_prompt=blurry")
    trainer = Trainer(cfg)
    traj = rollout(trainer.adapter, PROMPTS, 3, trainer.latent_shape, cfg.sampler,
                   torch.Generator().manual_seed(7), "blurry", progress=False, decode=False)
    assert traj.batch_size == 6 and traj.num_sde_steps == 4
    if name in TEXT_PARTS:                          # the family's own conditioning: several tensors
        assert isinstance(traj.text, TextBatch) and set(traj.text.parts) == TEXT_PARTS[name]
        mask = traj.text.parts["mask"]
        assert mask.shape[0] == 6 and 0 < int(mask[0].sum()) < mask.shape[1]   # padded: the mask matters
    assert max_abs_log_ratio(trainer, traj, [[5], [4, 0, 2], [1, 3], list(range(6))]) < 1e-5
    # Not vacuous: a changed policy moves the ratio.
    with torch.no_grad():
        for p in trainer.adapter.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert max_abs_log_ratio(trainer, traj, [[0, 1]]) > 1e-3


def test_wan22_replays_each_step_through_the_expert_that_made_it(tmp_path):
    cfg = family_config(tmp_path, "wan2.2_a14b", "sampler.sde_steps=4", "model.lora.rank=0")
    trainer = Trainer(cfg)
    adapter = trainer.adapter
    assert adapter.num_experts == 2 and adapter.boundary_ratio == 0.875
    traj = rollout(adapter, PROMPTS, 2, trainer.latent_shape, cfg.sampler, torch.Generator().manual_seed(3),
                   progress=False, decode=False)
    experts = traj.experts.tolist()
    # The SDE steps straddle the boundary, routed as WanPipeline does (t >= boundary * 1000 -> transformer).
    assert experts == [0 if float(s) * 1000 >= 875.0 else 1 for s in traj.sigmas]
    assert 0 in experts and 1 in experts
    assert max_abs_log_ratio(trainer, traj, [[0, 3], [1, 2]]) < 1e-5
    # Replay follows the record, not today's routing rule: moving the boundary changes nothing.
    adapter.boundary_ratio = 0.01
    assert max_abs_log_ratio(trainer, traj, [[0, 1, 2, 3]]) < 1e-5
    adapter.boundary_ratio = 0.875
    # Routed wrongly, every step's ratio leaves 1: the two experts differ and the record matters.
    wrong = traj.select(torch.arange(4))
    wrong.experts = 1 - traj.experts
    with torch.no_grad():
        for j in range(traj.num_sde_steps):
            _, _, log_ratio = trainer.replay_step(wrong, j, torch.ones(4))
            assert float(log_ratio.abs().max()) > 1e-3
    # The low-noise expert's steps used guidance_scale_2 (2.0), the high-noise ones guidance_scale (3.0).
    assert traj.guidance_scale == 3.0 and traj.guidance_scale_2 == 2.0
    j = experts.index(1)
    wrong_scale = traj.select(torch.arange(4))
    wrong_scale.guidance_scale_2 = 3.0
    with torch.no_grad():
        assert not torch.allclose(step_mean(adapter, wrong_scale, j), step_mean(adapter, traj, j), atol=1e-5)


@pytest.mark.parametrize("train", [["low"], ["high"]])
def test_wan22_only_the_training_expert_trains(tmp_path, train):
    cfg = family_config(tmp_path, "wan2.2_a14b", f"model.train_experts={train}", "sampler.sde_steps=2",
                        "run.iterations=1")
    trainer = Trainer(cfg)
    adapter = trainer.adapter
    idx = {"high": 0, "low": 1}[train[0]]
    frozen = adapter.experts[1 - idx]
    assert not any("lora_" in n for n, _ in frozen.named_parameters())          # no adapters on it
    assert not any(p.requires_grad for p in frozen.parameters())
    owned = {id(p) for p in adapter.experts[idx].parameters()}
    assert all(id(p) in owned for p in adapter.trainable_parameters())
    traj, row = trainer.train_iteration(0)
    assert set(traj.experts.tolist()) == {idx}                  # SDE steps only where it trains
    assert row["ratio/first_max_abs_log"] < 1e-5
    state_params = {id(p) for g in trainer.updater.optimizer.param_groups for p in g["params"] if p in trainer.updater.optimizer.state}
    assert state_params and state_params <= owned               # optimizer state: the training expert only
    adapter.save_trainable(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [["transformer", "transformer_2"][idx]]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lora_rank", [4, 0])
def test_save_load_round_trip_of_what_trains(tmp_path, name, lora_rank):
    cfg = family_config(tmp_path, name, f"model.lora.rank={lora_rank}")
    dev = torch.device("cpu")
    a = build_adapter(cfg.model, dev)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    a.save_trainable(tmp_path / "model")
    b = build_adapter(cfg.model, dev)
    b.load_trainable(tmp_path / "model")
    pa, pb = a.trainable_parameters(), b.trainable_parameters()
    assert len(pa) == len(pb) > 0 and all(torch.equal(x, y) for x, y in zip(pa, pb))
    shape = a.latent_shape(cfg.video.num_frames, cfg.video.height, cfg.video.width)
    x, text = torch.randn(2, *shape), a.encode_prompts(PROMPTS)
    for e in range(a.num_experts):
        with torch.no_grad():
            assert torch.equal(a.velocity(x, torch.tensor([0.9, 0.3]), text, e),
                               b.velocity(x, torch.tensor([0.9, 0.3]), text, e))


@pytest.mark.parametrize("name", ["wan2.2_a14b", "hunyuan_video", "hunyuan_video_1.5"])
def test_loads_from_a_diffusers_directory(tmp_path, name):
    """``save_pretrained`` writes the family's diffusers pipeline; ``model.path`` loads it back."""
    cfg = family_config(tmp_path, name)
    a = build_adapter(cfg.model, torch.device("cpu"))
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))                  # LoRA merged into the exported weights
    a.save_pretrained(tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model_index.json").read_text())
    loaded = load_config(ROOT / "configs" / CONFIGS[name], [f"model.path={tmp_path / 'ckpt'}", "model.init=null",
                                                              "model.lora.rank=0"])
    b = build_adapter(loaded.model, torch.device("cpu"))
    if name == "wan2.2_a14b":
        assert index["boundary_ratio"] == 0.875 and index["transformer_2"][1] == "WanTransformer3DModel"
        assert b.num_experts == 2 and b.boundary_ratio == 0.875
    shape = a.latent_shape(cfg.video.num_frames, cfg.video.height, cfg.video.width)
    x, sigma = torch.randn(2, *shape), torch.tensor([0.95, 0.2])
    with torch.no_grad():
        for e in range(a.num_experts):
            va = a.velocity(x, sigma, a.encode_prompts(PROMPTS), e)
            vb = b.velocity(x, sigma, b.encode_prompts(PROMPTS), e)
            assert torch.allclose(va, vb, atol=1e-5)
    # A family mismatch is one line naming both.
    other = "hunyuan_video" if name == "wan2.2_a14b" else "wan"
    with pytest.raises(ModelError, match=f"holds a {index['_class_name']} checkpoint .*model.family is '{other}'"):
        build_adapter(load_config(ROOT / "configs" / CONFIGS[name], [
            f"model.path={tmp_path / 'ckpt'}", "model.init=null", f"model.family={other}"]).model, torch.device("cpu"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bad_video_sizes_are_named(tmp_path, name):
    cfg = family_config(tmp_path, name)
    a = build_adapter(cfg.model, torch.device("cpu"))
    v = cfg.video
    with pytest.raises(ModelError, match="num_frames=10 must be 4k\\+1"):
        a.latent_shape(10, v.height, v.width)
    with pytest.raises(ModelError, match=f"video size 24x{v.width} must be divisible by"):
        a.latent_shape(v.num_frames, 24, v.width)


def test_not_a_diffusers_checkpoint_and_bad_expert_choices(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for family in ("wan", "hunyuan_video"):
        cfg = load_config(ROOT / "configs" / "wan_tiny.yaml", [f"model.path={empty}", "model.init=null",
                                                                 f"model.family={family}"])
        with pytest.raises(ModelError, match="is not a diffusers checkpoint \\(no model_index.json\\)"):
            build_adapter(cfg.model, torch.device("cpu"))
    with pytest.raises(ModelError, match="does not exist"):
        build_adapter(load_config(ROOT / "configs" / "wan_tiny.yaml", [
            f"model.path={tmp_path / 'nope'}", "model.init=null"]).model, torch.device("cpu"))
    with pytest.raises(ModelError, match="this model has only the \\['high'\\] expert"):
        build_adapter(load_config(ROOT / "configs" / "wan_tiny.yaml", ["model.train_experts=[low]"]).model,
                      torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.train_experts must be"):
        load_config(ROOT / "configs" / "wan22_tiny.yaml", ["model.train_experts=[middle]"])
    # Too few SDE steps left where the training expert works: named, with the key to change.
    cfg = load_config(ROOT / "configs" / "wan22_tiny.yaml", ["model.train_experts=[high]", "sampler.sde_steps=3",
                                                               f"run.output_dir={tmp_path / 'r'}"])
    trainer = Trainer(cfg)
    with pytest.raises(ModelError, match="sampler.sde_steps=3 exceeds the 2 steps .*model.train_experts"):
        rollout(trainer.adapter, PROMPTS, 1, trainer.latent_shape, cfg.sampler, torch.Generator().manual_seed(0),
                progress=False, decode=False)


def test_wan_init_takes_a_pixel_autoencoder_and_a_word_tokenizer():
    """``model.init`` can describe the shapes world's kind of model (pixel latents, a word vocabulary);
    its mistakes are named in one line."""
    init = {"vae": {"_class_name": "PixelAutoencoder", "z_dim": 4}, "tokenizer": {"words": ["red", "ball"]}}
    cfg = load_config(ROOT / "configs" / "wan_tiny.yaml", [f"model.init={json.dumps(init)}"])
    ad = build_adapter(cfg.model, torch.device("cpu"))
    assert type(ad.vae).__name__ == "PixelAutoencoder" and ad.vae.config.latents_mean == [0.0] * 4
    assert len(ad.tokenizer) == ad.text_encoder.config.vocab_size < 16       # specials + two words
    for bad, match in (({"vae": {"_class_name": "AutoencoderKL"}}, "model.init.vae._class_name must be one of"),
                       ({"tokenizer": {"vocab": ["a"]}}, "unknown model.init.tokenizer key\(s\) \['vocab'\]")):
        cfg = load_config(ROOT / "configs" / "wan_tiny.yaml", [f"model.init={json.dumps(bad)}"])
        with pytest.raises(ModelError, match=match):
            build_adapter(cfg.model, torch.device("cpu"))


def cli_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "flowdppo_video", "train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_training_iteration_through_the_cli(tmp_path, name):
    run = tmp_path / "run"
    proc = cli_train("--config", str(ROOT / "configs" / CONFIGS[name]), f"run.output_dir={run}",
                     "run.iterations=1", "run.tensorboard=false", "optim.inner_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["ratio/first_max_abs_log"] < 1e-5 and row["kl/mean"] >= 0 and row["grad_norm"] > 0
    model = run / "checkpoints" / "iter_000001" / "model"
    files = sorted(p.relative_to(model).as_posix() for p in model.rglob("*.safetensors"))
    expected = {"wan2.2_a14b": ["transformer/pytorch_lora_weights.safetensors",
                                "transformer_2/pytorch_lora_weights.safetensors"]}
    assert files == expected.get(name, ["pytorch_lora_weights.safetensors"])


@pytest.mark.slow
def test_cli_names_a_family_mismatch_in_one_line(tmp_path):
    cfg = load_config(ROOT / "configs" / "hunyuan_tiny.yaml")
    build_adapter(cfg.model, torch.device("cpu")).save_pretrained(tmp_path / "hunyuan")
    proc = cli_train("--config", str(ROOT / "configs" / "wan_tiny.yaml"), f"run.output_dir={tmp_path / 'run'}",
                     f"model.path={tmp_path / 'hunyuan'}", "model.init=null")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("flowdppo-video: error: model.path ") and "HunyuanVideoPipeline" in lines[-1]
    assert "model.family is 'wan'" in lines[-1]
