"""Adherence table (colour, shape, direction) of a shapes-world model on held-out prompts.

    .venv/bin/python tools/eval_world.py                                 # the shipped model
    .venv/bin/python tools/eval_world.py --model runs/X/export           # a diffusers directory
    .venv/bin/python tools/eval_world.py --state runs/pretrain_world/state.pt   # a pretraining state (EMA)

Samples every held-out prompt ``--samples`` times with fixed seeds, with the same sampler the
default run uses (``--sde-steps 0`` for plain ODE sampling), and scores the videos with the
pixel checker in ``rewards.world``. Prints a table and, with ``--json``, writes it.

``--confusion`` also prints which direction the checker measured for each direction word, and
``--word-loss`` whether the model reads its direction words at all: the flow-matching loss on
held-out ground-truth videos at a few noise levels with the right word, the opposite word
(left <-> right), a word of the other axis, and no caption. A model that ignores the sign of its
motion words has equal losses in the first two columns. The same probe for squares and circles
(the right shape word, the other one, ``triangle``, none) shows whether it tells them apart.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from flowdppo_video.runs.config import SamplerConfig
from flowdppo_video.runs.data import load_prompts
from flowdppo_video.training.rollout import rollout
from flowdppo_video.world import DIRECTIONS, SHAPES, parse_prompt
from flowdppo_video.world.diagnostics import direction_word_losses, shape_word_losses
from flowdppo_video.world.model import WEIGHTS_DIR, build_world_adapter, load_world_adapter, world_modules
from rewards.world import adherence_table, classify


def load(model: str | None, state: str | None, raw: bool = False) -> Any:
    if state:
        st = torch.load(state, weights_only=False)
        in_ch = st["model"]["transformer.patch_embedding.weight"].shape[1]
        adapter = build_world_adapter(torch.device("cpu"), position_channels=in_ch - 3)
        world_modules(adapter).load_state_dict(st["model" if raw else "ema"])
        print(f"pretraining state at step {st['step']}")
        return adapter
    return load_world_adapter(model or WEIGHTS_DIR)


WORDS = {"direction": DIRECTIONS, "shape": SHAPES}   # what a confusion table is over


def confusion(videos: torch.Tensor, prompts: list[str], what: str = "direction") -> dict[str, collections.Counter]:
    """For each direction (or shape) word, how often the checker measured each direction (or
    shape); None: no motion (or no object)."""
    table: dict[str, collections.Counter] = {d: collections.Counter() for d in WORDS[what]}
    for p, got in zip(prompts, classify(videos)):
        table[getattr(parse_prompt(p), what)][got[what]] += 1
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers directory (default: the shipped model)")
    ap.add_argument("--state", help="a tools/pretrain_world.py state.pt (its EMA weights)")
    ap.add_argument("--raw", action="store_true", help="with --state: the raw weights, not the EMA")
    ap.add_argument("--prompts", default="builtin:prompts/heldout.txt")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--eta", type=float, default=0.7)
    ap.add_argument("--sde-steps", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--confusion", action="store_true", help="also print direction (and shape) word x measured direction (and shape)")
    ap.add_argument("--word-loss", action="store_true", help="only print the flow loss with right, opposite, "
                    "other-axis and no direction word, and with right, swapped (square <-> circle), triangle "
                    "and no shape word (does the model read its words?)")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    adapter = load(args.model, args.state, args.raw)
    sampler = dataclasses.replace(SamplerConfig(), num_steps=args.steps, shift=args.shift, eta=args.eta,
                                  sde_steps=args.sde_steps, guidance_scale=args.guidance, window=[0.0, 0.6])
    if args.word_loss:
        for title, probe in (("direction words", direction_word_losses), ("shape words (squares and circles)",
                                                                          shape_word_losses)):
            table = probe(adapter, [0.95, 0.8, 0.6, 0.4])
            cols = list(next(iter(table.values())))
            print(f"{title}\nsigma " + "  ".join(f"{c:>10}" for c in cols))
            for sigma, row in table.items():
                print(f"{sigma:<5} " + "  ".join(f"{row[c]:10.5f}" for c in cols))
        return
    prompts = load_prompts(args.prompts)
    rows, confusions = {}, {}
    shape = adapter.latent_shape(8, 16, 16)
    for seed in args.seeds:
        traj = rollout(adapter, prompts, args.samples, shape, sampler, torch.Generator().manual_seed(seed),
                       progress=False)
        rows[seed] = adherence_table(traj.videos, traj.prompts)
        if args.confusion:
            confusions[seed] = {w: confusion(traj.videos, traj.prompts, w) for w in WORDS}
    keys = list(next(iter(rows.values())))
    print("seed  " + "  ".join(f"{k:>9}" for k in keys))
    for seed, r in rows.items():
        print(f"{seed:<5} " + "  ".join(f"{r[k]:9.3f}" for k in keys))
    for seed, tables in confusions.items():
        for what, table in tables.items():
            print(f"seed {seed}: {what} word (rows) x measured {what} (columns)")
            cols = [*WORDS[what], None]
            print("         " + "".join(f"{str(c):>9}" for c in cols))
            for word, counts in table.items():
                print(f"{word:>8} " + "".join(f"{counts[c]:9d}" for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "by_seed": rows, "confusion": {
            seed: {what: {w: {str(k): v for k, v in c.items()} for w, c in t.items()} for what, t in tables.items()}
        for seed, tables in confusions.items()}},
            indent=1))


if __name__ == "__main__":
    main()
