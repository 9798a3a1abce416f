"""The latent world: its grammar and split, its renderer, and its checkers against rendered ground truth."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from flowdppo_video.runs.resources import resolve
from flowdppo_video.world.latent import FRAMES, SIZE, render_batch
from rewards.latent_checks import adherence_table, artifact_measurements, classify, criteria
from rewards.latent_world import (BACKGROUND_NAMES, SHAPES, LatentScene, draw_scene, is_held_out, object_area,
                                  parse_prompt, split_scenes, vocabulary)

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@pytest.fixture(scope="module")
def held_out_videos() -> tuple[list[LatentScene], np.ndarray]:
    rng = random.Random(7)
    scenes = [draw_scene(rng, held_out=True) for _ in range(32)]
    return scenes, render_batch(scenes, seed=7)


def test_grammar_round_trips_and_refuses_what_it_does_not_speak():
    rng = random.Random(0)
    for _ in range(50):
        s = draw_scene(rng)
        assert parse_prompt(s.prompt) == s
    two = "a red circle moves left slowly and a blue square moves up quickly on dusk"
    assert [t.colour for t in parse_prompt(two).things] == ["red", "blue"]
    for bad in ("a red circle moves left slowly on black",           # a shapes-world background
                "a red circle moves left slowly or a blue square moves up quickly on dusk",
                "a red circle moves left slowly and a red square moves up quickly on dusk"):
        with pytest.raises(ValueError, match="prompt"):
            parse_prompt(bad)
    assert set(vocabulary()) >= {"and", *BACKGROUND_NAMES, *SHAPES}


def test_split_holds_out_a_fifth_with_every_word_on_both_sides_and_the_prompt_files_follow_it():
    train, held = split_scenes(1)
    assert 0.15 < len(held) / (len(train) + len(held)) < 0.25
    words = lambda scenes: {w for s in scenes for w in s.prompt.split()}
    assert words(train) == words(held)
    train_file = open(resolve("builtin:latent-prompts/train.txt")).read().split("\n")
    held_file = open(resolve("builtin:latent-prompts/heldout.txt")).read().split("\n")
    train_file, held_file = [p for p in train_file if p], [p for p in held_file if p]
    assert not any(is_held_out(p) for p in train_file) and all(is_held_out(p) for p in held_file)
    assert any(" and " in p for p in held_file) and any(" and " not in p for p in held_file)


def test_objects_are_small_and_the_video_has_wans_frame_count(held_out_videos):
    scenes, videos = held_out_videos
    assert videos.shape == (32, FRAMES, SIZE, SIZE, 3) and (FRAMES - 1) % 4 == 0
    assert max(object_area(s) for s in SHAPES) <= SIZE * SIZE / 10          # each object under a tenth


def test_checkers_read_rendered_ground_truth(held_out_videos):
    scenes, videos = held_out_videos
    prompts = [s.prompt for s in scenes]
    table = adherence_table(videos, prompts)
    assert table["colour"] == 1.0 and table["direction"] == 1.0 and table["speed"] == 1.0
    assert table["shape"] >= 0.98
    c = criteria(videos, prompts)
    assert c["direction"].mean() > 0.97 and c["colour"].mean() > 0.97
    # The opposite direction word scores nothing; a wrong shape word little.
    flipped = [LatentScene(tuple(dataclasses.replace(t, direction=OPPOSITE[t.direction]) for t in s.things),
                           s.background).prompt for s in scenes]
    assert criteria(videos, flipped)["direction"].max() < 0.05
    swap = {"circle": "square", "square": "triangle", "triangle": "circle"}
    reshaped = [LatentScene(tuple(dataclasses.replace(t, shape=swap[t.shape]) for t in s.things),
                            s.background).prompt for s in scenes]
    assert criteria(videos, reshaped)["shape"].mean() < 0.2
    # A video with its objects painted out has none present.
    empty = render_batch([LatentScene((), s.background) for s in scenes[:4]], seed=0)
    assert not any(p["present"] for row in classify(empty, prompts[:4]) for p in row)


def test_fidelity_sees_a_drifted_background_and_a_patch_grid(held_out_videos):
    scenes, videos = held_out_videos
    prompts = [s.prompt for s in scenes[:8]]
    clean = artifact_measurements(videos[:8], prompts)
    assert clean["background_error"].max() < 1.0 and clean["grid_energy"].max() < 0.3
    drifted = np.clip(videos[:8].astype(np.int16) + 20, 0, 255).astype(np.uint8)
    assert np.allclose(artifact_measurements(drifted, prompts)["background_error"], 20, atol=2)
    grid = videos[:8].astype(np.int16)
    grid[:, :, ::16, :] += 12                             # a seam every 16 px: the patch period
    grid[:, :, :, ::16] += 12
    assert artifact_measurements(np.clip(grid, 0, 255).astype(np.uint8), prompts)["grid_energy"].min() > 1.0


def test_the_recipe_runs_a_full_iteration_with_the_vae_in_the_loop(tmp_path):
    """configs/latent_world.yaml end to end at a tiny size, on the shipped weights loaded through the
    ordinary model.path: rollout through the AutoencoderKLWan decode, the checkers as rewards, the
    update, the held-out evaluation with the fidelity measurements."""
    import json

    from flowdppo_video.runs.config import load_config
    from flowdppo_video.trainer import Trainer

    held = open(resolve("builtin:latent-prompts/heldout.txt")).read().split("\n")
    cfg = load_config(ROOT_CONFIG, [
        f"run.output_dir={tmp_path / 'run'}", "run.iterations=1", "run.progress=false",
        "run.sample_every=100", "run.checkpoint_every=100", "run.report_every=0", "run.tensorboard=false", "video.num_frames=5", "video.height=32",
        "video.width=32", "data.prompts_per_iteration=1", "data.group_size=2", "optim.minibatch_size=2",
        "eval.samples_per_prompt=1", "eval.every=1", f"eval.prompts=[{held[0]}, {held[-2]}]"])
    trainer = Trainer(cfg)
    adapter = trainer.adapter                       # the shipped model: Wan 2.1's geometry, D = 64
    assert adapter.latent_shape(FRAMES, SIZE, SIZE) == (16, 5, 8, 8) and trainer.elements_per_token == 64
    assert adapter.patch_size == (1, 2, 2) and type(adapter.vae).__name__ == "AutoencoderKLWan"
    try:
        trainer.run()
    finally:
        trainer.close()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "reward/latent_direction/mean" in row and row["videos/nonfinite"] == 0
    final = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])
    assert final["eval/latent_fidelity/grid_energy/mean"] >= 0 and "eval/kl_base/mean" in final


ROOT_CONFIG = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "latent_world.yaml"


def test_eval_record_keeps_the_held_out_numbers_beside_the_stages(tmp_path):
    """tools/eval_latent_world.py --record writes what the weights can do into the folder's pretrain.json,
    keeping every stage's command, and names a folder without one."""
    import json
    import sys

    sys.path.insert(0, str(ROOT_CONFIG.parents[1] / "tools"))
    try:
        import eval_latent_world
    finally:
        sys.path.pop(0)
    (tmp_path / "pretrain.json").write_text(json.dumps({"command": "stage 3", "init": {"command": "stage 2"}}))
    res = {"samples_per_prompt": 4, "prompts": 48, "steps": 10, "folder": "x", "state": None,
           "by_seed": {"0": {"direction": 0.25}}, "ground_truth_through_vae": {"direction": 1.0}}
    eval_latent_world.record(tmp_path, res)
    rec = json.loads((tmp_path / "pretrain.json").read_text())
    assert rec["command"] == "stage 3" and rec["init"] == {"command": "stage 2"}
    assert rec["heldout"]["by_seed"]["0"]["direction"] == 0.25 and "folder" not in rec["heldout"]
    with pytest.raises(SystemExit, match="pretrain.json not found"):
        eval_latent_world.record(tmp_path / "missing", res)


