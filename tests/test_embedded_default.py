"""The shapes world's shipped model and its recipe (the embedded default to be)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from flowdppo_video.runs.config import load_config
from flowdppo_video.models import build_adapter
from flowdppo_video.training.rollout import rollout
from flowdppo_video.trainer import Trainer
from flowdppo_video.world.model import WEIGHTS_DIR
from rewards.world import adherence_table

from flowdppo_video.commands.cli import DEFAULT_RECIPE as WORLD_RECIPE

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_weights_load_and_sample_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    files = sorted(p.relative_to(WEIGHTS_DIR).as_posix() for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    size = sum((WEIGHTS_DIR / f).stat().st_size for f in files)
    assert size < 20 * 2 ** 20                                     # ships inside the package
    cfg = load_config(WORLD_RECIPE)
    adapter = build_adapter(cfg.model, torch.device("cpu"))
    assert type(adapter.vae).__name__ == "PixelAutoencoder"
    prompts = ["a red circle moves left slowly on black", "a blue square moves up quickly on gray"]
    traj = rollout(adapter, prompts, 2, adapter.latent_shape(8, 16, 16), cfg.sampler,
                   torch.Generator().manual_seed(0), progress=False)
    assert traj.videos.shape == (4, 8, 16, 16, 3)
    # The pretrained model draws the asked colour (a random model would not).
    assert adherence_table(traj.videos, traj.prompts)["colour"] >= 0.75
    meta = json.loads((WEIGHTS_DIR / "pretrain.json").read_text())
    assert meta["steps"] > 0 and meta["train_seconds"] > 0


@pytest.mark.slow
def test_one_training_iteration_on_the_world_recipe(tmp_path):
    cfg = load_config(WORLD_RECIPE, [f"run.output_dir={tmp_path / 'run'}", "run.iterations=1",
                                       "run.tensorboard=false", "run.progress=false",
                                       "data.prompts_per_iteration=2", "data.group_size=4",
                                       "optim.minibatch_size=8", "optim.inner_epochs=1",
                                       "eval.samples_per_prompt=1", "eval.prompts=[a red circle moves left "
                                       "slowly on black, a blue square moves up quickly on gray]"])
    rows = Trainer(cfg).run()
    assert rows[0]["ratio/first_max_abs_log"] < 1e-5
    assert 0.0 <= rows[0]["reward/world_direction/mean"] <= 1.0
    evals = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["after_iterations"] for e in evals] == [0, 1]
    assert {"eval/world_direction/mean", "eval/world_colour/mean", "eval/kl_base/mean"} <= set(evals[1])
    assert len(list((tmp_path / "run" / "before_after").glob("*.mp4"))) == 2
    assert os.path.getsize(tmp_path / "run" / "curves.png") > 10_000


def test_shipped_model_reads_the_sign_of_its_motion_words():
    """The base model follows its direction words partly: the flow loss on held-out ground truth is
    higher with the opposite word (left <-> right) and with a word of the other axis than with the
    right one, and far higher with no caption. (An earlier model learnt the axis but not the sign:
    its opposite-word loss equalled the right one's to 4 digits.)"""
    from flowdppo_video.models.wan import WanAdapter
    from flowdppo_video.world.diagnostics import direction_word_losses
    from flowdppo_video.world.model import MAX_TEXT_TOKENS

    adapter = WanAdapter.from_pretrained(WEIGHTS_DIR, device=torch.device("cpu"), max_sequence_length=MAX_TEXT_TOKENS)
    for sigma, loss in direction_word_losses(adapter, [0.95, 0.8], n=128).items():
        right = loss["right word"]
        assert loss["opposite"] > right * 1.005, (sigma, loss)
        assert loss["other axis"] > right * 1.005, (sigma, loss)
        assert loss["no caption"] > right * 1.2, (sigma, loss)


def test_a_pretraining_stage_starts_from_a_shipped_model_and_keeps_its_history(tmp_path):
    """``tools/pretrain_world.py --init DIR`` starts from a diffusers directory's weights exactly,
    draws scenes by ``--shape-mix``, and the new model's pretrain.json carries every earlier
    stage's command."""
    import random
    import subprocess
    import sys

    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/pretrain_world.py"), "--init", str(WEIGHTS_DIR),
                           "--work", str(tmp_path / "work"), "--out", str(out), "--steps", "2", "--batch", "4",
                           "--warmup", "1", "--save-every", "1", "--threads", "1",
                           "--shape-mix", "square=1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "pretrain.json").read_text())
    shipped = json.loads((WEIGHTS_DIR / "pretrain.json").read_text())
    assert "--shape-mix square=1" in meta["command"]
    assert meta["init"]["state"] == str(WEIGHTS_DIR) and meta["init"]["weights"] == shipped["shipped"]
    assert meta["init"]["command"] == shipped["command"] and meta["init"]["init"] == shipped["init"]

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import pretrain_world
    finally:
        sys.path.remove(str(ROOT / "tools"))
    from flowdppo_video.models.wan import WanAdapter
    from flowdppo_video.world import split_scenes
    from flowdppo_video.world.model import MAX_TEXT_TOKENS, world_modules

    # The init's weights are the shipped model's, every one of them (tied embeddings too).
    init = pretrain_world.read_init(WEIGHTS_DIR)["model"]
    adapter = WanAdapter.from_pretrained(WEIGHTS_DIR, device=torch.device("cpu"), max_sequence_length=MAX_TEXT_TOKENS)
    own = world_modules(adapter).state_dict()
    assert set(init) == set(own) and all(torch.equal(init[k], own[k]) for k in own)
    # The trained model differs from its init (two steps were taken) and loads as a diffusers directory.
    trained = WanAdapter.from_pretrained(out, device=torch.device("cpu"), max_sequence_length=MAX_TEXT_TOKENS)
    assert not torch.equal(trained.transformer.proj_out.weight, adapter.transformer.proj_out.weight)
    # Without --train-text-encoder the text encoder is the init's, to the bit.
    assert all(torch.equal(a, b) for a, b in zip(trained.text_encoder.state_dict().values(),
                                                  adapter.text_encoder.state_dict().values()))

    train, _ = split_scenes()
    rng = random.Random(0)
    mix = pretrain_world.parse_shape_mix("circle=1,square=3")
    drawn = [pretrain_world.draw_scene(train, rng, mix).shape for _ in range(2000)]
    assert "triangle" not in drawn and 0.70 < drawn.count("square") / len(drawn) < 0.80


def test_train_text_encoder_trains_it_and_says_so(tmp_path):
    """``--train-text-encoder`` updates the UMT5 (the adapter freezes it otherwise) and the
    stage's recorded command says so."""
    import subprocess
    import sys

    from flowdppo_video.models.wan import WanAdapter
    from flowdppo_video.world.model import MAX_TEXT_TOKENS

    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/pretrain_world.py"), "--init", str(WEIGHTS_DIR),
                           "--work", str(tmp_path / "work"), "--out", str(out), "--steps", "2", "--batch", "4",
                           "--warmup", "1", "--threads", "1", "--train-text-encoder", "--text-lr-mult", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "pretrain.json").read_text())
    assert "--train-text-encoder --text-lr-mult 2.0" in meta["command"]
    base = WanAdapter.from_pretrained(WEIGHTS_DIR, device=torch.device("cpu"), max_sequence_length=MAX_TEXT_TOKENS)
    trained = WanAdapter.from_pretrained(out, device=torch.device("cpu"), max_sequence_length=MAX_TEXT_TOKENS)
    changed = [k for k, v in trained.text_encoder.state_dict().items()
               if not torch.equal(v, base.text_encoder.state_dict()[k])]
    assert "shared.weight" in changed and any(".layer." in k for k in changed), changed
    # Loaded for RL, the text encoder is frozen again.
    assert not any(p.requires_grad for p in trained.text_encoder.parameters())


