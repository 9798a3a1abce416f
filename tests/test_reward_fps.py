"""Rewards receive the videos' real frame rate everywhere (issue 16, item 4).

A motion reward in a 16 fps run scores what it scores on the same video at 16 fps through
``score`` and through the reward server; before, training and evaluation scored every video as
if it were 8 fps. ``dynamic_degree``'s ``speed`` (frame short sides per second) is in proportion
to the rate, so it tells 16 fps from 8 fps without doubt.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import rewards
from flowdppo_video.commands.cli import main
from flowdppo_video.training.evaluation import evaluate
from flowdppo_video.trainer import Trainer
from rewards.server import BackgroundServer, create_app
from rewards.wire import BINARY_TYPE, decode_response, encode_json_request, encode_request

from .conftest import score_rows, tiny_config, write_lossless

FPS = 16


def test_a_16_fps_run_scores_as_score_and_the_reward_server_do(tmp_path: Path, capsys) -> None:
    with BackgroundServer(create_app({"dd": {"type": "dynamic_degree"}})) as url:
        cfg = tiny_config(tmp_path, f"video.fps={FPS}", "run.iterations=1",
                          "rewards={local: {type: dynamic_degree, weight: 1.0}, "
                          f"served: {{type: remote, url: '{url}', reward: dd, weight: 1.0}}}}",
                          "eval.prompts=[a red circle moves left slowly on black]", "eval.kl_to_base=false")
        trainer = Trainer(cfg)
        traj, row = trainer.train_iteration(0)
        evaluated = trainer.evaluate(0)
        served = rewards.build_rewards({"r": {"type": "remote", "url": url, "reward": "dd"}})["r"]
        by_server = served(traj.videos, traj.prompts, fps=FPS)
        at_8 = rewards.score_videos(trainer.rewards, traj.videos, traj.prompts, fps=8)[1]["local/speed"]
        eval_at_8, _ = evaluate(trainer.adapter, trainer.eval_prompts, 1, trainer.latent_shape, cfg.sampler,
                                cfg.eval.seed, trainer.eval_rewards, measure_kl=False, fps=8)
    # the same videos through `score`, each file carrying its 16 fps in its container (lossless)
    folder = tmp_path / "videos"
    for k in range(traj.batch_size):
        write_lossless(folder / f"{k:02d}.mkv", traj.videos[k].numpy(), fps=FPS)
    assert main(["score", str(folder), "--reward", "dynamic_degree", "--out", str(tmp_path / "scores")]) == 0
    scored = score_rows(tmp_path / "scores")[1]
    capsys.readouterr()

    speed = torch.tensor([r["dynamic_degree/speed"] for r in scored])
    assert [r["fps"] for r in scored] == [FPS] * traj.batch_size
    assert float(speed.min()) > 0                        # the random model's videos move: the check has teeth
    # training (in process and through the server) logs what `score` measures at 16 fps, per video
    assert row["reward/local/speed/mean"] == pytest.approx(float(speed.mean()), rel=1e-5)
    assert row["reward/served/speed/mean"] == pytest.approx(float(speed.mean()), rel=1e-5)
    assert row["reward/local/mean"] == pytest.approx(sum(r["dynamic_degree"] for r in scored) / len(scored), rel=1e-5)
    assert torch.allclose(by_server["speed"], speed, rtol=1e-5)
    # ... and not what it used to measure, as if the videos were 8 fps: half the speed
    assert torch.allclose(at_8 * 2, speed, rtol=1e-5)
    # evaluation too: the trainer's held-out videos scored at 16 fps, twice their speed at 8
    assert evaluated["eval/local/speed/mean"] == pytest.approx(2 * eval_at_8["eval/local/speed/mean"], rel=1e-5)
    assert evaluated["eval/local/speed/mean"] > 0


def test_the_server_scores_each_request_at_its_own_fps_and_wants_one() -> None:
    """Requests of one size at 8 and 16 fps arriving together are not scored as one batch, and
    a request without fps (a wire version 1 client) is a 400 naming the field."""
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 6, 32, 32, 3), dtype=np.uint8))
    local = rewards.build_rewards({"dd": {"type": "dynamic_degree"}})
    want = {f: rewards.score_videos(local, frames, ["", ""], fps=f)[1]["dd/speed"] for f in (8, 16)}
    assert torch.allclose(want[16], 2 * want[8])
    with BackgroundServer(create_app({"dd": {"type": "dynamic_degree"}}, batch_window_s=0.5)) as url:
        with httpx.Client(timeout=30) as client:
            def post(f: int) -> dict:
                r = client.post(f"{url}/score", content=encode_request(frames, ["", ""], f),
                                headers={"Content-Type": BINARY_TYPE})
                assert r.status_code == 200, r.text
                return r.json()

            with concurrent.futures.ThreadPoolExecutor(2) as pool:     # both within one batching window
                docs = dict(zip((8, 16), pool.map(post, (8, 16))))
            old = encode_json_request(frames, ["", ""], 8)
            del old["fps"]
            bad = client.post(f"{url}/score", content=json.dumps(old), headers={"Content-Type": "application/json"})
            health = client.get(f"{url}/health").json()
    for f, doc in docs.items():
        assert doc["batch"]["requests"] == 1                             # never batched with the other rate
        assert torch.allclose(decode_response(doc)[1]["dd/speed"], want[f], rtol=1e-6)
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("body.fps must be the videos' frame rate, a number > 0")
    assert health["wire"] == 3 and health["stats"]["reward_calls"] == 2