def test_the_direction_word_probe_compares_captions_on_the_same_videos_and_noise():
    """latent_diagnostics.direction_word_losses: four captions per noise level on one batch of encoded
    held-out videos; deterministic per seed; the empty caption is a different conditioning."""
    import math

    import torch

    from flowdppo_video.world.latent import build_latent_adapter
    from flowdppo_video.world.latent_diagnostics import direction_word_losses, direction_word_losses_by_region

    torch.manual_seed(0)
    adapter = build_latent_adapter(torch.device("cpu"), seed=0)
    a = direction_word_losses(adapter, [0.9, 0.5], n=4, seed=3)
    b = direction_word_losses(adapter, [0.9, 0.5], n=4, seed=3)
    assert a == b and set(a) == {0.9, 0.5}
    for row in a.values():
        assert set(row) == {"right word", "opposite", "other axis", "no caption"}
        assert all(math.isfinite(v) and v > 0 for v in row.values())
        assert row["no caption"] != row["right word"]
    # On the objects' cells alone: another weighting of the same squared errors, and both regions
    # from one set of forward passes give the same numbers as one region at a time.
    obj = direction_word_losses(adapter, [0.9, 0.5], n=4, seed=3, objects_only=True)
    assert set(obj) == {0.9, 0.5} and obj[0.9]["right word"] != a[0.9]["right word"]
    assert direction_word_losses_by_region(adapter, [0.9, 0.5], n=4, seed=3) == {"video": a, "objects": obj}
    # ... and the objects' number is the weighted flow loss computed on its own (one region, one pass).
    import random

    from rewards.latent_world import draw_scene
    from flowdppo_video.world.latent_diagnostics import encode_scenes, object_cells
    from flowdppo_video.world.model import flow_matching_loss

    rng = random.Random(3)
    scenes = [draw_scene(rng, held_out=True, two_object_share=0.0) for _ in range(4)]
    x0, cover = encode_scenes(adapter.vae, scenes, 3)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        alone = flow_matching_loss(adapter, x0, eps, torch.full((4,), 0.9), adapter.embed_text([s.prompt for s in scenes]),
                                   object_cells(cover))
    assert math.isclose(float(alone), obj[0.9]["right word"], rel_tol=1e-5)


