"""The demo-across-seeds benchmark trains through the CLI, resumes finished seeds and writes its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["run.iterations=1", "eval.every=1", "data.prompts_per_iteration=1", "data.group_size=4",
        "optim.minibatch_size=2", "optim.inner_epochs=2", "eval.samples_per_prompt=1", "run.sample_every=1000",
        "run.checkpoint_every=1000", "run.report_every=0", "run.tensorboard=false",
        "eval.prompts=[a red circle moves left slowly on black, a blue square moves up quickly on gray]"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "bench" / "demo_seeds.py"), "--out", str(tmp_path / "runs"),
           "--docs", str(tmp_path / "docs"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_a_seed_trains_once_and_lands_in_the_table(tmp_path):
    proc = _bench(tmp_path, "--seeds", "3", "--jobs", "1", "--tag", "tiny", *TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "docs" / "data" / "demo_seeds.json").read_text())
    assert [(r["tag"], r["seed"], r["iterations"]) for r in rows] == [("tiny", 3, 1)]
    r = rows[0]
    assert r["overrides"] == TINY and r["threads"] == 2 and r["wall_seconds"] > 0
    for k in ("direction", "colour", "shape", "background_error", "grid_energy"):
        assert 0 <= r[k] < 256 and 0 <= r[f"{k}_base"] < 256, k
    assert r["kl_to_base"] > 0                                    # one update moved the policy
    md = (tmp_path / "docs" / "demo_seeds.md").read_text()
    assert f"| tiny | 3 | {r['direction_base']:.3f} → {r['direction']:.3f} |" in md

    # A finished seed is read, not retrained: its log and metadata are untouched.
    log = tmp_path / "runs" / "tiny-s3.log"
    stamp = (log.stat().st_mtime_ns, (tmp_path / "runs" / "tiny-s3" / "demo_seed.json").read_text())
    again = _bench(tmp_path, "--seeds", "3", "--jobs", "1", "--tag", "tiny", *TINY)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (log.stat().st_mtime_ns, (tmp_path / "runs" / "tiny-s3" / "demo_seed.json").read_text()) == stamp
    assert json.loads((tmp_path / "docs" / "data" / "demo_seeds.json").read_text()) == rows


def test_a_failing_seed_is_one_line_naming_its_log(tmp_path):
    proc = _bench(tmp_path, "--seeds", "0", "--jobs", "1", "--tag", "bad", "optim.inner_epochs=0")
    assert proc.returncode != 0
    assert "seed 0 (bad) failed with exit 2" in proc.stderr and "bad-s0.log" in proc.stderr
    assert "optim.inner_epochs" in (tmp_path / "runs" / "bad-s0.log").read_text()


def test_report_keeps_the_rows_of_runs_not_on_this_machine(tmp_path):
    """Runs of another machine keep their committed rows (and commits) through a report with no run here."""
    data = tmp_path / "docs" / "data"
    data.mkdir(parents=True)
    row = {"tag": "elsewhere", "seed": 1, "iterations": 40, "wall_seconds": 600.0, "threads": 1, "commit": "abc1234",
           "overrides": ["model.lora.rank=0"], "kl_to_base": 0.01,
           **{f"{k}{s}": 0.5 for k in ("direction", "colour", "shape", "background_error", "grid_energy")
              for s in ("", "_base")}}
    (data / "demo_seeds.json").write_text(json.dumps([row, {**row, "tag": "demo", "seed": 0}]))
    (tmp_path / "runs").mkdir()
    proc = _bench(tmp_path, "--report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((data / "demo_seeds.json").read_text())
    assert [(r["tag"], r["seed"], r["commit"]) for r in rows] == [("demo", 0, "abc1234"), ("elsewhere", 1, "abc1234")]
    md = (tmp_path / "docs" / "demo_seeds.md").read_text()
    assert "| elsewhere | 1 | 0.500 → 0.500 |" in md and "`elsewhere`: overrides model.lora.rank=0" in md
    assert "`demo`: the default recipe" in md
