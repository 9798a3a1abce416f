"""ZeRO-3 and Ulysses through the trainer at tiny width (issue 33, item 4): the path of
``tools/bench/parallel_width.py``, whose real-width run is the benchmark's (Wan 2.1 1.3B's
architecture; docs/benchmarks.md, section ``parallel_width`` once run).

The script writes the run's text cache once (the text encoder built alone, in its own process), then
trains one iteration of the tiny Wan (LoRA, float32: the exactness pass) in one process and, in one
``torchrun`` launch of 2 gloo ranks with ZeRO-3 and sequence parallel 2 together (world 2 = 1
data-parallel x 2 sequence-parallel ranks; ZeRO shards over the world). Each alone is checked against
one process in tests/test_zero.py and tests/test_sequence_parallel.py; the script runs all three. Every rank
wraps the text encoder's constructor to fail; the loss, the gradient norm and the checkpoint's
trained weights must match the one process within the script's stated float32 tolerances.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

SCRIPT = ROOT / "tools" / "bench" / "parallel_width.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("parallel_width")
    out = d / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    args = [sys.executable, str(SCRIPT), "--tiny", "--one-launch", "--modes", "lora", "--dtypes", "float32",
            "--layouts", "one,zero3_sp2", "--work", str(d / "work"), "--keep-checkpoints"]
    try:
        proc = subprocess.run([*args, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=400)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        # --resume in the finished work folder reads every launch back: nothing runs again.
        again = subprocess.run([*args, "--resume", "--out", str(d / "again.json")], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"parallel_width.py --tiny did not finish in {e.timeout} s")
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count("finished before, read back") == 2 and "== cache:" not in again.stdout
    r = json.loads(out.read_text())
    resumed = json.loads((d / "again.json").read_text())
    assert resumed["groups"] == r["groups"] and resumed["caches"] == r["caches"]
    return r


def test_no_rank_builds_the_text_encoder(result):
    cache = result["caches"]["all"]
    assert cache["encoders_built"] == 1 and cache["rows"] == 4     # the guard is live: the cache step built one
    runs = result["groups"]["lora/float32"]["runs"]
    assert set(runs) == {"one", "zero3_sp2"}
    for lay, run in runs.items():
        assert len(run["ranks"]) == run["processes"] == (1 if lay == "one" else 2)
        for rank in run["ranks"]:
            assert rank["encoders_built"] == 0, lay
            assert rank["text_stats"]["text/encoded_prompts"] == 0 and rank["text_stats"]["text/cached_prompts"] == 4


@pytest.mark.parametrize("layout", ["zero3_sp2"])
def test_two_ranks_match_one_process(result, layout):
    group = result["groups"]["lora/float32"]
    run, one = group["runs"][layout], group["runs"]["one"]
    tol = result["tolerances"]["float32"]
    assert run["within"] == {"loss": True, "grad_norm": True, "weights": True}, run["vs_one"]
    w = run["vs_one"]["weights"]
    assert w["rel_to_update"] <= tol["weights_rel"] and w["dtype_mismatch_count"] == 0
    assert w["update_norm"] > 0 and w["elements"] > 0          # not a comparison of unchanged weights
    assert run["vs_one"]["grad_norm_rel"] <= tol["grad_norm_rel"] and one["metrics"]["grad_norm"] > 0
    # Each rank's peak RSS and the planner's per-rank figure are both measured.
    assert all(r["peak_rss_bytes"] > 0 for r in run["ranks"]) and run["planner"]["train"] > 0


def test_the_layouts_are_what_they_say(result):
    runs = result["groups"]["lora/float32"]["runs"]
    assert {"parallel.zero_stage=3", "parallel.sequence_parallel=2"} <= set(runs["zero3_sp2"]["overrides"])
    assert "parallel.zero_persistence_threshold=0" in runs["zero3_sp2"]["overrides"]     # every tiny weight sharded