@pytest.mark.parametrize("mix, message", [("squar=1", "unknown shape 'squar'"), ("square=x", "not a number"),
                                          ("square=0", "not all 0")])
def test_a_bad_shape_mix_is_one_line_naming_it(tmp_path, mix, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "tools/pretrain_world.py"), "--shape-mix", mix,
                           "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "--shape-mix" in last and message in last, proc.stderr
    assert not (tmp_path / "w").exists()


def test_shape_word_probe_tells_the_triangle_apart():
    """``shape_word_losses`` on held-out squares and circles: a triangle caption, no caption and
    the swapped word (square <-> circle) all cost more than the right word. The shipped model
    reads that swap since stage 5 trained at middle noise (13% at σ = 0.6; the four-stage model
    was within 2%)."""
    from flowdppo_video.models.wan import WanAdapter
    from flowdppo_video.world.diagnostics import shape_word_losses
    from flowdppo_video.world.model import MAX_TEXT_TOKENS

    adapter = WanAdapter.from_pretrained(WEIGHTS_DIR, device=torch.device("cpu"), max_sequence_length=MAX_TEXT_TOKENS)
    (loss,) = shape_word_losses(adapter, [0.6], n=64).values()
    assert set(loss) == {"right word", "swapped", "triangle", "no caption"}
    assert loss["triangle"] > loss["right word"] * 1.3, loss
    assert loss["no caption"] > loss["right word"] * 1.1, loss
    assert loss["swapped"] > loss["right word"] * 1.05, loss
