"""Every benchmark in ``tools/bench`` runs at smoke size against the current code (issue 19, item 0).

Each script runs in its own process with ``--smoke`` (a 5-frame 32x32 video, 8 tokens, one or two
repeats) and its outputs go to a temporary folder. The tests assert only that it ran and wrote its
figures: the JSON and markdown exist and hold the keys the document is built from. The numbers at
this size mean nothing. ``algorithms.py`` and ``calibrate*.py`` are kept by their owner and not
run here.

Not covered: the peak-memory probes of (a)-(c) (one fresh process per variant, 8 in all, ~40 s on
this 2-core machine; they rebuild the same setup through the same functions the timed runs use).
The two-process benchmarks (ZeRO-3, sequence parallelism) are marked ``slow``: torchrun, two
torch imports and a DeepSpeed engine take ~20 s each here however small the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowdppo_video.commands.benchmarking import median_interval, sections

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench"
TIMED = ["rollout_vs_pipeline", "update_step", "objective_overhead"]
# Every script here must be covered by a test below, or named as kept elsewhere.
COVERED = {*TIMED, "run_all", "reward_throughput", "zero_memory", "sp_memory", "real_size", "rollout_cost",
           "update_memory"}
NOT_OURS = {"algorithms", "demo_seeds", "clean_rl", "rollout_payoff", "parallel_width", "_common"}   # test_frontier_bench,
# test_demo_seeds, test_clean_rl_tools, test_rollout_payoff_tools, test_parallel_width; a helper


def _run(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    try:
        r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(map(str, args[:2]))} did not finish in {e.timeout} s at smoke size")
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_every_benchmark_script_has_a_smoke_test() -> None:
    scripts = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("calibrate")}
    assert scripts - NOT_OURS == COVERED, "a benchmark without a smoke test (add it here), or a stale name"


def test_timed_benchmarks_run_through_run_all(tmp_path: Path) -> None:
    """(a), (b), (c) through the runner, which also writes the document from their JSON."""
    doc = tmp_path / "benchmarks.md"
    _run(BENCH / "run_all.py", "--smoke", "--no-memory", "--doc", doc, "--json-dir", tmp_path)
    for name in TIMED:
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["name"] == name and data["config"]["smoke"] is True and data["repeats"] == 2
        assert data["config"]["tokens"] == 8 and data["config"]["video"]["num_frames"] == 5
        for v in data["variants"].values():
            assert len(v["times_s"]) == 2 and min(v["times_s"]) > 0 and v["memory"] is None
        for c in data["comparisons"]:
            lo, hi = c["paired_interval"]
            assert lo <= c["paired_ratio_median"] <= hi and 0 < c["paired_interval_coverage"] <= 1
            assert c["pass"] == (c["verdict_ratio"] <= c["target"])
            assert len(c["paired_ratios"]) == 2
        # (a) decides on the paired ratio; (b) and (c) on the ratio of medians
        want = "paired_ratio_median" if name == "rollout_vs_pipeline" else "ratio"
        assert {c["verdict_on"] for c in data["comparisons"]} == {want}
        assert data["command"].startswith(f".venv/bin/python tools/bench/{name}.py")
    text = doc.read_text()
    for head in ["## (a) rollout() vs diffusers WanPipeline.__call__",
                 "## (b) Flow-DPPO update step vs bare forward+backward",
                 "## (c) Flow-DPPO vs grpo_clip objective step time"]:
        assert head in text
    assert "Failed:" not in text and "What the numbers mean:" in text and "interval" in text


def test_reward_throughput(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nkept\n")
    _run(BENCH / "reward_throughput.py", "--smoke", "--out", out)
    assert out.read_text().startswith("# Benchmarks\n\nkept\n\n<!-- section: rewards -->")
    text = sections(out.read_text())["rewards"]
    assert text.startswith("## (e) Rewards")
    assert "| 4×32x32 |" in text and "| video size | videos/s |" in text and "through the server s" in text


@pytest.mark.slow
def test_zero_and_sequence_parallel_memory(tmp_path: Path) -> None:
    """ZeRO-3 and SP at 2 ranks; the SP run reads the ZeRO measurement from the first (one engine less)."""
    zj, zmd = tmp_path / "zero.json", tmp_path / "zero.md"
    _run(BENCH / "zero_memory.py", "--smoke", "--out", zj, "--section", zmd)
    z = json.loads(zj.read_text())
    assert z["smoke"] is True and z["world"] == 2 and set(z["median_s"]) == {"unsharded", "zero3_layer", "zero3_full"}
    assert len(z["memory_zero3_per_rank"]) == 2 and z["memory_stage0"]["total"] > 0 and "ratio" in z
    assert sections(zmd.read_text())["zero"].startswith("## ZeRO-3 at 2 ranks")
    sj, smd = tmp_path / "sp.json", tmp_path / "sp.md"
    _run(BENCH / "sp_memory.py", "--smoke", "--out", sj, "--section", smd, "--zero-json", zj)
    s = json.loads(sj.read_text())
    assert s["smoke"] is True and s["tokens"] == 8 and set(s["summary"]) == {"sp1", "sp1_ckpt", "sp2", "sp2_ckpt"}
    assert {"saved", "saved_ckpt", "rss", "rss_ckpt"} <= set(s["ratios"]) and "pass" in s
    text = sections(smd.read_text())["sp"]
    assert text.startswith("## Sequence parallelism") and "### The memory planner beside the measurements" in text


@pytest.mark.slow
def test_real_size_dry_run(tmp_path: Path) -> None:
    """(h) at smoke size: the family's tiny shapes through train, resume, sample, export and the
    diffusers load, five CLI processes (~35 s here, most of it their imports)."""
    out, md = tmp_path / "real_size.json", tmp_path / "real_size.md"
    _run(BENCH / "real_size.py", "--smoke", "--work", tmp_path / "work", "--out", out, "--section", md)
    r = json.loads(out.read_text())
    assert r["smoke"] is True and list(r["phases"]) == ["train", "resume", "sample", "export", "load"]
    for p in r["phases"].values():
        assert p["wall_s"] > 0 and p["peak_rss_bytes"] > 0 and p["planner_bytes"] > 0
    assert r["lora"]["count"] > 0 and r["encoder_release"]["after_bytes"] > 0
    assert len(r["iterations"]) == 2                     # the first iteration and the resumed one
    assert set(r["export"]["loaded"]) >= {"transformer", "text_encoder", "vae"}
    table = sections(md.read_text())["real_size"]
    assert "| train |" in table and "| load |" in table
    # Every phase finished: --resume keeps them all and writes the same numbers.
    again = tmp_path / "again.json"
    _run(BENCH / "real_size.py", "--smoke", "--resume", "--work", tmp_path / "work", "--out", again)
    assert json.loads(again.read_text())["phases"] == r["phases"]


def test_real_size_keeps_where_a_killed_phase_stopped(tmp_path: Path) -> None:
    """A phase over --max-rss-gib is killed, and its peak, resident set over time and last lines are kept
    (a model too large for the machine is reported with the point it reached)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, str(BENCH / "real_size.py"), "--smoke", "--max-rss-gib", "0.05",
                        "--work", str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "phase train failed (killed at" in r.stderr, r.stderr[-2000:]
    failed = json.loads((tmp_path / "work" / "logs" / "train.failed.json").read_text())
    assert failed["killed_above_bytes"] > 0.05 * 2 ** 30 and failed["max_rss_gib"] == 0.05
    assert failed["rss_samples"] and failed["peak_rss_bytes"] >= failed["killed_above_bytes"]


