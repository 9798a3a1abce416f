"""The artifact monitors in a run: every evaluation logs them (at the model's own grid period), the
closing table, the report and ``eval`` show them base -> now, and a run trained on a reward that pays
for saturation raises the reward-hacking warning, naming the reward and the monitors it worsened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rewards
from flowdppo_video.runs.config import ConfigError
from flowdppo_video.training.metrics import read_metrics
from flowdppo_video.training.monitors import build_monitors, hacking_warnings, model_period
from flowdppo_video.reporting.run_summary import summary_lines
from rewards.artifacts import DEFAULT_MONITORS, NOTICEABLE

from .conftest import tiny_config

PAID = "test_pays_saturation"


if PAID not in rewards.REWARDS:
    @rewards.register(PAID)
    class PaysSaturation:
        """A hackable reward: the mean HSV saturation of the video, in [0, 1] (nothing else)."""

        def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
            v = videos.float()
            hi, lo = v.max(-1).values, v.min(-1).values
            return ((hi - lo) / hi.clamp(min=1.0)).mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def hacked(tmp_path_factory) -> Path:
    """Two iterations of the shipped shapes-world model (the demo recipe, full fine-tuning) on PAID
    alone, at a learning rate and trust region loose enough to hack it fast, evaluated before and after."""
    from flowdppo_video.commands.cli import DEFAULT_RECIPE
    from flowdppo_video.runs.config import load_config
    from flowdppo_video.trainer import Trainer

    root = tmp_path_factory.mktemp("hacked")
    held_out = root / "heldout.txt"
    held_out.write_text("a blue circle moves left quickly on black\na red square moves up slowly on gray\n"
                        "a green triangle moves right quickly on black\n")
    train = root / "train.txt"      # a few prompts: the run encodes every one at its start
    train.write_text("a red circle moves left slowly on black\na yellow square moves down quickly on gray\n"
                     "a blue triangle moves up slowly on black\na green circle moves right quickly on gray\n")
    cfg = load_config(DEFAULT_RECIPE, [f"data.prompts={train}",
        f"run.output_dir={root / 'run'}", f"rewards={{{PAID}: 1.0}}", "eval.rewards={}", f"eval.prompts={held_out}",
        "run.iterations=2", "eval.every=2", "run.checkpoint_every=2", "run.report_every=2", "run.tensorboard=false",
        "run.num_sample_videos=0", "eval.samples_per_prompt=1", "eval.num_videos=1", "eval.kl_to_base=false",
        "data.prompts_per_iteration=2", "data.group_size=4", "objective.delta=1.0", "optim.lr=2e-3",
        "model.lora.rank=0"])
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    return Path(cfg.run.output_dir)


@pytest.mark.slow
def test_a_run_that_pays_for_saturation_is_warned_about(hacked) -> None:
    evals = read_metrics(hacked, "eval")
    assert [e["after_iterations"] for e in evals] == [0, 2]
    for e in evals:                                  # every monitor, in every evaluation
        assert all(f"monitor/{m}/mean" in e and f"monitor/{m}/std" in e for m in DEFAULT_MONITORS)
    base, last = evals
    assert last[f"eval/{PAID}/mean"] > base[f"eval/{PAID}/mean"]
    assert last["monitor/saturation/mean"] - base["monitor/saturation/mean"] > base["monitor/saturation/std"]
    text = "\n".join(summary_lines(hacked, read_metrics(hacked), evals))
    assert "artifact monitors (higher = worse):" in text and "  saturation" in text
    assert f"warning: possible reward hacking: held-out reward {PAID} rose" in text
    assert "the artifact monitor saturation worsened" in text
    html = (hacked / "report" / "index.html").read_text()
    assert 'id="warnings"' in html and f"reward {PAID} rose" in html and "monitor: saturation (higher = worse)" in html


@pytest.mark.slow
def test_eval_compares_the_monitors_of_checkpoints(hacked, tmp_path) -> None:
    from flowdppo_video.reporting.eval_checkpoints import evaluate_checkpoints

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moves left slowly on black\na blue square moves up quickly on gray\n")
    out = tmp_path / "eval"
    summary = evaluate_checkpoints(hacked, ["base", str(hacked / "checkpoints" / "iter_000002")], str(prompts), out,
                                   samples=1, num_videos=0, progress=False)
    assert set(summary["monitors"]) == set(DEFAULT_MONITORS)
    sat = summary["monitors"]["saturation"]["mean"]
    assert sat["iter_000002"]["value"] > sat["base"]["value"]
    table = (out / "table.md").read_text()
    assert "Artifact monitors (pixels only, higher = worse" in table and "iter_000002 worse than base" in table
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert all("monitor/saturation" in r for r in rows)
    assert "artifact monitors (higher = worse)" in (out / "index.html").read_text()


def test_the_period_is_the_models_own_unless_configured(tiny_cfg) -> None:
    from flowdppo_video.models import build_adapter

    adapter = build_adapter(tiny_cfg.model, torch.device("cpu"))
    assert model_period(adapter) == adapter.scale_spatial * adapter.patch_size[1]
    assert build_monitors(None, None, adapter)["patch_grid"].period == model_period(adapter)
    assert build_monitors(["patch_grid"], 4, adapter)["patch_grid"].period == 4
    assert list(build_monitors([], None, adapter)) == []
    # too small a video for two periods: left out by default, an error when asked for by name
    small = (model_period(adapter), 64)
    assert "patch_grid" not in build_monitors(None, None, adapter, small) and "flicker" in build_monitors(None, None, adapter, small)
    with pytest.raises(ConfigError, match="eval.monitors: patch_grid: videos of .* less than two periods"):
        build_monitors(["patch_grid"], None, adapter, small)


def test_the_shapes_world_period_is_2() -> None:
    from flowdppo_video.runs.config import load_config
    from flowdppo_video.models import build_adapter

    from flowdppo_video.commands.cli import DEFAULT_RECIPE

    cfg = load_config(DEFAULT_RECIPE, [])
    assert model_period(build_adapter(cfg.model, torch.device("cpu"))) == 2


@pytest.mark.parametrize("override, message", [
    ("eval.monitors=[grid]", "eval.monitors: unknown monitor 'grid'; the monitors are patch_grid"),
    ("eval.monitors=3", "eval.monitors must be a list"),
    ("eval.monitor_period=1", "eval.monitor_period must be an integer >= 2"),
])
def test_bad_monitor_config_is_one_line(tmp_path, override, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        tiny_config(tmp_path, override).validate()


def test_no_warning_without_a_rising_reward_or_a_base() -> None:
    base = {"after_iterations": 0, "eval/r/mean": 0.5, "monitor/saturation/mean": 0.2, "monitor/saturation/std": 0.001}
    worse = {**base, "after_iterations": 5, "monitor/saturation/mean": 0.5}
    assert hacking_warnings([base, {**worse, "eval/r/mean": 0.4}], [], ["r"]) == []
    assert hacking_warnings([{**base, "after_iterations": 5}, {**worse, "eval/r/mean": 0.9}], [], ["r"]) == []
    assert len(hacking_warnings([base, {**worse, "eval/r/mean": 0.9}], [], ["r"])) == 1
    # a reward not evaluated held out: its training curve decides
    rows = [{"reward/t/mean": 0.1}, {"reward/t/mean": 0.3}]
    assert "training reward t rose 0.1 -> 0.3" in hacking_warnings([base, worse], rows, ["t"])[0]
    # worse than a spread of ~0, but by less than the monitor's noticeable change: no warning
    tiny = {**worse, "eval/r/mean": 0.9, "monitor/saturation/mean": 0.2 + 0.5 * NOTICEABLE["saturation"]}
    assert hacking_warnings([base, tiny], [], ["r"]) == []
