"""The clean-RL tools: the levers' paired table, and the step probe's patch-periodic share."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
import clean_rl  # noqa: E402
import step_damage  # noqa: E402

BASE = {"eval/world_direction/mean": 0.6, "eval/world_colour/mean": 0.9, "eval/world_shape/mean": 0.8,
        "eval/world_fidelity/background_error/mean": 0.8, "eval/world_fidelity/grid_energy/mean": 0.4}


def _finished_run(out: Path, lever: str, seed: int, direction: float, grid: float, colour: float) -> None:
    """A run directory as flowdppo_video.commands.benchmarking.run_seed leaves it: eval.jsonl (base, final) and its metadata."""
    d = out / f"{lever}-s{seed}"
    d.mkdir(parents=True)
    final = {**BASE, "eval/world_direction/mean": direction, "eval/world_fidelity/grid_energy/mean": grid,
             "eval/world_colour/mean": colour, "eval/kl_base/mean": 0.01}
    rows = [{"after_iterations": 0, **BASE}, {"after_iterations": 40, **final}]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "demo_seed.json").write_text(json.dumps({"wall_seconds": 600.0, "threads": 1, "commit": "abc",
                                                  "overrides": clean_rl.LEVERS[lever]}))


def test_levers_are_paired_with_the_default_by_seed(tmp_path):
    for seed, shift in [(0, 0.0), (1, 0.1), (2, -0.05)]:          # a seed effect that pairing cancels
        _finished_run(tmp_path / "runs", "every_step", seed, 0.85 + shift, 5.0 + shift, 0.95)
        _finished_run(tmp_path / "runs", "route_0.75", seed, 0.80 + shift, 0.5 + shift, 0.90)
    _finished_run(tmp_path / "runs", "beta_1", 0, 0.7, 3.0, 0.9)   # one seed: no interval
    text = clean_rl.write_docs(tmp_path / "runs", tmp_path / "docs")
    runs = json.loads((tmp_path / "docs" / "data" / "clean_rl_levers.json").read_text())["runs"]
    assert len(runs) == 7
    route = [r for r in runs if r["tag"] == "route_0.75"]
    assert [r["direction_gain"] for r in route] == pytest.approx([0.2, 0.3, 0.15])
    # colour lost 0.0 / 0.05 points, shape none: forgetting is the mean of the two
    assert {r["tag"]: r["forgotten"] for r in runs if r["seed"] == 0} == pytest.approx(
        {"every_step": -0.025, "route_0.75": 0.0, "beta_1": 0.0})
    # Paired by seed: exactly -5 points of direction, -4.5 grid levels, +2.5 points forgotten, every seed.
    line = next(ln for ln in text.splitlines() if ln.startswith("| route_0.75 | 0,1,2 | -5.0 [-5.0, -5.0]"))
    assert "-4.50 [-4.50, -4.50]" in line and "+2.5 [+2.5, +2.5]" in line
    assert "| beta_1 | 0 | 10.0 |" in text


def test_periodic_share_of_a_patch_grid_and_of_noise():
    g = torch.Generator().manual_seed(0)
    pattern = torch.randn(1, 3, 4, 1, 2, 1, 2, generator=g)
    grid = pattern.expand(1, 3, 4, 8, 2, 8, 2).reshape(1, 3, 4, 16, 16)
    grid = grid - grid.reshape(1, 3, 4, 8, 2, 8, 2).mean(dim=(4, 6), keepdim=True).expand(
        1, 3, 4, 8, 2, 8, 2).reshape(1, 3, 4, 16, 16)                 # zero mean in each patch: all periodic
    noise = torch.randn(1, 3, 4, 16, 16, generator=g)
    shares = step_damage.periodic_share(torch.cat([grid, noise]), (1, 2, 2))
    assert shares[0] == pytest.approx(1.0, abs=1e-5)
    assert shares[1] < 0.05                                          # 64 cells: chance is about 3/(4*64)
