"""End to end through the CLI: a 2-iteration run, its outputs, resume, and a SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flowdppo_video.runs.video import read_video

from .conftest import ROOT, TINY_CONFIG, cli, rows, train

pytestmark = pytest.mark.slow

REQUIRED_KEYS = {"iteration", "reward/mean", "reward/std", "kl/mean", "kl/max", "mask/drop_frac",
                 "ratio/first_max_abs_log", "loss", "grad_norm", "time/rollout_s", "time/update_s"}
TIMING = {"time/rollout_s", "time/update_s", "time/reward_s"}


EVAL = [f"eval.prompts={ROOT / 'configs/prompts/demo.txt'}", "eval.every=2", "eval.num_videos=2"]


def test_two_iterations_then_resume_reproduces(tmp_path):
    run = tmp_path / "run"
    end = train(run, *EVAL).stdout
    got = rows(run)
    # The end of the run: one aligned table (each held-out metric once, base -> final, the KL to
    # the base model), then the files to open.
    assert "done: 2 iterations; training reward/mean" in end
    header = next(ln for ln in end.splitlines() if ln.split()[:1] == ["held-out"])
    assert header.split() == ["held-out", "base", "after", "2", "change"]
    assert sum(ln.split()[:1] == ["frame_change"] for ln in end.splitlines()) == 1
    assert "KL to base (nats/token)" in end
    for path in (run / "report" / "index.html", f"{run / 'before_after'}/", run / "curves.png"):
        assert f"  {path}" in end
    assert [r["iteration"] for r in got] == [0, 1]
    for r in got:
        assert REQUIRED_KEYS <= set(r), REQUIRED_KEYS - set(r)
        assert r["ratio/first_max_abs_log"] < 1e-5          # first minibatch replays pi_old
        assert r["kl/mean"] >= 0 and r["kl/max"] >= r["kl/mean"]
    # Resolved config, samples as mp4 readable by decord with the configured frame count, checkpoints.
    assert (run / "config.yaml").is_file()
    videos = sorted((run / "samples").rglob("*.mp4"))
    assert len(videos) == 4                                     # 2 sample points x 2 videos
    frames = read_video(videos[0])
    assert frames.shape == (9, 32, 32, 3)
    assert (run / "checkpoints" / "iter_000002" / "model" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "curves.png").stat().st_size > 10_000
    # Held-out evaluation: the base model, then after 2 iterations; before/after videos side by side.
    evals = rows(run, "eval")
    assert [e["after_iterations"] for e in evals] == [0, 2]
    assert evals[0]["eval/kl_base/mean"] == 0.0 < evals[1]["eval/kl_base/mean"]
    assert "eval/frame_change/mean" in got[1]
    pair = read_video(run / "before_after" / "00.mp4")
    assert pair.shape == (9, 128, 2 * 128 + 4, 3)
    # Two different prompts kept (not one prompt's two samples), labelled beside their videos.
    labels = (run / "before_after" / "index.html").read_text()
    assert "a red ball rolls to the left" in labels and "a green triangle moves to the right" in labels
    assert "base (left) | after 2 (right)" in labels

    # Resume to 4 iterations == an uninterrupted 4-iteration run, exactly (CPU, float32).
    train(run, "run.iterations=4", resume=True)
    import yaml
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["iterations"] == 4   # overrides persist
    straight = tmp_path / "straight"
    train(straight, "run.iterations=4", "run.sample_every=2", *EVAL)
    # One N for every folder: samples/iter_2 are rolled out by the model after 2 iterations, the
    # model eval/after_2 evaluates and checkpoints/iter_2 holds.
    assert sorted(p.name for p in (straight / "samples").iterdir()) == ["iter_000000", "iter_000002", "iter_000003"]
    assert sorted(p.name for p in (straight / "eval").iterdir()) == ["after_000000", "after_000002", "after_000004"]
    assert json.loads((straight / "samples" / "iter_000002" / "index.json").read_text())["iteration"] == 2
    a, b = rows(run), rows(straight)
    assert [r["iteration"] for r in a] == [0, 1, 2, 3]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMING and not k.startswith("perf/")} == \
            {k: v for k, v in y.items() if k not in TIMING and not k.startswith("perf/")}
    assert rows(run, "eval") == rows(straight, "eval")


def test_sigkill_mid_iteration_loses_at_most_that_iteration(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "flowdppo_video", "train", "--config", str(TINY_CONFIG),
                             f"run.output_dir={run}", "run.iterations=50", "run.tensorboard=false"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run / "checkpoints" / "iter_000002").exists():
            time.sleep(0.05)
        assert (run / "checkpoints" / "iter_000002").exists(), "no checkpoint appeared"
        time.sleep(0.3)                                        # somewhere inside a later iteration
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = rows(run)
    done = len(before)
    from flowdppo_video.training.checkpoint import latest_checkpoint
    saved = int(latest_checkpoint(run).name.split("_")[1])
    assert done - saved in (0, 1)                          # at most the killed iteration is redone
    train(run, f"run.iterations={done + 2}", resume=True)
    after = rows(run)
    assert [r["iteration"] for r in after] == list(range(done + 2))
    # Rows the checkpoint covers are kept as they were.
    assert after[:saved] == before[:saved]


def test_sample_command_writes_videos(tmp_path):
    run = tmp_path / "run"
    train(run, "run.iterations=1")
    out = tmp_path / "samples"
    said = cli("sample", "--run", str(run), "--out", str(out), "--num", "1").stdout
    vids = sorted(out.glob("*.mp4"))
    assert len(vids) == 4                                     # 4 prompts in the demo prompt file
    assert read_video(vids[0]).shape == (9, 32, 32, 3)
    ckpt = run / "checkpoints" / "iter_000001"
    # It says how many videos it will write and from which checkpoint, before writing them.
    assert said.startswith(f"sampling 4 videos: 1 per prompt x 4 prompts (the run's training prompts), "
                           f"from checkpoint {ckpt} (after 1 iteration)")
    index = json.loads((out / "index.json").read_text())
    assert (index["checkpoint"], index["iterations"], index["videos_per_prompt"]) == (str(ckpt), 1, 1)
    demo = (ROOT / "configs/prompts/demo.txt").read_text().splitlines()
    assert [v["prompt"] for v in index["videos"]] == [p for p in demo if p.strip() and not p.startswith("#")]
    assert not (out / "prompts.txt").exists()
    # --num is per prompt, --prompts picks a subset; the base model on request.
    sub = tmp_path / "subset"
    said = cli("sample", "--run", str(run), "--out", str(sub), "--num", "3", "--prompts", "1,3",
               "--checkpoint", "base").stdout
    assert "sampling 6 videos: 3 per prompt x 2 prompts" in said and "from the base model" in said
    index = json.loads((sub / "index.json").read_text())
    assert [(v["file"], v["prompt_index"], v["sample"]) for v in index["videos"]] == \
        [(f"{k:03d}.mp4", [1, 3][k // 3], k % 3) for k in range(6)]
    assert len(list(sub.glob("*.mp4"))) == 6 and index["checkpoint"] == "base"


def test_a_report_refresh_says_where_the_report_is(tmp_path):
    run = tmp_path / "run"
    out = train(run, "run.iterations=2", "run.report_every=1").stdout
    # Refreshed after iteration 1 of 2 (mid-run: the user can look now); the end's summary has it too.
    assert out.count(f"report refreshed: {run / 'report' / 'index.html'}") == 1
    assert ["report", str(run / "report" / "index.html")] in [ln.split() for ln in out.splitlines()]
