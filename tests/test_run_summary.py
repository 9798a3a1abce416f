"""The end of ``flowdppo-video train``: each held-out number once, aligned, and the files to open."""

from __future__ import annotations

import json
from pathlib import Path

from flowdppo_video.reporting.run_summary import duplicate_parts, held_out_metrics, summary_lines


def _eval_row(after: int, direction: float, colour: float, shape: float, smooth: float, kl: float) -> dict:
    """A row as the demo's eval.jsonl holds it: world_adherence logs its parts again."""
    return {"after_iterations": after, "eval/world_direction/mean": direction, "eval/world_colour/mean": colour,
            "eval/world_shape/mean": shape, "eval/world_adherence/mean": (direction + colour + shape) / 3,
            "eval/world_adherence/colour/mean": colour, "eval/world_adherence/shape/mean": shape,
            "eval/world_adherence/direction/mean": direction, "eval/world_adherence/smoothness/mean": smooth,
            "eval/kl_base/mean": kl}


EVALS = [_eval_row(0, 0.618, 0.945, 0.842, 0.35, 0.0), _eval_row(20, 0.75, 0.96, 0.85, 0.36, 0.008),
         _eval_row(40, 0.863, 0.975, 0.847, 0.37, 0.014)]
ROWS = [{"iteration": i, "reward/mean": 0.5 + 0.01 * i} for i in range(40)]


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "index.html").write_text("<html></html>")
    (run / "before_after").mkdir()
    for k in range(3):
        (run / "before_after" / f"{k:02d}.mp4").write_bytes(b"")
    (run / "curves.png").write_bytes(b"")
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVALS))
    return run


def test_each_held_out_number_once():
    keys = held_out_metrics(EVALS)
    # The parts world_adherence/{colour,shape,direction} repeat world_colour & co and are dropped;
    # smoothness is logged nowhere else and stays; the KL has a line of its own.
    assert keys == ["eval/world_direction/mean", "eval/world_colour/mean", "eval/world_shape/mean",
                    "eval/world_adherence/mean", "eval/world_adherence/smoothness/mean"]


def test_a_part_is_merged_only_when_name_and_every_value_agree():
    names = ["world_colour", "world_adherence", "world_adherence/colour", "other/colour"]
    values = {"world_colour": [0.9, 0.8], "world_adherence": [0.7, 0.6],
              "world_adherence/colour": [0.9, 0.8], "other/colour": [0.9, 0.5]}
    assert duplicate_parts(names, values) == {"world_adherence/colour": "world_colour"}
    # Same values under a name that is no reward's: kept.
    assert duplicate_parts(["world_colour", "x/hue"], {"world_colour": [0.9], "x/hue": [0.9]}) == {}


def test_summary_table_is_aligned_and_names_the_files(tmp_path):
    run = _run_dir(tmp_path)
    lines = summary_lines(run, ROWS, EVALS)
    text = "\n".join(lines)
    assert lines[0] == "done: 40 iterations; training reward/mean 0.5000 -> 0.8900"
    table = [ln for ln in lines if ln.startswith("  ") and "/mean" not in ln][:7]
    assert table[0].split() == ["held-out", "base", "after", "40", "change"]
    body = {ln.split()[0]: ln for ln in table[1:]}
    assert list(body) == ["world_direction", "world_colour", "world_shape", "world_adherence",
                          "world_adherence/smoothness", "KL"]
    assert body["world_direction"].split()[1:] == ["0.6180", "0.8630", "+0.2450"]
    assert body["KL"].split()[-2:] == ["0.0000", "0.0140"]
    # Every number column ends at the same character: one table, not ragged lines.
    ends = {ln.index("0.6180") + 6 for ln in table if "0.6180" in ln}
    assert ends == {table[0].index("base") + 4}
    assert len({ln.rindex(".") for ln in table[1:-1]}) == 1   # the change column lines up too
    # Each metric once: colour appears in one row only.
    assert sum("colour" in ln for ln in table) == 1
    # The files to open, as paths that exist.
    assert f"report        {run / 'report' / 'index.html'}" in text
    assert f"before/after  {run / 'before_after'}/  (3 videos, base model left, final model right)" in text
    assert f"curves        {run / 'curves.png'}" in text
    assert "checkpoints" not in text                  # not written in this run: not offered
    # With its labelled page, before/after points at the page.
    (run / "before_after" / "index.html").write_text("<html></html>")
    text = "\n".join(summary_lines(run, ROWS, EVALS))
    assert f"before/after  {run / 'before_after' / 'index.html'}  (3 videos," in text


def test_summary_without_evaluation(tmp_path):
    lines = summary_lines(tmp_path, ROWS[:2], [])
    assert lines[0].startswith("done: 2 iterations")
    assert not any("held-out" in ln for ln in lines)
    assert lines[-1] == f"run directory {tmp_path}"


def test_report_groups_held_out_metrics():
    from flowdppo_video.reporting.report import evaluation_table, held_out_groups

    rewards, parts, composites = held_out_groups(EVALS)
    assert rewards == ["world_direction", "world_colour", "world_shape", "world_adherence"]
    assert parts == ["world_adherence/smoothness"]
    # world_adherence is the mean of three of its logged parts, found from the numbers.
    assert composites == {"world_adherence": ("colour", "shape", "direction")}
    html = evaluation_table(EVALS)
    assert html.count("<tr>") == 1 + 6               # header, 5 metrics, the KL
    assert "world_adherence (mean of colour, shape, direction)" in html
    assert "<th>base</th><th>after 20</th><th>after 40</th>" in html
    assert html.startswith('<div class="scroll">')   # a wide table scrolls in its box, not the page