def test_the_objects_cover_lands_on_the_vaes_latent_grid():
    """latent_object_cover: frame 0 alone, then groups of 4 frames; 8x8-pixel cells; grown by a cell."""
    import torch

    from flowdppo_video.world.latent import latent_object_cover
    from flowdppo_video.world.model import flow_matching_loss

    cover = torch.zeros(1, 17, 64, 64)
    cover[0, 0, 0:3, 0:3] = 1.0                 # frame 0, top-left cell
    cover[0, 7, 40:41, 60:62] = 0.5             # a frame of the second group (5-8), cell (5, 7)
    got = latent_object_cover(cover, grow=0)
    assert got.shape == (1, 1, 5, 8, 8)
    assert got[0, 0, 0, 0, 0] == 1 and got[0, 0, 2, 5, 7] == 0.5 and got.sum() == 1.5
    grown = latent_object_cover(cover, grow=1)
    assert grown[0, 0, 0, :2, :2].eq(1).all() and grown[0, 0, 0].sum() == 4          # clipped at the corner
    assert grown[0, 0, 2, 4:7, 6:8].eq(0.5).all() and grown[0, 0, 1].sum() == 0
    with pytest.raises(ValueError, match="does not fit the VAE's grid"):
        latent_object_cover(torch.zeros(1, 16, 64, 64))

    # A 0/1 weight is the loss of that region alone.
    class Zero:
        def velocity(self, x, sigma, text):
            return torch.zeros_like(x)

    x0, eps = torch.zeros(1, 2, 5, 8, 8), torch.zeros(1, 2, 5, 8, 8)
    eps[:, :, 0, 0, 0] = 2.0
    w = torch.zeros(1, 1, 5, 8, 8)
    w[:, :, 0, 0, 0] = 1.0
    loss = flow_matching_loss(Zero(), x0, eps, torch.ones(1), None, w)
    assert float(loss) == 4.0 and float(flow_matching_loss(Zero(), x0, eps, torch.ones(1), None)) == pytest.approx(8.0 / 640)