def test_update_memory_profiles_the_update(tmp_path: Path) -> None:
    """Issue 33's profile at the tiny Wan: the resident set by phase, torch's own allocations in the update
    (with their addresses: what is still held at the peak, by operator) and the planner beside them."""
    out = tmp_path / "um.json"
    _run(BENCH / "update_memory.py", "--tiny", "--work", tmp_path / "work", "--out", out)
    r = json.loads(out.read_text())
    assert {"build", "rollout", "update"} <= set(r["rss_by_phase"])
    assert all(p["peak"] >= p["first"] > 0 for p in r["rss_by_phase"].values())
    tu = r["torch_update"]
    assert tu["allocations"] > 0 and tu["allocated_bytes_total"] >= tu["peak_bytes_over_start"] > 0
    held = sum(row["bytes"] for row in tu["held_at_peak_by_op"])
    assert 0 < held <= tu["peak_bytes_over_start"] + tu["allocated_bytes_total"]
    assert any(row["op"].startswith("aten::") for row in tu["held_at_peak_by_op"])
    assert r["planner"]["stages"]["train"] > 0 and r["metrics"]["time/update_s"] > 0


def test_median_interval_is_the_order_statistics_interval() -> None:
    lo, hi, cover = median_interval([1.3, 1.0, 1.2, 0.9, 1.1])
    assert (lo, hi) == (0.9, 1.3) and cover == pytest.approx(1 - 2 / 32)        # min..max of 5: 93.75%
    lo, hi, cover = median_interval([float(x) for x in range(10)])
    assert (lo, hi) == (1.0, 8.0) and cover == pytest.approx(1 - 2 * 11 / 1024)  # x_(2)..x_(9) of 10
    assert median_interval([2.0, 1.0])[2] == pytest.approx(0.5)


def test_rollout_cost(tmp_path: Path) -> None:
    """Issue 34's benchmark at 1 prompt x 4 videos: both shapes, every variant, the tail's reward agreement."""
    out, md = tmp_path / "rollout_cost.json", tmp_path / "benchmarks.md"
    _run(BENCH / "rollout_cost.py", "--smoke", "--out", out, "--section", md)
    r = json.loads(out.read_text())
    assert r["smoke"] is True and set(r["shapes"]) == {"default", "wan"}
    for shape in r["shapes"].values():
        v = shape["variants"]
        assert list(v)[0] == "plain" and v["plain"]["evals_ratio"] == 1.0
        assert v["tail3_dpm2m"]["evals_ratio"] < 1
        assert v["shared_tail3_dpm2m"]["evals_ratio"] < v["tail3_dpm2m"]["evals_ratio"]
    assert set(r["agreement"]["tails"]) == {"tail2_euler", "tail2_heun"}
    assert sections(md.read_text())["rollout_cost"].startswith("## Cheaper rollouts")
