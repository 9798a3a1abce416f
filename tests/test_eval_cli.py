"""``flowdppo-video eval``: overrides as train and sample take them, and a total that never counts
a composite reward together with its parts (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from flowdppo_video.commands.cli import build_parser
from flowdppo_video.reporting.eval_checkpoints import composite_parts, split_overrides, total_terms


def test_overrides_are_positional_like_train_and_sample(tmp_path):
    p = build_parser()
    before = p.parse_args(["eval", "run.device=cpu", "--checkpoints", "r/checkpoints/iter_000002", "--prompts", "f"])
    assert before.overrides == ["run.device=cpu"] and before.checkpoints == ["r/checkpoints/iter_000002"]
    # After --checkpoints (which takes several values) argparse hands the overrides to it: taken back.
    after = p.parse_args(["eval", "--checkpoints", "base", "r/ckpt", "run.device=cpu",
                          "sampler.window=[0,0.6]", "--prompts", "f"])
    assert split_overrides(after.checkpoints, after.overrides) == (
        ["base", "r/ckpt"], ["run.device=cpu", "sampler.window=[0,0.6]"])
    # A checkpoint folder whose name looks like an override stays a checkpoint.
    odd = tmp_path / "a.b=c"
    odd.mkdir()
    assert split_overrides([str(odd)], []) == ([str(odd)], [])
    # The old spelling still parses (deprecated, with a note).
    old = p.parse_args(["eval", "--checkpoints", "c", "--prompts", "f", "--override", "run.device=cpu"])
    assert old.override == ["run.device=cpu"]


def _rows(n: int = 6, seed: int = 0) -> list[dict]:
    """Rows as eval's scores.jsonl holds them for the shapes world's rewards: world_adherence's
    score is the mean of colour, shape and direction, and it logs smoothness and speed too."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        c, s, d, sm, sp = rng.uniform(size=5).tolist()
        rows.append({"world_colour": c, "world_shape": s, "world_direction": d, "world_smoothness": sm,
                     "world_adherence": (c + s + d) / 3, "world_adherence/colour": c, "world_adherence/shape": s,
                     "world_adherence/direction": d, "world_adherence/smoothness": sm,
                     "world_adherence/speed": sp})
    return rows


def test_composite_parts_are_found_from_the_numbers():
    rows = _rows()
    assert composite_parts(rows, "world_adherence") == (
        "world_adherence/colour", "world_adherence/shape", "world_adherence/direction")
    assert composite_parts(rows, "world_colour") == ()        # logs no parts


@pytest.mark.parametrize("rewards, counted, left_out", [
    # All parts present: the composite is left out, the parts keep their own weights.
    (["world_direction", "world_colour", "world_shape", "world_adherence"],
     ["world_direction", "world_colour", "world_shape"], {"world_adherence"}),
    # One part present: that part is left out (the composite already averages it).
    (["world_adherence", "world_direction"], ["world_adherence"], {"world_direction"}),
    # Smoothness is logged by world_adherence but is no part of its score: both count.
    (["world_adherence", "world_smoothness"], ["world_adherence", "world_smoothness"], set()),
    # Unrelated rewards: all count.
    (["world_colour", "world_smoothness"], ["world_colour", "world_smoothness"], set()),
])
def test_total_never_counts_a_composite_with_its_parts(rewards, counted, left_out):
    rows = [{k: v for k, v in r.items() if k.split("/")[0] in rewards} for r in _rows()]
    terms, left = total_terms(rows, rewards)
    assert terms == counted and set(left) == left_out
    if "world_adherence" in left:
        assert left["world_adherence"] == ("the mean of world_colour, world_shape, world_direction, "
                                           "which are counted")
