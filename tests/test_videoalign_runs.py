"""VideoAlign's VideoReward everywhere a reward works: a tiny Wan run trained on it in process and
through the reward server (VQ, MQ, TA logged, finite), the report's panel of its parts, ``score``
on a folder, ``eval`` win-rates, a wrong checkpoint directory as one line and exit code 2, and the
Wan 2.1 1.3B recipe. The tiny random VideoReward of ``test_videoalign.py``."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import rewards
from flowdppo_video.commands.cli import main
from rewards.videoalign import VideoAlignReward

from .conftest import ROOT, tiny_config
from .tiny_vlm import MIN_PIXELS, build_tiny_videoreward

PARTS = ("vq", "mq", "ta")
HELD_OUT = ["a red ball rolls to the left", "a blue square slides up"]


def va_entry(root: Path | str) -> dict:
    """VQ + MQ in the score, TA logged only (the Wan 2.1 recipe's choice)."""
    return {"type": "videoalign", "model": str(root), "device": "cpu", "min_pixels": MIN_PIXELS, "batch_size": 4,
            "weights": {"vq": 1.0, "mq": 1.0, "ta": 0.0}}


def assert_parts_logged(row: dict, prefix: str = "reward/va") -> None:
    got = {p: row[f"{prefix}/{p}/mean"] for p in PARTS}
    assert all(math.isfinite(v) for v in got.values()), got
    assert len(set(got.values())) == 3                                      # three heads, three numbers
    assert row[f"{prefix}/mean"] == pytest.approx(got["vq"] + got["mq"], abs=1e-5)   # TA weighted 0


def figures_saved(monkeypatch) -> list[dict[str, list[str]]]:
    """Every figure saved from now on, as ``{panel title: [curve labels]}`` (visible panels)."""
    import matplotlib.figure

    saved: list[dict[str, list[str]]] = []
    savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append({ax.get_title(): [ln.get_label() for ln in ax.get_lines()] for ax in fig.axes
                      if ax.get_visible()})
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return saved


@pytest.fixture(scope="module")
def va_dir(tmp_path_factory) -> Path:
    return build_tiny_videoreward(tmp_path_factory.mktemp("videoalign"))[0]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "heldout.txt"
    path.write_text("\n".join(HELD_OUT) + "\n")
    return path


@pytest.fixture(scope="module")
def run(va_dir, held_out, tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two Flow-DPPO iterations of the tiny Wan model on VQ + MQ, evaluated before and after."""
    from flowdppo_video.trainer import Trainer

    cfg = tiny_config(tmp_path_factory.mktemp("va_run"), f"rewards={json.dumps({'va': va_entry(va_dir)})}",
                      f"eval.prompts={held_out}", "eval.every=2", "eval.num_videos=1")
    trainer = Trainer(cfg)
    try:
        rows = trainer.run()
    finally:
        trainer.close()
    return Path(cfg.run.output_dir), rows


@pytest.mark.slow
def test_training_logs_vq_mq_ta_and_the_report_draws_each(run, monkeypatch) -> None:
    from flowdppo_video.training.metrics import read_metrics
    from flowdppo_video.reporting.plots import plot_curves
    from flowdppo_video.reporting.report import write_report

    run_dir, rows = run
    assert [r["iteration"] for r in rows] == [0, 1] and (run_dir / "checkpoints" / "iter_000002").is_dir()
    for r in rows:
        assert_parts_logged(r)
        assert math.isfinite(r["loss"]) and r["reward/mean"] == pytest.approx(r["reward/va/mean"], abs=1e-6)
    evals = read_metrics(run_dir, "eval")
    assert [e["after_iterations"] for e in evals] == [0, 2]
    for e in evals:
        assert_parts_logged(e, "eval/va")

    saved = figures_saved(monkeypatch)
    index = write_report(run_dir)
    plot_curves(run_dir)
    panel = "va: logged parts"
    training, evaluation, curves = (next(f for f in saved if key in f) for key in
                                    ("reward per reward (batch mean)", "held-out reward (fixed prompts and noise)",
                                     "frozen share (trust region)"))
    for fig in (training, evaluation, curves):                  # VQ, MQ, TA: one panel, a curve each
        assert fig[panel] == ["vq", "mq", "ta", "va (score)"], fig
    assert training["reward per reward (batch mean)"] == ["total (weighted)", "va"]   # parts not mixed in
    html = index.read_text()
    assert "va: vq, mq, ta" in html and "reward hacking" in html


@pytest.mark.slow
def test_training_through_the_reward_server_scores_as_in_process(va_dir, run, tmp_path) -> None:
    from flowdppo_video.trainer import Trainer
    from rewards.server import BackgroundServer, create_app

    with BackgroundServer(create_app({"va": va_entry(va_dir)}, batch_window_s=0.0)) as url:
        remote = {"va": {"type": "remote", "url": url, "reward": "va"}}
        trainer = Trainer(tiny_config(tmp_path, "run.iterations=1", f"rewards={json.dumps(remote)}"))
        try:
            row = trainer.run()[-1]
        finally:
            trainer.close()
    assert_parts_logged(row)
    first = run[1][0]                         # the same seed and first rollout, scored in process
    for k in ("reward/va/mean", *(f"reward/va/{p}/mean" for p in PARTS)):
        assert row[k] == pytest.approx(first[k], abs=1e-5), k


@pytest.mark.slow
def test_eval_win_rates_with_videoalign(run, held_out, tmp_path, capsys) -> None:
    run_dir, _ = run
    out = tmp_path / "cmp"
    rc = main(["eval", "--checkpoints", str(run_dir / "checkpoints" / "iter_000002"), "--prompts", str(held_out),
               "--samples", "2", "--num-videos", "1", "--out", str(out)])     # the run's reward: va
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and list(summary["results"]) == ["va"]      # models x prompts x seeds
    for r in rows:
        assert all(math.isfinite(r[f"va/{p}"]) for p in PARTS)
        assert r["va"] == pytest.approx(r["va/vq"] + r["va/mq"], abs=1e-5)
    score = {(r["model"], r["prompt_index"], r["seed"]): r["va"] for r in rows}
    pairs = [(score[("iter_000002", i, s)], score[("base", i, s)]) for i in range(2) for s in (0, 1)]
    wins, ties = sum(a > b for a, b in pairs), sum(a == b for a, b in pairs)
    w = summary["results"]["va"]["win_rate"]["iter_000002 > base"]
    assert (w["wins"], w["ties"], w["n"]) == (wins, ties, 4) and w["value"] == pytest.approx((wins + ties / 2) / 4)
    # Each part gets its own win-rate over the base model (VQ up while TA down is the hack to see).
    assert list(summary["parts"]) == ["va/vq", "va/mq", "va/ta"]
    for p in PARTS:
        by = {(r["model"], r["prompt_index"], r["seed"]): r[f"va/{p}"] for r in rows}
        pairs = [(by[("iter_000002", i, s)], by[("base", i, s)]) for i in range(2) for s in (0, 1)]
        w = summary["parts"][f"va/{p}"]["win_rate"]["iter_000002 > base"]
        assert (w["wins"], w["n"]) == (sum(a > b for a, b in pairs), 4)
        assert summary["parts"][f"va/{p}"]["mean"]["base"]["value"] == pytest.approx(np.mean([b for _, b in pairs]))
    table = (out / "table.md").read_text()
    assert "| model | va |" in table and "Win-rate on va" in table
    assert "| part | base | iter_000002 | iter_000002 > base |" in table and "| va/ta |" in table
    assert "va/ta" in (out / "index.html").read_text()


@pytest.mark.slow
def test_score_a_folder_at_each_files_frame_rate(va_dir, tmp_path, capsys) -> None:
    from flowdppo_video.runs.video import read_video, video_fps, write_video

    folder = tmp_path / "videos"
    rng = np.random.default_rng(0)
    for name, frames, fps in (("a.mp4", 9, 8), ("b.mp4", 9, 8), ("c.mp4", 17, 16)):   # c at its own 16 fps
        write_video(folder / name, rng.integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8), fps=fps)
    (folder / "prompts.txt").write_text("a red ball\na blue square\na green triangle\n")
    cfg = tmp_path / "va.yaml"
    cfg.write_text(json.dumps({"rewards": {"va": va_entry(va_dir)}}))
    rc = main(["score", str(folder), "--rewards-config", str(cfg), "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [Path(r["file"]).name for r in rows] == ["a.mp4", "b.mp4", "c.mp4"]
    assert [r["fps"] for r in rows] == [8.0, 8.0, 16.0]
    reward = rewards.build_rewards({"va": va_entry(va_dir)})["va"]
    for r in rows:
        want = reward(torch.from_numpy(read_video(r["file"]))[None], [r["prompt"]], fps=video_fps(r["file"]))
        assert r["va"] == pytest.approx(float(want["score"][0]), abs=1e-5)
        for p in PARTS:
            assert r[f"va/{p}"] == pytest.approx(float(want[p][0]), abs=1e-5)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["rewards"]
    assert summary["va"]["count"] == 3 and summary["va"]["mean"] == pytest.approx(np.mean([r["va"] for r in rows]))


def _partial(va_dir: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "VideoReward"
    shutil.copytree(va_dir, bad)
    (bad / "checkpoint-7" / "model.pth").unlink()
    return bad


@pytest.mark.slow
def test_a_partial_checkpoint_is_one_line_and_exit_2_in_score_and_eval(va_dir, run, held_out, tmp_path,
                                                                        capsys) -> None:
    bad = _partial(va_dir, tmp_path)
    entry = {"va": va_entry(bad)}
    cfg = tmp_path / "va.yaml"
    cfg.write_text(json.dumps({"rewards": entry}))
    folder = tmp_path / "videos"
    from flowdppo_video.runs.video import write_video

    write_video(folder / "a.mp4", np.zeros((9, 32, 32, 3), np.uint8), fps=8)
    (folder / "prompts.txt").write_text("a cat\n")
    calls = (["score", str(folder), "--rewards-config", str(cfg), "--out", str(tmp_path / "out")],
             ["eval", "--checkpoints", str(run[0] / "checkpoints" / "iter_000002"), "--prompts", str(held_out),
              "--reward", json.dumps(entry), "--out", str(tmp_path / "cmp")])
    for argv in calls:
        capsys.readouterr()
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flowdppo-video: error: "), err
        assert "checkpoint-7 has no model.pth" in err[0], err


def test_the_wan21_videoalign_recipe_loads() -> None:
    from flowdppo_video.runs.config import load_config
    from rewards.registry import parse_reward_specs

    cfg = load_config(ROOT / "configs" / "wan2.1_t2v_1.3b_videoalign.yaml")
    assert (cfg.model.family, cfg.video.num_frames, cfg.video.fps) == ("wan", 33, 16)
    spec = parse_reward_specs(cfg.rewards)["va"]
    assert spec.type == "videoalign" and spec.weight == 1.0
    inspect.signature(VideoAlignReward).bind(**spec.options)            # every option is one it takes
    assert VideoAlignReward.component_weights(spec.options["weights"]) == {"vq": 1.0, "mq": 1.0, "ta": 0.0}
