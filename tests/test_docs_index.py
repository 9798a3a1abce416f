"""``docs/`` has an index and its data apart (issue 29, item 6): ``docs/README.md`` links every page,
every data file and every figure; JSON sits in ``docs/data/``, images in ``docs/figures/``, prose in
``docs/``; and every relative link or image of the README and of the pages resolves."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _links(md: Path) -> list[str]:
    """Relative link and image targets of a markdown file, code blocks left out."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
            if not re.match(r"[a-z][a-z0-9+.-]*:", t) and t.split("#")[0]]


def test_data_and_figures_are_in_their_own_folders():
    assert not [p.name for p in DOCS.iterdir() if p.is_file() and p.suffix != ".md"], "data in docs/data, figures in docs/figures"
    assert all(p.suffix == ".json" for p in (DOCS / "data").iterdir())
    assert all(p.suffix in (".png", ".jpg", ".gif", ".svg") for p in (DOCS / "figures").iterdir())


def test_the_index_links_every_page_data_file_and_figure():
    linked = {(DOCS / t).resolve() for t in _links(DOCS / "README.md")}
    files = [p for p in (*DOCS.glob("*.md"), *DOCS.glob("data/*"), *DOCS.glob("figures/*")) if p.name != "README.md"]
    missing = [p.relative_to(DOCS).as_posix() for p in files if p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link {missing}"


def test_every_relative_link_resolves():
    broken = [f"{md.relative_to(ROOT)}: {t}" for md in PAGES for t in _links(md) if not (md.parent / t).exists()]
    assert not broken, broken
