"""clip_alignment: a tiny random CLIP saved to a directory and loaded back, end to end."""

from __future__ import annotations

import pytest
import torch

import rewards
from rewards.clip import ClipAlignment, frame_indices
from rewards.registry import RewardError

from .tiny_vlm import build_tiny_clip

PROMPTS = ["a red circle moves left", "a cat", "the black dog runs quickly in the park"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def _videos(b: int = 3, f: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, f, 40, 48, 3), generator=g, dtype=torch.uint8)


def test_scores_in_range_and_batch_invariant(clip_dir) -> None:
    built = rewards.build_rewards({"align": {"type": "clip_alignment", "model": str(clip_dir), "device": "cpu",
                                             "frames": 3, "batch_size": 3}})
    scores, extras = rewards.score_videos(built, _videos(), PROMPTS, fps=8.0)
    s = scores["align"]
    assert s.shape == (3,) and ((s > 0) & (s < 1)).all() and len(set(s.tolist())) == 3
    assert torch.allclose(s, (extras["align/cosine"] + 1) / 2, atol=1e-6)            # a mean of (cos+1)/2
    one = ClipAlignment(str(clip_dir), device="cpu", frames=3, batch_size=1)(_videos(), PROMPTS, fps=8.0)["score"]
    assert torch.allclose(one, s, atol=1e-5, rtol=0)


def test_score_equals_manual_computation(clip_dir) -> None:
    from transformers import CLIPModel

    reward = ClipAlignment(str(clip_dir), device="cpu", frames=3)
    videos = _videos(2, seed=1)
    got = reward(videos, PROMPTS[:2], fps=8.0)["score"]
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    for i in range(2):
        frames = [videos[i, j].numpy() for j in (0, 4, 7)]                           # first, middle, last of 8
        with torch.no_grad():
            out = model(**reward.processor(text=[PROMPTS[i]], images=frames, return_tensors="pt", padding=True))
            # logits_per_image = exp(logit_scale) * cos(image_j, text)
            cos = out.logits_per_image[:, 0] / model.logit_scale.exp()
        assert abs(float(((cos + 1) / 2).mean()) - float(got[i])) < 1e-5


def test_frame_sampling_and_bad_input(clip_dir, tmp_path) -> None:
    assert frame_indices(8, 3) == [0, 4, 7] and frame_indices(2, 4) == [0, 1]
    with pytest.raises(RewardError, match=r"model must be a local checkpoint directory with config.json"):
        ClipAlignment(str(tmp_path))
    with pytest.raises(RewardError, match=r"frames must be a positive integer, got 0"):
        ClipAlignment(str(clip_dir), frames=0)
    with pytest.raises(RewardError, match=r"got 1 prompts for 2 videos"):
        ClipAlignment(str(clip_dir), device="cpu")(_videos(2), ["a cat"], fps=8.0)
