"""tools/bench/rollout_payoff.py (issue 34): each rollout arm paired with the plain rollout by seed, at
the same iterations and at the same compute read off the plain arm's evaluation curve."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from flowdppo_video.commands.benchmarking import sections

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("rollout_payoff", ROOT / "tools" / "bench" / "rollout_payoff.py")
payoff = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(payoff)

BASE = {"eval/world_direction/mean": 0.5, "eval/world_colour/mean": 0.9, "eval/world_shape/mean": 0.8,
        "eval/world_fidelity/background_error/mean": 0.8, "eval/world_fidelity/grid_energy/mean": 0.4}


def _finished_run(out: Path, arm: str, seed: int, evals_per_it: float, gain_per_10: float) -> None:
    """A run as run_seed leaves it: 40 iterations of metrics (evaluations, seconds), an evaluation every
    10 (direction rising ``gain_per_10`` each time), the metadata."""
    d = out / f"{arm}-s{seed}"
    d.mkdir(parents=True)
    its = [{"iteration": i, "perf/evals/total": evals_per_it, "time/rollout_s": 2.0, "time/reward_s": 0.5,
            "time/update_s": 1.5} for i in range(1, 41)]
    evs = [{"after_iterations": n, **BASE, "eval/world_direction/mean": 0.5 + gain_per_10 * n / 10,
            "eval/kl_base/mean": 0.001 * n} for n in (0, 10, 20, 30, 40)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in its))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evs))
    (d / "demo_seed.json").write_text(json.dumps({"wall_seconds": 600.0, "threads": 1, "commit": "abc",
                                                  "overrides": payoff.ARMS[arm]}))


def test_arms_are_paired_with_plain_at_the_same_iterations_and_compute(tmp_path):
    for seed, shift in [(0, 0.0), (1, 0.01), (2, -0.01)]:        # a seed effect that pairing cancels
        _finished_run(tmp_path / "runs", "plain", seed, 100.0, 0.05 + shift)
        _finished_run(tmp_path / "runs", "tail_3", seed, 60.0, 0.04 + shift)
    text = payoff.write_docs(tmp_path / "runs", tmp_path / "docs")
    runs = json.loads((tmp_path / "docs" / "data" / "rollout_payoff.json").read_text())["runs"]
    plain0 = next(r for r in runs if r["tag"] == "plain" and r["seed"] == 0)
    assert plain0["evaluations"] == 4000 and plain0["train_seconds"] == 160
    assert plain0["curve"] == [[0, 0.5], [1000, 0.55], [2000, 0.6], [3000, 0.65], [4000, 0.7]]
    assert plain0["direction_gain"] == pytest.approx(0.2)
    # tail_3 spent 2400 evaluations: plain had gained (0.05 + s) * 2.4 by then; tail_3 gained (0.04 + s) * 4.
    # Paired: -4.0 points at the same iterations; at the same compute 16 - 12 + 1.6 s (s = 0, 1, -1 points).
    line = next(ln for ln in text.splitlines() if ln.startswith("| `tail_3` | 0,1,2 | -4.0 [-4.0, -4.0]"))
    assert "| 0.60 [0.60, 0.60] | 1.00 [1.00, 1.00] | +4.0 [+2.4, +5.6] |" in line
    assert payoff.at_compute([(0, 0.5), (10, 1.0)], 4) == pytest.approx(0.7)
    assert payoff.at_compute([(0, 0.5), (10, 1.0)], 20) == 1.0     # beyond the curve: its last value
    assert sections((tmp_path / "docs" / "benchmarks.md").read_text())["rollout_payoff"] == text + "\n"


def test_the_lora_arms_are_paired_with_the_lora_recipe_not_with_full_fine_tuning(tmp_path):
    for seed in (0, 1):
        _finished_run(tmp_path / "runs", "plain", seed, 100.0, 0.01)
        _finished_run(tmp_path / "runs", "lora", seed, 100.0, 0.05)
        _finished_run(tmp_path / "runs", "lora+shared+tail_3", seed, 60.0, 0.06)
    text = payoff.write_docs(tmp_path / "runs", tmp_path / "docs")
    # +4.0 points against lora (0.24 - 0.20), not +20 against plain (0.24 - 0.04)
    assert any(ln.startswith("| `lora+shared+tail_3` | 0,1 | +4.0 [+4.0, +4.0]") for ln in text.splitlines())
    paired = [ln for ln in text.splitlines() if ln.count("|") == 9]        # the paired table's rows
    assert not [ln for ln in paired if ln.startswith(("| `lora` |", "| `plain` |"))]   # the baselines

