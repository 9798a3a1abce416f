"""``docs/benchmarks.md`` is written by ``tools/bench/run_all.py``: sections (a)-(c) from its own
runs, then every ``docs/*_section.md`` that the long benchmarks write (or a person edits). A
section edited only in ``benchmarks.md`` is lost at the next ``make bench`` (it happened to (d)'s
"superseded" note and the five-stage rerun), so the document's tail must be those files, verbatim."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))
import run_all  # noqa: E402


def test_benchmarks_md_ends_with_the_section_files_verbatim():
    docs = ROOT / "docs"
    names = run_all.SECTION_FILES
    assert sorted(names) == sorted(p.name for p in docs.glob("*_section.md")), "a section file run_all does not keep"
    tail = "\n".join(part for name in names for part in ((docs / name).read_text().strip(), ""))
    doc = (docs / "benchmarks.md").read_text()
    assert doc.endswith(tail), "docs/benchmarks.md differs from the *_section.md files: edit the section file"
    head = doc[: len(doc) - len(tail)]
    assert re.findall(r"^## \(([a-z])\)", head, flags=re.M) == ["a", "b", "c"]
