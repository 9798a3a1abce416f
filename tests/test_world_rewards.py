"""Shapes-world rewards: accurate on ground truth, low on corrupted videos, in their ranges."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rewards
from flowdppo_video.world import BACKGROUNDS, COLOURS, SHAPES, all_scenes, render_batch
from rewards import world

SEEDS = (0, 1, 2)
NAMES = ("world_colour", "world_shape", "world_direction", "world_smoothness", "world_adherence")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
PERPENDICULAR = {"left": "up", "right": "down", "up": "right", "down": "left"}
# Ground truth: accuracy of the discrete predictions on all 192 scenes, per seed.
MIN_ACCURACY = 0.95
MIN_SPEED_ACCURACY = 0.95


def rotate(values, current, k):
    values = list(values)
    return values[(values.index(current) + k) % len(values)]


SCENES = all_scenes()
PROMPTS = [s.prompt for s in SCENES]


@pytest.fixture(scope="module")
def truth() -> dict[int, torch.Tensor]:
    return {seed: torch.from_numpy(render_batch(SCENES, seed)) for seed in SEEDS}


def background_only() -> torch.Tensor:
    bg = np.array([BACKGROUNDS[s.background] for s in SCENES], dtype=np.uint8)[:, None, None, None, :]
    return torch.from_numpy(np.broadcast_to(bg, (len(SCENES), 8, 16, 16, 3)).copy())


def corrupted(kind: str, truth: torch.Tensor) -> torch.Tensor:
    """Videos that contradict ``PROMPTS`` in one way (or every way), from seed 0."""
    if kind == "wrong_colour":
        return torch.from_numpy(render_batch(
            [dataclasses.replace(s, colour=rotate(COLOURS, s.colour, 1)) for s in SCENES], 0))
    if kind.startswith("wrong_shape"):
        k = int(kind[-1])
        return torch.from_numpy(render_batch(
            [dataclasses.replace(s, shape=rotate(SHAPES, s.shape, k)) for s in SCENES], 0))
    if kind == "reversed":
        return truth.flip(1)
    if kind == "opposite":
        return torch.from_numpy(render_batch(
            [dataclasses.replace(s, direction=OPPOSITE[s.direction]) for s in SCENES], 0))
    if kind == "perpendicular":
        return torch.from_numpy(render_batch(
            [dataclasses.replace(s, direction=PERPENDICULAR[s.direction]) for s in SCENES], 0))
    if kind == "static":
        return truth[:, :1].expand_as(truth).contiguous()
    if kind == "noise":
        return torch.from_numpy(np.random.default_rng(0).integers(0, 256, truth.shape, dtype=np.uint8))
    if kind == "empty":
        return background_only()
    raise AssertionError(kind)


def criteria(videos: torch.Tensor) -> dict[str, torch.Tensor]:
    out = rewards.build_rewards(dict.fromkeys(NAMES, 1.0))
    scores, extras = rewards.score_videos(out, videos, PROMPTS, fps=8.0)
    return scores


# Per corruption: the maximum each reward may give any video, and the minimum mean of those the
# corruption leaves intact (the rewards must be specific, not just low on everything).
CORRUPTIONS = {
    "wrong_colour": ({"world_colour": 0.1, "world_adherence": 0.7}, ("world_shape", "world_direction")),
    "wrong_shape1": ({"world_shape": 0.1, "world_adherence": 0.7}, ("world_colour", "world_direction")),
    "wrong_shape2": ({"world_shape": 0.1, "world_adherence": 0.7}, ("world_colour", "world_direction")),
    "reversed": ({"world_direction": 0.05, "world_adherence": 0.7}, ("world_colour", "world_shape")),
    "opposite": ({"world_direction": 0.05, "world_adherence": 0.7}, ("world_colour", "world_shape")),
    "perpendicular": ({"world_direction": 0.1, "world_adherence": 0.7}, ("world_colour", "world_shape")),
    "static": ({"world_direction": 0.01, "world_adherence": 0.7},
               ("world_colour", "world_shape", "world_smoothness")),       # static is smooth by definition
    "noise": (dict.fromkeys(NAMES, 0.05), ()),
    "empty": (dict.fromkeys(NAMES, 1e-6), ()),
}


def assert_in_range(scores: dict[str, torch.Tensor], n: int) -> None:
    for name, s in scores.items():
        assert s.shape == (n,), name
        assert torch.isfinite(s).all(), name
        assert float(s.min()) >= 0.0 and float(s.max()) <= 1.0, (name, float(s.min()), float(s.max()))


@pytest.mark.parametrize("seed", SEEDS)
def test_ground_truth_accuracy(truth, seed):
    table = world.adherence_table(truth[seed], PROMPTS)
    assert table["n"] == len(SCENES) == 192
    for key in ("colour", "shape", "direction"):
        assert table[key] >= MIN_ACCURACY, (key, table)
    assert table["speed"] >= MIN_SPEED_ACCURACY, table
    preds = world.classify(truth[seed])
    assert all(p["present"] and p["moving"] for p in preds)


@pytest.mark.parametrize("seed", SEEDS)
def test_ground_truth_scores_high(truth, seed):
    scores = criteria(truth[seed])
    assert_in_range(scores, len(SCENES))
    for name in NAMES:
        assert float(scores[name].mean()) >= 0.95, (name, float(scores[name].mean()))
        assert float(scores[name].min()) >= 0.8, (name, float(scores[name].min()))


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruptions_score_low(truth, kind):
    videos = corrupted(kind, truth[0])
    scores = criteria(videos)
    assert_in_range(scores, len(SCENES))
    ceilings, intact = CORRUPTIONS[kind]
    for name, ceiling in ceilings.items():
        assert float(scores[name].max()) <= ceiling, (kind, name, float(scores[name].max()))
    for name in intact:
        assert float(scores[name].mean()) >= 0.9, (kind, name, float(scores[name].mean()))
    table = world.adherence_table(videos, PROMPTS)
    wrong = {"wrong_colour": ["colour"], "wrong_shape1": ["shape"], "wrong_shape2": ["shape"],
             "reversed": ["direction"], "opposite": ["direction"], "perpendicular": ["direction"],
             "static": ["direction"]}.get(kind, ["colour", "shape", "direction"])
    for key in wrong:
        assert table[key] <= 0.05, (kind, key, table)


def test_static_and_empty_predictions(truth):
    static = world.classify(corrupted("static", truth[0]))
    assert not any(p["moving"] for p in static) and all(p["direction"] is None for p in static)
    empty = world.classify(background_only())
    assert all(not p["present"] and p["colour"] is None and p["shape"] is None for p in empty)


def blur(videos: torch.Tensor, sigma: float) -> torch.Tensor:
    b, f, h, w, _ = videos.shape
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    x = videos.float().permute(0, 1, 4, 2, 3).reshape(-1, 1, h, w)
    x = F.pad(x, (3, 3, 3, 3), mode="replicate")
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, 7)), k.view(1, 1, 7, 1))
    return x.reshape(b, f, 3, h, w).permute(0, 1, 3, 4, 2).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("kind", ["blur0.8", "pixel_noise10", "upsampled2x", "half_contrast"])
def test_robust_to_generator_like_degradations(truth, kind):
    v = truth[1]
    if kind == "blur0.8":
        v = blur(v, 0.8)
    elif kind == "pixel_noise10":
        noise = np.random.default_rng(1).normal(0, 10, v.shape)
        v = torch.from_numpy(np.clip(v.numpy() + noise, 0, 255).round().astype(np.uint8))
    elif kind == "upsampled2x":
        v = v.repeat_interleave(2, 2).repeat_interleave(2, 3)
    elif kind == "half_contrast":
        v = ((v.float() + background_only().float()) / 2).round().to(torch.uint8)
    table = world.adherence_table(v, PROMPTS)
    for key in ("colour", "shape", "direction"):
        assert table[key] >= 0.9, (kind, key, table)
    assert_in_range(criteria(v), len(SCENES))


def test_empty_frames_in_a_video_lower_presence_not_correctness(truth):
    v = truth[0].clone()
    v[:, 1::2] = background_only()[:, 1::2]
    scores = criteria(v)
    assert_in_range(scores, len(SCENES))
    assert float(scores["world_adherence"].mean()) == pytest.approx(0.5, abs=0.05)
    table = world.adherence_table(v, PROMPTS)
    assert min(table["colour"], table["shape"], table["direction"]) >= 0.95


def test_plain_import_registers_the_world_rewards():
    code = "import rewards; print(sorted(n for n in rewards.REWARDS if n.startswith('world_')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted([*NAMES, "world_fidelity"]))


def test_registered_and_scored_through_the_registry(truth):
    for name in NAMES:
        assert name in rewards.REWARDS
    built = rewards.build_rewards({"world_adherence": 1.0, "world_smoothness": 0.5, "frame_change": 1.0})
    videos, prompts = truth[0][:32], PROMPTS[:32]
    scores, extras = rewards.score_videos(built, videos, prompts, fps=8.0)
    assert set(scores) == {"world_adherence", "world_smoothness", "frame_change"}
    for key in ("colour", "shape", "direction", "smoothness", "presence", "speed", "residual_rms"):
        assert extras[f"world_adherence/{key}"].shape == (32,), key
    adh = extras
    mean3 = (adh["world_adherence/colour"] + adh["world_adherence/shape"] + adh["world_adherence/direction"]) / 3
    assert torch.allclose(scores["world_adherence"], mean3)
    assert torch.allclose(scores["world_smoothness"], adh["world_adherence/smoothness"])
    # Deterministic.
    again, _ = rewards.score_videos(built, videos, prompts, fps=8.0)
    assert all(torch.equal(scores[k], again[k]) for k in scores)


def test_prompt_outside_the_grammar_is_a_clear_error(truth):
    videos = truth[0][:2]
    for name in NAMES:
        reward = rewards.build_rewards({name: 1.0})[name]
        with pytest.raises(ValueError, match="a purple circle moves left slowly on black"):
            reward(videos, [PROMPTS[0], "a purple circle moves left slowly on black"], fps=8.0)
        with pytest.raises(ValueError, match="a red dog"):
            reward(videos, [PROMPTS[0], "a red dog"], fps=8.0)
        with pytest.raises(ValueError, match="one prompt per video"):
            reward(videos, PROMPTS[:3], fps=8.0)
    with pytest.raises(ValueError, match="purple"):
        world.adherence_table(videos, ["a purple circle moves left slowly on black"] * 2)


def test_rewards_use_pixels_only(truth, monkeypatch):
    """The rewards never call the renderer (shape_mask templates are the world's definition)."""
    import flowdppo_video.world as world_pkg

    render_mod = sys.modules["flowdppo_video.world.render"]   # the package's `render` is the function

    def forbidden(*args, **kwargs):
        raise AssertionError("a reward called the renderer")

    world.shape_reference()                 # templates (shape_mask only) may be built beforehand
    for fn in ("render", "render_batch", "path"):
        monkeypatch.setattr(render_mod, fn, forbidden)
    for fn in ("render", "render_batch"):
        monkeypatch.setattr(world_pkg, fn, forbidden)
    assert_in_range(criteria(truth[2]), len(SCENES))
    world.classify(truth[2][:4])


def test_artifact_measurements_see_a_tinted_background_and_a_patch_grid(truth):
    """Clean renders read no artifacts; a black background lifted to ~28 reads a background error
    near 16 levels; a column pattern whose even and odd columns differ by 8 levels reads a grid
    energy of 4, and neither corruption changes the other measurement much."""
    clean = truth[0]
    m = world.artifact_measurements(clean, PROMPTS)
    assert m["background_error"].max() < 3.0 and m["grid_energy"].max() < 1.0
    black = np.array([s.background == "black" for s in SCENES])
    tinted = clean.clone()
    tinted[torch.from_numpy(black)] = (tinted[torch.from_numpy(black)].int() + 16).clamp(0, 255).to(torch.uint8)
    t = world.artifact_measurements(tinted, PROMPTS)
    assert np.all(np.abs(t["background_error"][black] - 16.0) < 2.0)
    assert np.all(t["background_error"][~black] < 3.0) and t["grid_energy"].max() < 1.0
    grid = clean.int().clone()
    grid[..., 0::2, :] += 4
    grid[..., 1::2, :] -= 4
    g = world.artifact_measurements(grid.clamp(0, 255).to(torch.uint8), PROMPTS)
    # (The border median falls on one phase of the pattern: up to its amplitude, 4, off.)
    assert np.all(np.abs(g["grid_energy"] - 4.0) < 0.5) and g["background_error"].max() < 4.5
    score = rewards.build_rewards({"world_fidelity": 1.0})["world_fidelity"]
    clean_s, grid_s = (score(clean, PROMPTS, fps=8.0)["score"],
                       score(grid.clamp(0, 255).to(torch.uint8), PROMPTS, fps=8.0)["score"])
    assert float(clean_s.min()) > 0.95 and float(grid_s.max()) < 0.75
