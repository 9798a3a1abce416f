"""``docs/benchmarks.md`` is written by ``tools/bench/run_all.py`` (sections (a)-(c), from its own
runs) and, after them, by the long benchmarks and by hand: each of those parts is a section between
``<!-- section: NAME -->`` and ``<!-- /section: NAME -->`` that its tool writes in place
(:func:`flowdppo_video.commands.benchmarking.write_section`) and that a rewrite by ``run_all.py`` keeps
verbatim. Text outside the sections after (a)-(c) would be lost at the next ``make bench`` (it
happened to (d)'s "superseded" note when the sections were separate files), so there is none."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from flowdppo_video.commands.benchmarking import outside_sections, section_block, sections, write_section

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
# Every section of the committed document, in its order (docs/README.md names each one's writer).
SECTIONS = ["rewards", "algorithms", "zero", "sp", "real_size", "real_size_wan2.2_ti2v_5b", "real_size_notes",
            "parallel_width", "gpu_check", "rollout_cost", "rollout_payoff", "rollout_payoff_notes"]


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "tools" / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_md_is_the_runners_part_then_its_sections():
    text = DOC.read_text()
    assert list(sections(text)) == SECTIONS
    assert text.count("<!-- section:") == text.count("<!-- /section:") == len(SECTIONS), "an unclosed section"
    head, rest = outside_sections(text)
    assert rest.strip() == "", f"text outside the sections is lost at the next rewrite: {rest.strip()[:200]!r}"
    assert re.findall(r"^## \(([a-z])\)", head, flags=re.M) == ["a", "b", "c"]
    assert not list((ROOT / "docs").glob("*_section.md")), "a section lives in docs/benchmarks.md, once"


def test_a_rewrite_by_run_all_keeps_every_section_verbatim(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC.read_text())
    _run_all().write_doc(doc, [("update_step", None, float("nan"))], ["run_all.py"], "")
    new = doc.read_text()
    assert sections(new) == sections(DOC.read_text())
    assert "## update_step" in new and "Failed:" in new and outside_sections(new)[1].strip() == ""
    again = doc.read_text()
    _run_all().write_doc(doc, [("update_step", None, float("nan"))], ["run_all.py"], "")
    assert sections(doc.read_text()) == sections(again)


def test_write_section_replaces_its_own_section_or_appends_it(tmp_path):
    doc = tmp_path / "d.md"
    write_section(doc, "zero", "## ZeRO\n\nold table\n")
    assert doc.read_text() == section_block("zero", "## ZeRO\n\nold table") == \
        "<!-- section: zero -->\n## ZeRO\n\nold table\n<!-- /section: zero -->\n"
    doc.write_text("# Benchmarks\n\nhead\n\n" + doc.read_text() + "\n" + section_block("sp", "## SP\n\nsp table"))
    write_section(doc, "zero", "## ZeRO\n\nnew table")
    assert sections(doc.read_text()) == {"zero": "## ZeRO\n\nnew table\n", "sp": "## SP\n\nsp table\n"}
    assert doc.read_text().startswith("# Benchmarks\n\nhead\n\n<!-- section: zero -->\n")
    write_section(doc, "real_size", "## (h)")
    assert list(sections(doc.read_text())) == ["zero", "sp", "real_size"]


def test_each_real_size_model_writes_its_own_section(tmp_path):
    """A real_size.py run replaces its model's table only: never another model's, nor the notes."""
    spec = importlib.util.spec_from_file_location("real_size", ROOT / "tools" / "bench" / "real_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shapes = ROOT / "configs" / "model_shapes"
    names = [module.section_name({"model_config": m}) for m in
             (None, str(shapes / "wan2.1_t2v_1.3b"), str(shapes / "wan2.2_ti2v_5b"))]
    assert names == ["real_size", "real_size", "real_size_wan2.2_ti2v_5b"]
    doc = tmp_path / "benchmarks.md"
    doc.write_text(section_block("real_size", "1.3B table") + section_block("real_size_notes", "what we wrote"))
    write_section(doc, names[2], "5B table")
    write_section(doc, names[0], "1.3B table, again")
    assert sections(doc.read_text()) == {"real_size": "1.3B table, again\n", "real_size_notes": "what we wrote\n",
                                         "real_size_wan2.2_ti2v_5b": "5B table\n"}


@pytest.mark.parametrize("text", ["<!-- section: a -->\nbody\n<!-- /section: b -->\n", "no sections at all\n"])
def test_a_document_without_closed_sections_has_none(text):
    assert sections(text) == {} and outside_sections(text) == (text, "")