def test_the_recipe_is_the_default_recipe_in_the_latent_world():
    """configs/latent_world.yaml trains exactly as the shapes world's default recipe (so what transfers can
    be read off); only the world's own keys differ: the model, prompts, video, rewards and evaluation."""
    from flowdppo_video.commands.cli import DEFAULT_RECIPE
    from flowdppo_video.runs.config import load_config

    latent, default = load_config(ROOT_CONFIG, []), load_config(DEFAULT_RECIPE, [])
    for section in ("sampler", "objective", "optim", "data.prompts_per_iteration", "data.group_size",
                    "model.lora", "model.base_below", "run.iterations"):
        a, b = latent, default
        for key in section.split("."):
            a, b = getattr(a, key), getattr(b, key)
        assert a == b, section
    assert latent.model.path == "builtin:weights/latent-world" and latent.rewards == {"latent_direction": 1.0}


def test_pretraining_weights_the_objects_and_fills_in_an_old_caches_covers(tmp_path, monkeypatch, capsys):
    """tools/pretrain_latent_world.py: the cache keeps the objects' coverage beside the latents (a cache
    from before it gets the same coverage by rendering again), and --object-weight trains on the
    weighted loss, recorded in the stage's command."""
    import json
    import subprocess
    import sys

    import torch

    tools = ROOT_CONFIG.parents[1] / "tools"
    vae = resolve("builtin:weights/latent-world")
    cache = tmp_path / "cache.pt"
    cmd = [sys.executable, str(tools / "pretrain_latent_world.py"), "--vae", str(vae), "--cache", str(cache),
           "--cache-size", "16", "--batch", "4", "--steps", "2", "--warmup", "1", "--save-every", "1",
           "--object-weight", "4", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = torch.load(cache, weights_only=False)
    covers = torch.cat(built["covers"])
    assert covers.shape == (16, 1, 5, 8, 8) and 0.02 < float((covers > 0).float().mean()) < 0.5
    assert "--object-weight 4.0" in json.loads((tmp_path / "out" / "pretrain.json").read_text())["command"]

    sys.path.insert(0, str(tools))
    try:
        import pretrain_latent_world
    finally:
        sys.path.remove(str(tools))
    del built["covers"]
    torch.save(built, cache)
    again = pretrain_latent_world.build_cache(None, cache, 16, built["seed"])     # nothing left to encode
    assert torch.equal(again["covers"], covers)

    # --export writes a stage's EMA weights as a folder, without a cache or training; --steps 0 is refused.
    from flowdppo_video.world.latent import load_latent_adapter
    from flowdppo_video.world.model import world_modules

    base = [sys.executable, str(tools / "pretrain_latent_world.py"), "--vae", str(vae), "--cache",
            str(tmp_path / "none.pt"), "--work", str(tmp_path / "w2")]
    exported = tmp_path / "exported"
    proc = subprocess.run([*base, "--init", str(tmp_path / "work" / "state.pt"), "--export", "--out", str(exported)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "none.pt").exists() and not (tmp_path / "w2").exists()
    ema = torch.load(tmp_path / "work" / "state.pt", weights_only=False)["ema"]
    loaded = world_modules(load_latent_adapter(exported)).state_dict()
    assert loaded.keys() == ema.keys() and all(torch.equal(loaded[k], ema[k]) for k in ema)
    rec = json.loads((exported / "pretrain.json").read_text())
    assert rec["steps"] == 2 and rec["exported_from"].endswith("state.pt") and rec["vae"] is not None
    monkeypatch.setattr(sys, "argv", [*base[1:], "--steps", "0"])
    with pytest.raises(SystemExit) as exit_:
        pretrain_latent_world.main()
    assert exit_.value.code == 2 and "--steps 0: must be at least 1" in capsys.readouterr().err
