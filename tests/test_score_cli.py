"""``flowdppo-video score`` on real video files: mp4 (av), gif (PIL), a corrupt file, prompt matching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import rewards
from flowdppo_video.commands.cli import main
from flowdppo_video.runs.video import read_video, video_fps, write_video

from .conftest import score_rows, write_lossless

F = 6


def _moving(h: int, w: int, k: int, seed: int) -> np.ndarray:
    """A coarse random texture seen through a window sliding ``k`` px a frame: (F, h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    big = np.kron(rng.integers(0, 256, (h // 4 + 1, (w + F * k) // 4 + 2, 3)), np.ones((4, 4, 1))).astype(np.uint8)
    return np.stack([big[:h, t * k:t * k + w] for t in range(F)])


def _write_gif(path: Path, frames: np.ndarray) -> None:
    from PIL import Image

    imgs = [Image.fromarray(f) for f in frames]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=125, loop=0)


@pytest.fixture
def video_dir(tmp_path: Path) -> Path:
    d = tmp_path / "videos"
    rng = np.random.default_rng(0)
    write_video(d / "a_moving.mp4", _moving(32, 32, 2, 1))
    write_video(d / "b_static.mp4", np.repeat(_moving(32, 32, 0, 2)[:1], F, axis=0))
    write_video(d / "c_noise.mp4", rng.integers(0, 256, (F, 32, 32, 3), dtype=np.uint8))
    write_video(d / "d_wide.mp4", _moving(24, 40, 1, 3))              # another shape: its own batch
    _write_gif(d / "e_moving.gif", _moving(32, 32, 3, 4))
    (d / "f_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))   # an mp4 header, then nothing
    (d / "notes.md").write_text("not a video\n")
    (d / "prompts.txt").write_text("".join(f"prompt {i}\n" for i in range(6)))
    return d


def test_scores_match_in_process_rewards_and_skip_the_broken_file(video_dir: Path, capsys) -> None:
    rc = main(["score", str(video_dir), "--reward", "frame_change", "--reward", "motion_quality=0.5",
               "--batch-size", "2"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    broken = [ln for ln in cap.err.splitlines() if "f_broken.mp4" in ln]
    assert len(broken) == 1 and "cannot read" in broken[0]
    assert broken[0].startswith("flowdppo-video: warning: skipping ")
    out = video_dir / "scores"                                       # the default: beside the videos
    csv_rows, jsonl_rows = score_rows(out)
    names = ["a_moving.mp4", "b_static.mp4", "c_noise.mp4", "d_wide.mp4", "e_moving.gif"]
    assert [Path(r["file"]).name for r in jsonl_rows] == names
    assert [r["file"] for r in csv_rows] == [r["file"] for r in jsonl_rows]
    # prompts.txt: line i belongs to the folder's i-th video file by name, the broken one included
    assert [r["prompt"] for r in jsonl_rows] == [f"prompt {i}" for i in range(5)]

    built = rewards.build_rewards({"frame_change": 1.0, "motion_quality": 0.5})
    # each file at its own frame rate: write_video's default 8 fps; the gif's 125 ms frames are 12 cs
    assert [r["fps"] for r in jsonl_rows] == [8.0] * 4 + [pytest.approx(100 / 12)]
    for c, j in zip(csv_rows, jsonl_rows):
        video = torch.from_numpy(read_video(j["file"]))[None]
        assert j["fps"] == video_fps(j["file"])
        scores, extras = rewards.score_videos(built, video, [j["prompt"]], fps=j["fps"])
        for name in ("frame_change", "motion_quality"):
            assert j[name] == pytest.approx(float(scores[name][0]), abs=1e-6)
            assert float(c[name]) == j[name]                        # the CSV holds the same numbers
        assert j["total"] == pytest.approx(j["frame_change"] + 0.5 * j["motion_quality"], abs=1e-9)
        assert j["motion_quality/smoothness"] == pytest.approx(float(extras["motion_quality/smoothness"][0]), abs=1e-6)
    by = {Path(r["file"]).name: r for r in jsonl_rows}
    assert by["a_moving.mp4"]["motion_quality"] > max(by["b_static.mp4"]["motion_quality"],
                                                      by["c_noise.mp4"]["motion_quality"]) + 0.3

    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 5 and [Path(p).name for p in summary["skipped"]] == ["f_broken.mp4"]
    for name in ("frame_change", "motion_quality", "total"):
        vals = np.array([r[name] for r in jsonl_rows])
        s = summary["rewards"][name]
        assert s["count"] == 5 and s["mean"] == pytest.approx(vals.mean()) and s["std"] == pytest.approx(vals.std())
    assert summary["rewards"]["motion_quality"]["weight"] == 0.5
    assert "scored 5 of 6 videos (1 skipped)" in cap.out and "motion_quality" in cap.out


def test_gif_is_decoded_frame_for_frame(video_dir: Path) -> None:
    from PIL import Image, ImageSequence

    gif = video_dir / "e_moving.gif"
    ours = read_video(gif)
    with Image.open(gif) as im:
        pil = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    assert ours.shape == (F, 32, 32, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, pil)


def test_rewards_config_with_options_prompts_file_and_fps(video_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "rewards.yaml"
    cfg.write_text("run: {iterations: 3}\nrewards:\n  mq: {type: motion_quality, weight: 2.0, flow: farneback}\n"
                   "  frame_change: 0.25\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("# comment\n" + "".join(f"q{i}\n" for i in range(3)))
    files = [str(video_dir / n) for n in ("c_noise.mp4", "a_moving.mp4", "e_moving.gif")]   # sorted by path
    rc = main(["score", *files, "--prompts", str(prompts), "--rewards-config", str(cfg),
               "--out", str(tmp_path / "out"), "--fps", "16"])
    assert rc == 0, capsys.readouterr().err
    _, rows = score_rows(tmp_path / "out")
    assert [Path(r["file"]).name for r in rows] == ["a_moving.mp4", "c_noise.mp4", "e_moving.gif"]
    assert [r["prompt"] for r in rows] == ["q0", "q1", "q2"]
    ref = rewards.build_rewards({"mq": {"type": "motion_quality", "flow": "farneback"}})["mq"]
    for r in rows:
        assert r["fps"] == 16.0                                                      # --fps overrides the files'
        expect = ref(torch.from_numpy(read_video(r["file"]))[None], [r["prompt"]], fps=16.0)
        assert r["mq"] == pytest.approx(float(expect["score"][0]), abs=1e-6)
        assert r["mq/speed"] == pytest.approx(float(expect["speed"][0]), abs=1e-6)   # at 16 fps
        assert r["total"] == pytest.approx(2.0 * r["mq"] + 0.25 * r["frame_change"], abs=1e-9)


def test_each_file_is_scored_at_its_own_frame_rate(tmp_path: Path, capsys) -> None:
    """The same frames at 8 and 24 fps in one folder: speed (short sides per second) triples, and
    each file scores as the in-process reward does at its container's rate; --fps overrides both."""
    frames = _moving(32, 32, 2, 5)
    d = tmp_path / "mixed"
    write_lossless(d / "a_8fps.mkv", frames, fps=8)
    write_lossless(d / "b_24fps.mkv", frames, fps=24)
    assert main(["score", str(d), "--reward", "dynamic_degree", "--out", str(tmp_path / "own")]) == 0
    own = {Path(r["file"]).name: r for r in score_rows(tmp_path / "own")[1]}
    assert own["a_8fps.mkv"]["fps"] == 8.0 and own["b_24fps.mkv"]["fps"] == 24.0
    ref = rewards.build_rewards({"dynamic_degree": 1.0})
    for name, r in own.items():
        video = torch.from_numpy(read_video(d / name))[None]
        scores, extras = rewards.score_videos(ref, video, [""], fps=r["fps"])
        assert r["dynamic_degree"] == pytest.approx(float(scores["dynamic_degree"][0]), abs=1e-6)
        assert r["dynamic_degree/speed"] == pytest.approx(float(extras["dynamic_degree/speed"][0]), abs=1e-6)
    # the two files decode to the same pixels (lossless), so the speed is in proportion to the rate
    assert own["b_24fps.mkv"]["dynamic_degree/speed"] == pytest.approx(3 * own["a_8fps.mkv"]["dynamic_degree/speed"])
    assert main(["score", str(d), "--reward", "dynamic_degree", "--fps", "24", "--out", str(tmp_path / "all24")]) == 0
    all24 = {Path(r["file"]).name: r for r in score_rows(tmp_path / "all24")[1]}
    assert [r["fps"] for r in all24.values()] == [24.0, 24.0]
    assert all24["a_8fps.mkv"]["dynamic_degree/speed"] == pytest.approx(own["b_24fps.mkv"]["dynamic_degree/speed"])


def test_index_json_of_training_samples(tmp_path: Path, capsys) -> None:
    d = tmp_path / "iter_000001"
    write_video(d / "01.mp4", _moving(16, 16, 1, 0))
    write_video(d / "00.mp4", _moving(16, 16, 0, 1))
    (d / "index.json").write_text(json.dumps({"iteration": 1, "videos": [
        {"file": "00.mp4", "prompt": "first"}, {"file": "01.mp4", "prompt": "second"}]}))
    assert main(["score", str(d), "--reward", "frame_change", "--out", str(tmp_path / "o")]) == 0
    assert [r["prompt"] for r in score_rows(tmp_path / "o")[1]] == ["first", "second"]


def _error(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err[-1].startswith("flowdppo-video: error: ")
    return err[-1]


def test_prompt_count_mismatch_is_an_error(video_dir: Path, tmp_path: Path, capsys) -> None:
    p = tmp_path / "p.txt"
    p.write_text("one\ntwo\n")
    msg = _error(["score", str(video_dir), "--reward", "frame_change", "--prompts", str(p)], capsys)
    assert msg.endswith(f"--prompts {p}: 2 prompts for 6 videos (one line per video, in sorted path order)")
    (video_dir / "prompts.txt").write_text("only one\n")
    msg = _error(["score", str(video_dir), "--reward", "frame_change"], capsys)
    assert "prompts.txt: 1 prompts for the 6 videos in" in msg
    assert not (video_dir / "scores").exists()


def test_nothing_readable_is_an_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "x.mp4"
    bad.write_bytes(b"garbage" * 10)
    rc = main(["score", str(bad), "--reward", "frame_change"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"flowdppo-video: warning: skipping {bad}: cannot read it" in err
    assert err.strip().splitlines()[-1] == ("flowdppo-video: error: none of the 1 video files could be read "
                                            "(see the warnings above)")


@pytest.mark.parametrize("args, message", [
    (["--reward", "frame_change=heavy"], "--reward frame_change=heavy: the weight 'heavy' is not a number"),
    (["--reward", "frame_change", "--reward", "frame_change=2"], "--reward frame_change is given twice"),
    (["--reward", "frame_chang"], "unknown reward 'frame_chang' in rewards.frame_chang: did you mean frame_change?"),
    ([], "no rewards to score with: give --reward NAME[=WEIGHT] or --rewards-config YAML"),
    (["--reward", "motion_quality", "--fps", "0"], "--fps must be a positive number, got 0.0"),
    (["--rewards-config", "missing.yaml"], "--rewards-config missing.yaml does not exist"),
])
def test_bad_reward_arguments(video_dir: Path, capsys, args: list[str], message: str) -> None:
    assert message in _error(["score", str(video_dir), *args], capsys)


def test_missing_input_and_empty_folder(tmp_path: Path, capsys) -> None:
    assert _error(["score", str(tmp_path / "nope"), "--reward", "frame_change"], capsys).endswith(
        f"{tmp_path / 'nope'}: no such file or folder")
    (tmp_path / "empty").mkdir()
    assert "empty: no video files (.mp4, .gif" in _error(["score", str(tmp_path / "empty"), "--reward", "frame_change"],
                                                         capsys)
