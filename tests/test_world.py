"""The shapes world: grammar, split, and ground-truth generator."""

from __future__ import annotations

import numpy as np
import pytest

from flowdppo_video.runs.data import load_prompts
from flowdppo_video.world import (COLOURS, DIRECTIONS, SHAPES, Scene, all_scenes, parse_prompt, render,
                                  render_batch, split_scenes)
from flowdppo_video.world.render import RADIUS, SIZE, path


def test_generator_is_deterministic_per_seed():
    scenes = all_scenes()[:12]
    a, b = render_batch(scenes, seed=3), render_batch(scenes, seed=3)
    c = render_batch(scenes, seed=4)
    assert a.shape == (12, 8, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)                      # start positions differ with the seed


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_shape_moves_as_described_and_stays_in_frame(direction):
    scene = Scene("red", "square", direction, "quickly", "black")
    rng = np.random.default_rng(0)
    for _ in range(20):
        track = path(scene, rng)
        step = np.diff(track, axis=0)
        ux, uy = DIRECTIONS[direction]
        assert np.allclose(step, [1.3 * ux, 1.3 * uy])
        assert track.min() >= RADIUS and track.max() <= SIZE - RADIUS
    video = render(scene, np.random.default_rng(1))
    fg = (video.astype(int) - np.array([12, 12, 12])).sum(-1) > 100   # foreground pixels per frame
    assert fg.sum(axis=(1, 2)).min() >= 10                                # the shape is in every frame


def test_grammar_round_trip_and_errors():
    for s in all_scenes():
        assert parse_prompt(s.prompt) == s
    assert len(all_scenes()) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) * 2 * 2
    with pytest.raises(ValueError, match="a purple circle"):
        parse_prompt("a purple circle moves left slowly on black")
    with pytest.raises(ValueError, match="not of the form"):
        parse_prompt("a red circle")


def test_split_is_fixed_disjoint_and_covers_every_word():
    train, held = split_scenes()
    assert split_scenes() == (train, held)
    assert not set(train) & set(held) and len(train) + len(held) == len(all_scenes())
    for field in ("colour", "shape", "direction", "speed", "background"):
        assert {getattr(s, field) for s in held} == {getattr(s, field) for s in train}


def test_shipped_prompt_files_match_the_split():
    train, held = split_scenes()
    assert load_prompts("builtin:prompts/train.txt") == [s.prompt for s in train]
    assert load_prompts("builtin:prompts/heldout.txt") == [s.prompt for s in held]


def test_position_channels_round_trip_and_reach_the_transformer(tmp_path):
    """The world model's transformer also sees absolute (frame, row, column) channels and the
    products frame x row, frame x column: they survive save_pretrained/from_pretrained, span
    [-1, 1] per axis, and the transformer reads them."""
    import json

    import torch

    from flowdppo_video.models import ModelError
    from flowdppo_video.models.wan import WanAdapter
    from flowdppo_video.world.model import MAX_TEXT_TOKENS, build_world_adapter

    ad = build_world_adapter(torch.device("cpu"), seed=1)
    assert ad.position_channels == 5 and ad.transformer.config.in_channels == 8
    x = torch.randn(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    text = ad.encode_prompts(["a red circle moves left slowly on black"] * 2)
    with torch.no_grad():
        v = ad.velocity(x, sigma, text)
        ad.save_pretrained(tmp_path / "m")
        assert json.loads((tmp_path / "m" / "model_index.json").read_text())["position_channels"] == 5
        again = WanAdapter.from_pretrained(tmp_path / "m", device=torch.device("cpu"),
                                           max_sequence_length=MAX_TEXT_TOKENS)
        assert again.position_channels == 5
        assert torch.allclose(again.velocity(x, sigma, text), v, atol=1e-6)
        grid = ad.position_grid(x)            # (B, 5, F, H, W): frame, row, column, frame*row, frame*column
        assert grid.shape == (2, 5, 8, 16, 16)
        assert torch.equal(grid[:, 3], grid[:, 0] * grid[:, 1]) and torch.equal(grid[:, 4], grid[:, 0] * grid[:, 2])
        assert grid[0, :3, 0, 0, 0].tolist() == [-1.0, -1.0, -1.0] and grid[0, :3, -1, -1, -1].tolist() == [1.0, 1.0, 1.0]
        assert torch.equal(grid[0, 0, 3], torch.full((16, 16), grid[0, 0, 3, 0, 0].item()))  # frame index only
        # The transformer reads them: zeroing their input weights changes the velocity.
        ad.transformer.patch_embedding.weight[:, 3:] = 0
        assert (ad.velocity(x, sigma, text) - v).abs().max() > 1e-4
    with pytest.raises(ModelError, match=r"in_channels 8 != vae z_dim 3$"):
        WanAdapter(ad.transformer, ad.vae, ad.text_encoder, ad.tokenizer, device=torch.device("cpu"),
                   dtype=torch.float32, max_sequence_length=MAX_TEXT_TOKENS)
