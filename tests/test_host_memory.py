"""run.release_host_memory (issue 33): glibc gives freed blocks back at once, so a CPU run's resident set
follows its live tensors rather than what the heap kept after a churn of short-lived tensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowdppo_video.runs.config import ConfigError, load_config
from flowdppo_video.runs.host_memory import release_freed_memory

ROOT = Path(__file__).resolve().parents[1]
# Short-lived tensors of many sizes, a small one kept from each round: the holes they leave in the heap
# are what glibc keeps (an update's pattern: the live set is small, the traffic large). With "trainer",
# the setting comes from a Trainer built with run.release_host_memory=true, as a run applies it (through
# release_freed_memory).
CHURN = r"""
import sys, torch
how = sys.argv[1]
if how == "trainer":
    from flowdppo_video.runs.config import load_config
    from flowdppo_video.trainer import Trainer
    cfg = load_config(sys.argv[2], [f"run.output_dir={sys.argv[3]}", "run.release_host_memory=true",
                                    "run.tensorboard=false", "run.report_every=0", "run.device=cpu"])
    Trainer(cfg).close()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
torch.manual_seed(0)
start, keep = rss(), []
for _ in range(300):
    xs = [torch.empty(int(torch.randint(64_000, 4_000_000, ()).item()), dtype=torch.uint8).fill_(1) for _ in range(20)]
    keep.append(torch.empty(200_000, dtype=torch.uint8).fill_(1))
    del xs
print(rss() - start, sum(k.numel() for k in keep) / 2 ** 20)
"""


def _churn(*args: str) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", CHURN, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    grown, alive = map(float, r.stdout.split()[-2:])
    return grown, alive


def _glibc() -> bool:
    import ctypes
    return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc")
def test_freed_blocks_go_back_and_the_resident_set_follows_the_live_tensors(tmp_path: Path) -> None:
    kept, alive = _churn("none")
    released, alive_2 = _churn("trainer", str(ROOT / "configs" / "wan_tiny.yaml"), str(tmp_path / "run"))
    assert alive == alive_2 == pytest.approx(57.2, abs=0.1)
    # Released: the growth is the kept tensors plus small-block slack; by default the heap holds far more.
    assert released < alive + 24, (released, alive)
    assert kept > released + 40, (kept, released)


def test_the_setting_is_a_boolean() -> None:
    assert load_config(ROOT / "configs" / "wan_tiny.yaml", ["run.release_host_memory=true"]).run.release_host_memory
    with pytest.raises(ConfigError, match="release_host_memory"):
        load_config(ROOT / "configs" / "wan_tiny.yaml", ["run.release_host_memory=sometimes"])


def test_a_threshold_below_one_byte_is_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        release_freed_memory(0)
