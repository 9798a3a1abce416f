"""The import layers (pyproject.toml's ``[tool.importlinter]`` contracts) are kept by the tool:
the tree passes ``lint-imports``, and a copy of it with one forbidden import in each layer fails
it, naming the broken contract and the offending import."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.is_file(), reason="import-linter is not installed (the test extra)")


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the packages under ``root`` (it puts its working directory first on
    ``sys.path``, so a copy is analysed, not the installed tree)."""
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=120)


def copy_tree(dest: Path) -> Path:
    """The two packages' sources and the contracts, copied to ``dest``."""
    for pkg in ("flowdppo_video", "rewards"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "weights", "*.txt"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_tree_keeps_every_contract():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize("module, line, contract, offender", [
    ("flowdppo_video/models/base.py", "from ..parallel import sequence",
     "models/ imports no parallelism", "flowdppo_video.models.base -> flowdppo_video.parallel.sequence"),
    ("rewards/basic.py", "import flowdppo_video.world",
     "rewards imports nothing of flowdppo_video", "rewards.basic -> flowdppo_video.world"),
    ("flowdppo_video/sde.py", "from . import trainer",
     "pure math (sde, objectives, advantages) imports no models", "flowdppo_video.sde -> flowdppo_video.trainer"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract, offender):
    root = copy_tree(tmp_path)
    path = root / module
    # A function-level import counts as much as a top-level one (models/ used to hide theirs so).
    path.write_text(path.read_text() + f"\n\ndef _violation() -> None:\n    {line}  # noqa\n")
    proc = lint(root)
    out = " ".join(proc.stdout.split())          # the tool wraps long lines
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    # The named contract is among the broken ones (sde's import also reaches models/ through config).
    after = out.split(contract, 1)[1]
    assert re.search(r"\b(KEPT|BROKEN)\b", after).group(1) == "BROKEN", out[-3000:]
    assert offender in out
