"""``tools/gpu_check.sh`` (issue 19, item 5) at its tiny size on the CPU: the very script a GPU
runs, through ``flowdppo-video train``, so it cannot rot before a GPU is at hand. The numbers at
this size mean nothing; the test asserts that it ran and printed and wrote its figures. The
compiled variants are left out here (inductor takes ~2 minutes on this CPU; tests/test_speed_switches.py
covers ``model.compile``); flash and the 2-GPU variant are asked for so their skips (or runs, where
possible) are exercised. The native variant runs with the KL-map snapshot at every iteration (the
path of issue 28, item 1), and the compiled column reports ``off`` for it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "GPU_CHECK_VARIANTS": "native+snapshot,flash,native+2gpu", "GPU_CHECK_OUT": str(out),
           "OMP_WAIT_POLICY": "PASSIVE", "PYTHON": os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python"))}
    r = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "tiny"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| variant | videos/s | rollout s | update s |" in r.stdout and "| compiled | KL maps |" in r.stdout
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["size"] == "tiny" and set(data["variants"]) == {"native+snapshot", "flash", "native+2gpu"}
    native = data["variants"]["native+snapshot"]
    assert native["videos_per_s"] > 0 and native["update_s"] > 0 and native["planner_gib"] > 0
    assert native["peak_rss_gib"] > 0 and abs(native["ratio_first_max_abs_log"]) < 1e-4
    assert native["klmaps"] == 2 and native["compile"] is False and native["compiled_graphs"] is None
    if data["device"] == "cpu":
        assert native["mfu"] is None and native["peak_memory_gib"] is None      # CUDA only
        assert data["variants"]["flash"]["skipped"].startswith("skipped")
        assert data["variants"]["native+2gpu"]["skipped"] == ("skipped: 0 GPU(s) here; needs 2 (torchrun, NCCL, "
                                                             "SP 2, ZeRO-3)")
    md = (out / "gpu_check.md").read_text()
    assert "| native+snapshot |" in md and "| off | 2 |" in md


def test_the_check_configs_ask_for_what_they_claim(tmp_path: Path) -> None:
    """The variants' configs: compilation, the snapshot at every iteration, and the 2-GPU layout."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    assert gpu_check.check_config("tiny", "native+compile", tmp_path)["model"]["compile"] is True
    assert gpu_check.check_config("tiny", "native+snapshot", tmp_path)["run"]["report_every"] == 1
    two = gpu_check.check_config("tiny", "native+2gpu", tmp_path)
    assert two["parallel"] == {**two["parallel"], "sequence_parallel": 2, "zero_stage": 3, "backend": "nccl"}
    assert two["run"]["report_every"] == 1 and gpu_check.world("native+2gpu") == 2
    assert gpu_check.compiled({"compile": True, "compiled_graphs": 0}) == "NO (0 graphs)"
    assert gpu_check.compiled({"compile": True, "compiled_graphs": 30}) == "yes (30 graphs)"
