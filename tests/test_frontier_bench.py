"""The trust-region frontier benchmark and its calibration tool run, resume and analyse (tiny size)."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from flowdppo_video.reporting.winrates import bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
import algorithms  # noqa: E402

TINY = ["data.prompts_per_iteration=1", "data.group_size=4", "optim.minibatch_size=2", "eval.samples_per_prompt=1",
        "eval.prompts=[a red circle moves left slowly on black, a blue square moves up quickly on gray]"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}


def test_interpolation_at_matched_kl_is_linear_in_log_kl():
    pts = [(0.01, 0.5), (0.1, 0.7), (1.0, 0.6)]
    assert algorithms.interp_at(pts, 0.1) == pytest.approx(0.7)
    assert algorithms.interp_at(pts, math.sqrt(0.01 * 0.1)) == pytest.approx(0.6)    # halfway in log KL
    assert algorithms.interp_at(pts, 0.005) is None and algorithms.interp_at(pts, 2.0) is None


def test_matched_kl_pairs_seeds_and_gives_an_interval():
    rs = []
    for seed, shift in [(0, 0.0), (1, 0.02), (2, -0.01)]:
        for kl, a, b in [(0.01, 0.6, 0.5), (0.1, 0.8, 0.6)]:
            rs.append({"arm": "token", "epochs": 4, "seed": seed, "kl_to_base": kl, "direction": a + shift})
            rs.append({"arm": "clip", "epochs": 4, "seed": seed, "kl_to_base": kl, "direction": b + shift})
    rows = algorithms.matched_kl(rs, 4, budgets=[0.01, 0.1])
    assert [(r["a"], r["b"]) for r in rows] == [("token", "clip")] * 2
    assert [r["mean_diff"] for r in rows] == pytest.approx([0.1, 0.2])       # the shift cancels: paired
    assert all(r["n_seeds"] == 3 and r["ci"][0] <= r["mean_diff"] <= r["ci"][1] for r in rows)
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0])
    assert 1.0 <= lo < 2.0 < hi <= 3.0
    assert bootstrap_ci([1.0, 2.0, 3.0]) == (lo, hi) and bootstrap_ci([0.7]) == (0.7, 0.7)


def test_frontier_grid_runs_resumes_and_reports(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools/bench/algorithms.py"), "--out", str(tmp_path / "runs"), "--docs",
           str(tmp_path / "docs"), "--iterations", "1", "--arms", "token", "none", "--values", "token=1e-4",
           "--epochs", "2", "--seeds", "0", "--", *TINY]
    first = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = sorted(p.parent.name for p in (tmp_path / "runs").glob("*/bench.json"))
    assert runs == ["none-inf-e2-s0", "token-0.0001-e2-s0"]
    r = json.loads((tmp_path / "runs" / "token-0.0001-e2-s0" / "bench.json").read_text())
    assert r["commit"] and 0.0 <= r["offpolicy_frozen"] <= 1.0 and r["kl_to_base"] > 0
    # The base evaluation is shared: every run's first evaluation row is the grid's one.
    base = (tmp_path / "runs" / "_base" / "eval.jsonl").read_text().splitlines()[0]
    assert all((tmp_path / "runs" / n / "eval.jsonl").read_text().splitlines()[0] == base for n in runs)
    # A second invocation reuses the finished runs (nothing is rerun), then the report.
    again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and json.loads((tmp_path / "runs" / "token-0.0001-e2-s0" / "bench.json")
                                                .read_text())["wall_seconds"] == r["wall_seconds"]
    rep = subprocess.run([*cmd[:6], "--report"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    # The page in --docs, its data and figures in their own folders there.
    assert len(json.loads((tmp_path / "docs" / "data" / "frontier.json").read_text())) == 2
    assert "Flow-DPPO token" in (tmp_path / "docs" / "frontier.md").read_text()
    for name in ("frontier.png", "frontier_forgetting.png", "frontier_grid.png"):
        assert (tmp_path / "docs" / "figures" / name).stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["data", "figures", "frontier.md"]


def test_calibration_reports_the_off_policy_frozen_share(tmp_path):
    out = tmp_path / "cal"
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench/calibrate_trust_region.py"), "--arms", "grpo_clip",
                           "--out", str(out), "optim.lr=1e-4", "optim.inner_epochs=2", *TINY[:3]],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "data" / "cal.json").read_text())["rows"]
    shares = [r["offpolicy_frozen"] for r in rows]
    assert [r["value"] for r in rows] == sorted(r["value"] for r in rows)
    # A wider clip range never freezes more, and the first epoch's first minibatch froze nothing.
    assert all(a >= b for a, b in zip(shares, shares[1:])) and shares[0] > shares[-1]
    assert "off-policy frozen" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("values", [{}, {"token": [1e-4, 3e-4]}, {"sample@1": [1e-6]}])
def test_jobs_workers_get_a_command_argparse_accepts(values):
    # A stage without --values once gave every worker "--values --" (argparse: expected at least one).
    argv = ["--stage", "row", "--jobs", "2", "--", "optim.lr=1e-4"]
    args = algorithms.parser().parse_args(argv)
    cmd = algorithms.worker_command(args, [0], [4], ["row"], values)
    worker = algorithms.parser().parse_args(cmd[2:])
    got = {a: [float(x) for x in vs.split(",")] for a, vs in (v.split("=", 1) for v in worker.values)}
    assert got == values and worker.arms == ["row"] and worker.jobs == 1
    assert worker.overrides == ["optim.lr=1e-4"]


def test_the_knees_stage_runs_each_arm_at_its_knee_only(tmp_path, monkeypatch):
    # The stage's values reach the cells, and the --jobs workers (which once got only --values).
    seen = []
    monkeypatch.setattr(algorithms, "work", lambda out, cells, *a: seen.append(cells))
    monkeypatch.setattr(sys, "argv", ["algorithms.py", "--stage", "knees", "--out", str(tmp_path), "--docs",
                                      str(tmp_path)])
    algorithms.main()
    assert sorted((a, v, e) for a, v, e, _ in seen[0]) == sorted(
        (a, v, 4) for a, v in algorithms.KNEES.items() for _ in (3, 4))
    args = algorithms.parser().parse_args(["--stage", "knees", "--jobs", "2"])
    cmd = algorithms.worker_command(args, [3, 4], [4], list(algorithms.KNEES), {a: [v] for a, v in algorithms.KNEES.items()})
    worker = algorithms.parser().parse_args(cmd[2:])
    assert len(worker.values) == len(algorithms.KNEES)


def test_the_transfer_stage_runs_the_latent_worlds_own_knob_values(tmp_path, monkeypatch):
    # A world calibrated apart sweeps its own values (its calibration froze far more per value); --values
    # still overrides an arm; the shapes world keeps each arm's KNOB_VALUES.
    seen = []
    monkeypatch.setattr(algorithms, "work", lambda out, cells, *a: seen.append((cells, a[-1])))
    monkeypatch.setattr(sys, "argv", ["algorithms.py", "--stage", "transfer", "--values", "clip=0.02",
                                      "--out", str(tmp_path), "--docs", str(tmp_path)])
    algorithms.main()
    cells, world = seen[0]
    own = algorithms.WORLDS["latent"].knob_values
    assert world == "latent" and {s for *_, s in cells} == {0, 1, 2} and {e for _, _, e, _ in cells} == {4}
    assert sorted({(a, v) for a, v, _, _ in cells}) == sorted(
        [(a, v) for a in ("sample", "row", "token") for v in own[a]] + [("clip", 0.02), ("none", math.inf)])
    assert algorithms.stage_values({}, "shapes") == {}
    assert algorithms.stage_values(algorithms.STAGES["knees"], "latent") == {a: [v] for a, v in algorithms.KNEES.items()}


def test_one_epoch_fronts_sweep_their_own_values():
    # The 4-epoch lists stay; one epoch gets tighter values (most 4-epoch ones froze nothing there);
    # --values ARM@E overrides one epoch count, ARM both.
    assert algorithms.knob_values("sample", 4) == algorithms.ARMS["sample"][2]
    assert algorithms.knob_values("sample", 1) == algorithms.ONE_EPOCH_VALUES["sample"]
    assert algorithms.knob_values("none", 1) == [math.inf]
    vals = {"clip@1": [1e-5], "token": [1e-4]}
    cells = algorithms.grid(["clip", "token"], [4, 1], [0], vals)
    assert [(a, v, e) for a, v, e, _ in cells] == (
        [("clip", v, 4) for v in algorithms.ARMS["clip"][2]] + [("token", 1e-4, 4), ("clip", 1e-5, 1), ("token", 1e-4, 1)])


def test_four_epochs_against_one_pairs_each_arm_with_itself():
    def run(arm, v, e, s, kl, d):
        return {"arm": arm, "value": v, "epochs": e, "seed": s, "kl_to_base": kl, "direction": d, "commit": "c",
                "direction_base": 0.5, "offpolicy_frozen": 0.1, "forgetting": 0.0, "background_error": 1.0,
                "grid_energy": 1.0, "background_error_base": 1.0, "grid_energy_base": 1.0}

    # Seed 0 and 1: the 4-epoch front lies 0.1 and 0.2 above the 1-epoch one over the same KL range.
    res = [run("sample", v, e, s, kl, d + (0.1 + 0.1 * s if e == 4 else 0.0))
           for s in (0, 1) for e in (4, 1) for v, kl, d in ((1e-5, 0.01, 0.6), (1e-4, 0.1, 0.8))]
    res.append(run("none", math.inf, 4, 0, 0.9, 0.0))
    rows = algorithms.epochs_against(res)
    assert [r["arm"] for r in rows] == ["sample"] * 3
    for r in rows:
        assert r["n_seeds"] == 2 and r["mean_diff"] == pytest.approx(0.15) and r["diffs"] == pytest.approx([0.1, 0.2])
    assert "4 against 1 inner epoch" in algorithms.report(res, {})


def test_a_tagged_variant_is_reported_beside_its_untagged_twin_not_in_the_fronts():
    def run(tag, d, c, kl):
        return {"arm": "sample", "value": 1e-4, "epochs": 4, "seed": 0, "tag": tag, "kl_to_base": kl, "direction": d,
                "colour": c, "shape": 0.8, "colour_base": 0.9, "shape_base": 0.85, "commit": "c",
                "extra": ["advantages.aggregation=gdpo"] if tag else [], "direction_base": 0.5,
                "offpolicy_frozen": 0.1, "forgetting": 0.0, "background_error": 1.0, "grid_energy": 1.0,
                "background_error_base": 1.0, "grid_energy_base": 1.0}

    res = [run("", 0.9, 0.8, 0.07), run("two", 0.7, 0.95, 0.05)]
    md = algorithms.report(res, {})
    assert md.startswith("Runs: 1.")                       # the fronts hold the grid only
    row = next(line for line in md.splitlines() if line.startswith("| Flow-DPPO sample") and "| 0 |" in line
               and "+0.200" in line)
    # two rewards: direction +0.200, colour +0.050, shape lost +0.050, KL 0.050; untagged: +0.400, -0.100
    assert "+0.200 | +0.050 | +0.050 | 0.050 | +0.400 | -0.100 | +0.050 | 0.070" in row
    assert "Variant `two`: advantages.aggregation=gdpo" in md


def test_a_tagged_variant_summary_pairs_seeds_with_their_twins():
    def run(tag, seed, d, c, kl):
        return {"arm": "clip", "value": 1e-4, "epochs": 4, "seed": seed, "tag": tag, "kl_to_base": kl, "direction": d,
                "colour": c, "shape": 0.8, "colour_base": 0.9, "shape_base": 0.85, "commit": "c",
                "extra": ["advantages.aggregation=gdpo"] if tag else [], "direction_base": 0.5,
                "offpolicy_frozen": 0.1, "forgetting": 0.0, "background_error": 1.0, "grid_energy": 1.0,
                "background_error_base": 1.0, "grid_energy_base": 1.0, "wall_seconds": 1800.0}

    # Three seeds: the variant gains 0.1, 0.2, 0.3 less direction and 0.05 more colour than its twin;
    # seed 3 has no twin and counts in the variant's medians only.
    res = [run("", s, 0.9, 0.9, 0.05) for s in range(3)]
    res += [run("two", s, 0.8 - 0.1 * s, 0.95, 0.04) for s in range(3)] + [run("two", 3, 0.5, 0.95, 0.2)]
    md = algorithms.report(res, {})
    row = next(line for line in md.splitlines() if line.startswith("| ratio clipping | clip_range 0.0001 | 4 | 4 |"))
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[4:8] == ["+0.150", "+0.050", "+0.050", "0.040"]      # medians over the four variant runs
    assert cols[8:12] == ["+0.400", "+0.000", "+0.050", "0.050"]     # its three twins
    assert cols[12].startswith("-0.200 [") and cols[13].startswith("+0.050 [+0.050, +0.050]")
    lo, hi = (float(x) for x in cols[12].split("[")[1].rstrip("]").split(","))
    assert -0.3 <= lo < -0.2 < hi <= -0.1
    assert "Compute: 7 runs with the variants, 3.5 hours" in md


def test_a_variant_on_another_model_keeps_its_own_base_and_gets_its_own_page(tmp_path):
    """A ``--tag`` variant with ``model.path=`` measures from another base: its base evaluation is not
    shared with the grid's, its twin's gains come from the twin's own base, and it gets a page of its
    own, the report over its runs alone."""
    assert algorithms.base_dir(tmp_path, "latent", "reads") != algorithms.base_dir(tmp_path, "latent")
    assert algorithms.base_dir(tmp_path) == tmp_path / "_base"
    assert algorithms.base_dir(tmp_path, "shapes", "latent") != algorithms.base_dir(tmp_path, "latent")

    def run(tag, arm, value, seed, d, base):
        return {"arm": arm, "value": value, "epochs": 4, "seed": seed, "tag": tag, "kl_to_base": 0.1 + value * 100,
                "direction": d, "colour": 0.9, "shape": 0.8, "colour_base": 0.9, "shape_base": 0.8, "commit": "c",
                "extra": ["model.path=runs/other"] if tag else [], "direction_base": base, "world": "latent",
                "offpolicy_frozen": 0.1, "forgetting": 0.0, "background_error": 1.0, "grid_energy": 1.0,
                "background_error_base": 1.0, "grid_energy_base": 1.0, "knob": "objective.delta"}

    # The shipped model's base is 0.15, the other model's 0.40; on each seed the variant gains 0.10 at
    # δ 1e-5 and 0.20 at 1e-4, its twins 0.02.
    res = [run("", "sample", v, s, 0.17, 0.15) for s in range(3) for v in (1e-5, 1e-4)]
    res += [run("reads", "sample", v, s, 0.40 + (0.1 if v == 1e-5 else 0.2), 0.40) for s in range(3) for v in (1e-5, 1e-4)]
    res += [run("reads", "row", 1e-4, s, 0.45, 0.40) for s in range(3)]      # one value: a cell, not a sweep
    assert algorithms.model_variant_tags(res) == ["reads"]
    summary = algorithms.tagged_summary(res, "reads")
    row = next(line for line in summary if "0.0001" in line)
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[4] == "+0.200" and cols[8] == "+0.020"          # each against its own base
    assert cols[12].startswith("+0.180 [+0.180, +0.180]")
    page, runs = algorithms.variant_page(res, "reads", "latent", None)
    assert len(runs) == 9 and all(not r["tag"] for r in runs)
    assert page.startswith("Variant `reads` of the latent world: model.path=runs/other.")
    assert "Runs: 9." in page and "Base model held-out direction 0.400" in page
    # The one-value arm is set beside the sample rule's knee (δ 1e-4 here), paired by seed: 0.45 - 0.60.
    paired = page.split("each knee minus")[1]
    assert "| Flow-DPPO row-decided | 3 | -0.150 [-0.150, -0.150] |" in paired


def test_matched_kl_tables_cover_forgetting_and_artifacts_in_their_units():
    def run(arm, s, kl, forget, grid):
        return {"arm": arm, "value": kl, "epochs": 4, "seed": s, "kl_to_base": kl, "direction": 0.8, "commit": "c",
                "direction_base": 0.5, "offpolicy_frozen": 0.1, "forgetting": forget, "background_error": 2.0,
                "grid_energy": grid, "background_error_base": 1.0, "grid_energy_base": 1.0}

    # Arm sample forgets 0.03 more (3 points) and has 1.5 levels more grid energy at every KL, every seed.
    res = [run(arm, s, kl, 0.01 * s + (0.03 if arm == "sample" else 0.0), 4.0 + (1.5 if arm == "sample" else 0.0))
           for arm in ("sample", "clip") for s in (0, 1) for kl in (0.01, 0.1)]
    md = algorithms.report(res, {})
    for name, diff in (("forgetting (pts)", "+3.0"), ("grid energy (levels)", "+1.50"), ("background error (levels)", "+0.0")):
        block = md.split(f"### Matched KL, 4 inner epoch(s): {name}, arm a minus arm b")[1].split("###")[0]
        rows = [line for line in block.splitlines() if line.startswith("| 0.")]
        assert len(rows) == 3 and all(f"| {diff} |" in line for line in rows), (name, rows)


def test_knee_summary_pairs_each_knee_with_the_default_by_seed():
    def run(arm, v, s, d, kl):
        return {"arm": arm, "value": v, "epochs": 4, "seed": s, "kl_to_base": kl, "direction": d, "commit": "c",
                "direction_base": 0.5, "offpolicy_frozen": 0.1, "forgetting": 0.02, "background_error": 1.0,
                "grid_energy": 1.0, "background_error_base": 1.0, "grid_energy_base": 1.0}

    # Five seeds at each knee; clipping's direction is 0.01 * seed below the sample rule's, its KL 0.01 above.
    ks = algorithms.KNEES
    res = [run("sample", ks["sample"], s, 0.9, 0.02) for s in range(5)]
    res += [run("clip", ks["clip"], s, 0.9 - 0.01 * s, 0.03) for s in range(5)]
    res.append(run("clip", ks["clip"] * 10, 0, 0.1, 0.5))                   # not a knee: left out
    lines = algorithms.knee_summary(res)
    clip = next(line for line in lines if line.startswith("| ratio clipping | clip_range"))
    assert "| 5 | 0.880 [" in clip and "| 0.030 [0.030, 0.030] |" in clip
    paired = next(line for line in lines if line.startswith("| ratio clipping | 5 |"))
    cols = [c.strip() for c in paired.strip("|").split("|")]
    assert cols[2].startswith("-0.020 [") and cols[3] == "+0.010 [+0.010, +0.010]" and cols[4] == "+0.0 [+0.0, +0.0]"
    assert not any(line.startswith("| Flow-DPPO sample (paper) | 5 |") for line in lines)   # not against itself


def test_matched_kl_falls_back_to_the_median_seeds_range_when_no_range_covers_every_seed():
    def run(arm, s, kl, d):
        return {"arm": arm, "value": kl, "epochs": 1, "seed": s, "kl_to_base": kl, "direction": d, "commit": "c",
                "direction_base": 0.5, "offpolicy_frozen": 0.1, "forgetting": 0.0, "background_error": 1.0,
                "grid_energy": 1.0, "background_error_base": 1.0, "grid_energy_base": 1.0}

    # Seeds 0-1 span KL 0.01-0.05, seed 2 starts at 0.06: no KL is reached by all three. Clipping is
    # 0.02 below the sample rule everywhere.
    spans = {0: (0.01, 0.05), 1: (0.01, 0.05), 2: (0.06, 0.2)}
    res = [run(arm, s, kl, 0.8 - (0.02 if arm == "clip" else 0.0)) for arm in ("sample", "clip")
           for s, ks in spans.items() for kl in ks]
    rows = algorithms.matched_kl(res, 1)
    assert len(rows) == 3
    for m in rows:
        assert 0.01 < m["kl"] < 0.05 and m["n_seeds"] == 2 and m["mean_diff"] == pytest.approx(0.02)
    # Where even the median fronts do not meet there is nothing to compare.
    far = [r for r in res if r["arm"] == "sample"] + [run("clip", s, kl * 10, 0.7) for s, ks in spans.items() for kl in ks]
    assert algorithms.matched_kl(far, 1) == []


def test_extra_seeds_at_a_knee_join_the_knee_table_not_the_fronts():
    def run(arm, v, s, kl, d):
        return {"arm": arm, "value": v, "epochs": 4, "seed": s, "kl_to_base": kl, "direction": d, "commit": "c",
                "direction_base": 0.5, "offpolicy_frozen": 0.1, "forgetting": 0.0, "background_error": 1.0,
                "grid_energy": 1.0, "background_error_base": 1.0, "grid_energy_base": 1.0}

    ks = algorithms.KNEES
    # Seeds 0-1 sweep two values per arm (KL 0.01-0.1); seed 2 ran only the knees, at KL 0.05.
    res = [run(arm, v, s, kl, 0.8 - (0.02 if arm == "clip" else 0.0)) for arm in ("sample", "clip") for s in (0, 1)
           for v, kl in ((ks[arm], 0.01), (ks[arm] * 10, 0.1))]
    extra = [run(arm, ks[arm], 2, 0.05, 0.3) for arm in ("sample", "clip")]
    assert algorithms.front_runs(res + extra) == res
    rows = algorithms.matched_kl(res + extra, 4)
    assert [m["n_seeds"] for m in rows] == [2, 2, 2] and 0.01 < rows[0]["kl"] < rows[-1]["kl"] < 0.1
    md = algorithms.report(res + extra, {})
    assert md.startswith("Runs: 10. On the fronts: 8")
    clip = next(line for line in md.splitlines() if line.startswith("| ratio clipping | clip_range") and "| 3 |" in line)
    assert "| 3 | 0.620 [" in clip                     # the knee table has all three seeds
    # An arm that no seed swept keeps its runs (a one-value grid still has its points).
    assert algorithms.front_runs(extra) == extra


def test_worlds_are_named_tagged_and_reported_apart(tmp_path):
    """A run of another world is named and tagged with it, runs with its recipe and rewards, and the
    report gives each world its own page and figures from its own runs (the same runs tagged as the
    latent world report as the shapes world's, but for the knee table, which sets them beside the
    shapes world's knees)."""
    assert algorithms.run_name("sample", 1e-5, 4, 0, world="latent") == "latent-sample-1e-05-e4-s0"
    assert algorithms.run_name("sample", 1e-5, 4, 0) == "sample-1e-05-e4-s0"
    ov = algorithms.overrides_for("sample", 1e-5, 4, 0, 20, tmp_path / "r", [], "latent")
    assert any(o.startswith("eval.rewards={latent_direction") for o in ov) and not any("world_" in o for o in ov)
    assert ov.index("optim.lr=3e-5") > ov.index("optim.lr=1e-4")          # the world's own rate wins
    assert algorithms.WORLDS["latent"].recipe.is_file()
    committed = [r for r in json.loads((ROOT / "docs" / "data" / "frontier.json").read_text())
                 if r["epochs"] == 4 and not r.get("tag") and algorithms.world_of(r) == "shapes"]
    mixed = committed + [{**r, "world": "latent"} for r in committed]
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    cmd = [sys.executable, str(ROOT / "tools/bench/algorithms.py"), "--out", str(tmp_path / "runs"), "--docs",
           str(tmp_path / "docs"), "--reuse", str(tmp_path / "mixed.json"), "--report"]
    rep = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (tmp_path / "runs" / "latent-sample-1e-05-e4-s0" / "bench.json").is_file()
    assert len(json.loads((tmp_path / "docs" / "data" / "frontier.json").read_text())) == len(mixed)
    # The same runs read as the latent world: the same page, with the knees set beside the shapes world's
    # (the same knees here, so 1x each) in place of the shapes world's own knee table.
    shapes_md, latent_md = ((tmp_path / "docs" / f).read_text() for f in ("frontier.md", "frontier_latent.md"))

    def without_knee_table(md: str) -> list[str]:
        lines, out, skip = md.splitlines(), [], False
        for line in lines:
            if line.startswith("### "):
                skip = line.startswith("### Each arm's knee read from the runs")
            if not skip:
                out.append(line)
        return out

    assert without_knee_table(latent_md) == without_knee_table(shapes_md)
    assert "within 3x" in latent_md and "within 3x" not in shapes_md
    assert latent_md.count("| 1x | yes |") == 5         # token, sample, clip, row-gated, row-decided
    assert (tmp_path / "docs" / "figures" / "frontier_latent.png").stat().st_size > 10_000


def test_knees_are_read_from_the_runs_by_the_rule_of_KNEES(monkeypatch):
    """The committed shapes-world runs give back KNEES by the documented rule, and the resampled
    seeds say how firmly; a toy sweep checks the rule itself (forgetting past 6 points rules a value
    out; medians over the seeds that ran each value)."""
    committed = [r for r in json.loads((ROOT / "docs" / "data" / "frontier.json").read_text())
                 if algorithms.world_of(r) == "shapes"]
    knees = algorithms.knees_from(committed)
    assert {a: k["value"] for a, k in knees.items() if a in algorithms.KNEES} == algorithms.KNEES
    assert all(0 < sum(k["resampled"].values()) <= 1 + 1e-9 and k["seeds"] == 3 for a, k in knees.items()
               if a in algorithms.KNEES)

    def run(v, s, d, f):
        return {"arm": "sample", "value": v, "epochs": 4, "seed": s, "direction": d, "forgetting": f}

    toy = [run(1e-5, s, 0.5, 0.01) for s in range(3)] + [run(1e-4, s, 0.7, 0.04) for s in range(3)]
    toy += [run(1e-3, 0, 0.9, 0.05), run(1e-3, 1, 0.9, 0.10), run(1e-3, 2, 0.9, 0.10)]   # median forgets 10
    k = algorithms.knees_from(toy)["sample"]
    assert k["value"] == 1e-4 and k["seeds"] == 3
    # Only draws with seed 0 twice or more (7 of 27) let 1e-3 pass: its median forgetting is 5 points there.
    assert math.isclose(k["resampled"][1e-3], 7 / 27) and math.isclose(k["resampled"][1e-4], 20 / 27)
    # The shapes page says so where the knees the runs give differ from the constant its summary uses.
    assert "differ from `KNEES`" not in (ROOT / "docs" / "frontier.md").read_text()
    monkeypatch.setitem(algorithms.KNEES, "clip", 3e-4)
    assert "differ from `KNEES`**, where the table above and the knee stage's extra seeds sit: " \
        "ratio clipping: `KNEES` 0.0003, the runs 0.0001." in algorithms.report(committed, {})
    # Along the front: each other value minus the knee, paired by seed.
    full = [{**r, "kl_to_base": r["value"], "background_error": 1.0, "grid_energy": 0.1} for r in toy]
    along = algorithms.along_front(full, {"sample": 1e-4})
    rows = [line for line in along if line.startswith("| Flow-DPPO sample")]
    assert [r.split(" | ")[1] for r in rows] == ["1e-05 − 0.0001", "0.001 − 0.0001"]
    assert "| 3 | -0.200 [-0.200, -0.200] |" in rows[0] and "| 3 | +0.200 [+0.200, +0.200] |" in rows[1]
    lines = algorithms.knee_table(toy, "latent", {"sample": {"value": 1e-5, "resampled": {1e-5: 1.0}}})
    row = next(line for line in lines if line.startswith("| Flow-DPPO sample"))
    assert "| 0.0001 |" in row and "| 10x | no |" in row


def test_resampled_knees_weigh_each_multiset_of_seeds_as_the_ordered_draws_do():
    """Reading each multiset of seeds once, weighted, gives exactly the shares of all n^n ordered
    draws (here 5 seeds: 126 readings for 3,125 draws)."""
    rng = random.Random(0)
    runs = [{"arm": "sample", "value": v, "epochs": 4, "seed": s, "direction": rng.random(),
             "forgetting": rng.uniform(0, 0.12)} for v in (1e-5, 1e-4, 1e-3) for s in range(5)]
    by = {(r["value"], r["seed"]): r for r in runs}
    brute: dict[float, int] = {}
    for draw in itertools.product(range(5), repeat=5):
        med = {v: (statistics.median(by[v, s]["direction"] for s in draw),
                   statistics.median(by[v, s]["forgetting"] for s in draw)) for v in (1e-5, 1e-4, 1e-3)}
        k = algorithms._knee_of(med, algorithms.KNEE_MAX_FORGETTING)
        if k is not None:
            brute[k] = brute.get(k, 0) + 1
    got = algorithms.knees_from(runs)["sample"]["resampled"]
    assert got.keys() == brute.keys() and len(got) >= 2
    assert all(math.isclose(got[v], brute[v] / 5 ** 5) for v in got)


def test_stage_wall_times_are_kept_in_the_docs_and_split_by_world(tmp_path, monkeypatch, capsys):
    """A report on a machine without the runs' stages.json keeps the committed times; a stage run
    here adds its own; the latent world's stages go to its page only; a stage in the wrong world is
    refused with exit 2."""
    docs, out = tmp_path / "docs", tmp_path / "runs"
    (docs / "data").mkdir(parents=True)
    out.mkdir()
    (docs / "data" / "frontier_stages.json").write_text(json.dumps({"seed0": 600.0}))
    (out / "stages.json").write_text(json.dumps({"transfer": 120.0, "latent:transfer": 60.0, "knees": 300.0}))
    times = algorithms.load_stage_times(out, docs)
    assert json.loads((docs / "data" / "frontier_stages.json").read_text()) == times
    assert algorithms.stage_times_of(times, "shapes") == {"seed0": 600.0, "knees": 300.0}
    assert algorithms.stage_times_of(times, "latent") == {"transfer": 180.0}
    assert algorithms.stage_key("transfer", "latent") == "latent:transfer"
    (out / "stages.json").unlink()                       # a fresh machine: the committed times stay
    assert algorithms.load_stage_times(out, docs) == times
    (out / "stages.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as e:
        algorithms.load_stage_times(out, docs)
    assert e.value.code == 2 and "stages.json: not a JSON object" in capsys.readouterr().err
    assert json.loads((docs / "data" / "frontier_stages.json").read_text()) == times    # nothing lost
    assert algorithms.stage_times_of({"two: seeds 0-2": 5.0}, "shapes") == {"two: seeds 0-2": 5.0}
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(sys, "argv", ["algorithms.py", "--stage", "transfer", "--world", "shapes",
                                      "--out", str(fresh), "--docs", str(fresh)])
    with pytest.raises(SystemExit) as e:
        algorithms.main()
    assert e.value.code == 2 and not fresh.exists()                 # refused before anything is written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stage transfer runs in the latent world" in err[0]
