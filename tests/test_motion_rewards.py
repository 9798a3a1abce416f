"""Optical-flow motion rewards on synthetic videos with known motion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rewards
from rewards.motion import FlowEstimator, analyse_motion, video_flow
from rewards.registry import RewardError

F, H, W = 6, 64, 64


def _texture(h: int, w: int, seed: int = 0, cell: int = 4) -> np.ndarray:
    """A smooth random colour texture (h, w, 3) uint8: structure at every scale flow can lock on to."""
    import cv2

    t = np.random.default_rng(seed).random((h // cell + 2, w // cell + 2, 3)).astype(np.float32)
    return (cv2.resize(t, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1) * 255).astype(np.uint8)


def _sliding(k: int, frames: int = F, seed: int = 0, order: list[int] | None = None) -> np.ndarray:
    """A window sliding ``k`` px a frame to the right over a texture: the content moves ``k`` px left."""
    big = _texture(H, W + frames * k + 1, seed)
    xs = [t * k for t in (order if order is not None else range(frames))]
    return np.stack([big[:, x:x + W] for x in xs])


def _batch(*videos: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(videos))


STATIC = np.repeat(_texture(H, W, 1)[None], F, axis=0)
NOISE = np.random.default_rng(2).integers(0, 256, (F, H, W, 3), dtype=np.uint8)


@pytest.mark.parametrize("flow", ["dis", "farneback"])
def test_measured_flow_matches_the_shift(flow: str) -> None:
    flows = video_flow(_batch(*(_sliding(k) for k in (1, 2, 3))), flow=flow)       # (3, F-1, h, w, 2)
    assert flows.shape[:2] == (3, F - 1)
    for i, k in enumerate((1, 2, 3)):
        mag = np.linalg.norm(flows[i], axis=-1).mean()
        dx, dy = flows[i, ..., 0].mean(), flows[i, ..., 1].mean()
        assert abs(mag - k) < 0.1 * k, (flow, k, mag)
        assert abs(dx + k) < 0.1 * k and abs(dy) < 0.05, (flow, k, dx, dy)   # content moves left
    # the dynamic_degree reward reports the same magnitude, in original pixels a frame
    out = rewards.build_rewards({"dynamic_degree": {"weight": 1.0, "flow": flow}})["dynamic_degree"](
        _batch(_sliding(2)), [""], fps=8.0)
    assert abs(float(out["flow_px"][0]) - 2.0) < 0.2


def test_static_video_has_no_motion_and_loses() -> None:
    m = analyse_motion(_batch(STATIC), FlowEstimator(), fps=8)
    assert m.flow_px[0] < 0.01 and m.dynamic_degree[0] == 0.0
    assert m.smoothness[0] > 0.99 and m.flicker_score[0] > 0.99
    assert m.motion_quality[0] < 0.01


def test_noise_is_neither_smooth_nor_flicker_free() -> None:
    m = analyse_motion(_batch(NOISE), FlowEstimator(), fps=8)
    assert m.dynamic_degree[0] > 0.5                       # noise "moves"...
    assert m.smoothness[0] < 0.2 and m.flicker_score[0] < 0.1   # ...but inconsistently, unexplained by flow
    assert m.residual[0] > 0.1


def test_smooth_motion_beats_static_noise_jitter_and_flicker() -> None:
    smooth = _sliding(2)
    jitter = _sliding(2, order=[0, 1, 0, 1, 0, 1])         # back and forth: consistent pairs, no smooth path
    pumping = (STATIC.astype(np.float32) * np.array([1.0, 0.75] * 3)[:, None, None, None]).astype(np.uint8)
    built = rewards.build_rewards({"motion_quality": 1.0, "motion_smoothness": 1.0, "temporal_flicker": 1.0,
                                   "dynamic_degree": 1.0})
    scores, extras = rewards.score_videos(built, _batch(smooth, STATIC, NOISE, jitter, pumping), [""] * 5, fps=8.0)
    q = scores["motion_quality"]
    assert q[0] > 0.9 and (q[0] > q[1:] + 0.5).all(), q
    assert scores["motion_smoothness"][0] > 0.95 and scores["motion_smoothness"][3] < 0.1   # jitter
    assert scores["temporal_flicker"][0] > 0.9 and scores["temporal_flicker"][4] < 0.3      # brightness pumping
    assert scores["dynamic_degree"][4] == 0.0                                               # ...is not motion
    # motion_quality is the geometric mean of the three rewards, and logs them
    expect = (scores["dynamic_degree"] * scores["motion_smoothness"] * scores["temporal_flicker"]) ** (1 / 3)
    assert torch.allclose(q, expect, atol=1e-5)
    assert torch.allclose(extras["motion_quality/smoothness"], scores["motion_smoothness"])
    for s in scores.values():
        assert ((s >= 0) & (s <= 1)).all()


def test_speed_is_per_second_and_resolution_free() -> None:
    import cv2

    small = _sliding(1, frames=4)
    large = np.stack([cv2.resize(f, (2 * W, 2 * H), interpolation=cv2.INTER_CUBIC) for f in small])  # 2 px/frame
    m8 = analyse_motion(_batch(small), FlowEstimator(), fps=8)
    m16 = analyse_motion(_batch(small), FlowEstimator(), fps=16)
    big = analyse_motion(torch.from_numpy(large[None]), FlowEstimator(), fps=8)
    assert abs(m8.speed[0] - 1 / 64 * 8) < 0.015                         # 1 px of a 64 px side, 8 times a second
    assert abs(m16.speed[0] - 2 * m8.speed[0]) < 1e-5
    assert abs(big.speed[0] - m8.speed[0]) < 0.1 * m8.speed[0] and abs(big.flow_px[0] - 2.0) < 0.2
    assert 0 < m8.dynamic_degree[0] < 1 and m16.dynamic_degree[0] == 1.0   # 0.125 short sides/s is slow


def test_shapes_world_ground_truth_is_smoother_than_its_shuffle() -> None:
    from flowdppo_video.world.grammar import all_scenes
    from flowdppo_video.world.render import render_batch

    gt = render_batch(all_scenes()[::24], seed=0)                  # (8, 8, 16, 16, 3), constant velocity
    shuffled = np.ascontiguousarray(gt[:, [0, 2, 1, 3, 2, 4, 3, 5]])
    a = analyse_motion(torch.from_numpy(gt), FlowEstimator(), fps=8)
    b = analyse_motion(torch.from_numpy(shuffled), FlowEstimator(), fps=8)
    assert a.dynamic_degree.min() > 0.9 and a.smoothness.mean() > 0.7
    assert (a.smoothness > b.smoothness).all() and b.smoothness.mean() < 0.1


def test_single_frame_video() -> None:
    out = rewards.build_rewards({"motion_quality": 1.0})["motion_quality"](_batch(STATIC[:1]), [""], fps=8.0)
    assert float(out["score"][0]) == 0.0 and float(out["smoothness"][0]) == 1.0


@pytest.mark.parametrize("entry, message", [
    ({"type": "motion_quality", "flow": "lucas"}, r"^motion_quality: option flow='lucas' is not a flow backend; "
                                                  r"choose one of dis, farneback, raft$"),
    ({"type": "dynamic_degree", "size": 8}, r"^dynamic_degree: option size .* got 8$"),
    ({"type": "dynamic_degree", "top": 2}, r"^dynamic_degree: option top .* got 2$"),
    ({"type": "temporal_flicker", "scale": -1}, r"^temporal_flicker: option scale must be a positive number, got -1$"),
    ({"type": "motion_smoothness", "flow": "dis", "raft_weights": "w.pt"}, r"option raft_weights is only used"),
    ({"type": "dynamic_degree", "speed": 3}, r"rewards.m: reward 'dynamic_degree' takes options .*got \['speed'\]$"),
    # fps was an option; the real rate now comes with every call, and the error says so
    ({"type": "motion_quality", "fps": 16}, r"got \['fps'\] \(fps is not an option: rewards receive the videos' "
                                             r"real frame rate, video.fps in training, each file's own in score\)$"),
])
def test_bad_options_are_one_line_errors(entry: dict, message: str) -> None:
    with pytest.raises(RewardError, match=message) as e:
        rewards.build_rewards({"m": entry})
    assert "\n" not in str(e.value)


def test_raft_needs_torchvision_and_local_weights(tmp_path) -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(RewardError, match=r"flow='raft' needs torchvision, which is not installed"):
            rewards.build_rewards({"motion_quality": {"flow": "raft", "raft_weights": str(tmp_path / "raft.pt")}})
    else:
        with pytest.raises(RewardError, match=r"flow='raft' needs raft_weights.*missing\.pt"):
            rewards.build_rewards({"motion_quality": {"flow": "raft", "raft_weights": str(tmp_path / "missing.pt")}})


def test_wrong_video_shape_is_named() -> None:
    fn = rewards.build_rewards({"dynamic_degree": 1.0})["dynamic_degree"]
    with pytest.raises(RewardError, match=r"\(B, F, H, W, 3\) uint8 videos, got \(6, 64, 64, 3\)"):
        fn(torch.from_numpy(STATIC), [""], fps=8.0)
