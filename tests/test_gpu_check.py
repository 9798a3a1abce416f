"""``tools/gpu_check.sh`` (issue 19, item 5) at its tiny size on the CPU: the very script a GPU
runs, through ``flowdppo-video train``, so it cannot rot before a GPU is at hand. The numbers at
this size mean nothing; the test asserts that it ran and printed and wrote its figures. The
compiled variants are left out here (inductor takes ~2 minutes on this CPU; tests/test_speed_switches.py
covers ``model.compile``); flash is asked for so its skip (or run, where installed) is exercised.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_at_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "GPU_CHECK_VARIANTS": "native,flash", "GPU_CHECK_OUT": str(out),
           "OMP_WAIT_POLICY": "PASSIVE", "PYTHON": os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python"))}
    r = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "tiny"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| variant | videos/s | rollout s | update s |" in r.stdout
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["size"] == "tiny" and set(data["variants"]) == {"native", "flash"}
    native = data["variants"]["native"]
    assert native["videos_per_s"] > 0 and native["update_s"] > 0 and native["planner_gib"] > 0
    assert native["peak_rss_gib"] > 0 and abs(native["ratio_first_max_abs_log"]) < 1e-4
    if data["device"] == "cpu":
        assert native["mfu"] is None and native["peak_memory_gib"] is None      # CUDA only
        assert data["variants"]["flash"]["skipped"].startswith("skipped")
    assert "| native |" in (out / "gpu_check.md").read_text()
