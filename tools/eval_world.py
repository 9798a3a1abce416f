"""Adherence table (colour, shape, direction) of a shapes-world model on held-out prompts.

    .venv/bin/python tools/eval_world.py                                 # the shipped model
    .venv/bin/python tools/eval_world.py --model runs/X/export           # a diffusers directory
    .venv/bin/python tools/eval_world.py --state runs/pretrain_world/state.pt   # a pretraining state (EMA)

Samples every held-out prompt ``--samples`` times with fixed seeds, with the same sampler the
default run uses (``--sde-steps 0`` for plain ODE sampling), and scores the videos with the
pixel checker in ``rewards.world``. Prints a table and, with ``--json``, writes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from flowdppo_video.config import SamplerConfig
from flowdppo_video.data import load_prompts
from flowdppo_video.models.wan import WanAdapter
from flowdppo_video.rollout import rollout
from flowdppo_video.world.model import MAX_TEXT_TOKENS, WEIGHTS_DIR, build_world_adapter
from rewards.world import adherence_table


def load(model: str | None, state: str | None, raw: bool = False) -> WanAdapter:
    if state:
        st = torch.load(state, weights_only=False)
        in_ch = st["model"]["transformer.patch_embedding.weight"].shape[1]
        adapter = build_world_adapter(torch.device("cpu"), position_channels=in_ch - 3)
        mods = torch.nn.ModuleDict({"transformer": adapter.transformer, "text_encoder": adapter.text_encoder})
        mods.load_state_dict(st["model" if raw else "ema"])
        print(f"pretraining state at step {st['step']}")
        return adapter
    return WanAdapter.from_pretrained(model or WEIGHTS_DIR, device=torch.device("cpu"),
                                      max_sequence_length=MAX_TEXT_TOKENS)


def adherence(adapter: WanAdapter, prompts: list[str], samples: int, sampler: SamplerConfig, seed: int
              ) -> dict[str, float]:
    shape = adapter.latent_shape(8, 16, 16)
    traj = rollout(adapter, prompts, samples, shape, sampler, torch.Generator().manual_seed(seed), progress=False)
    return adherence_table(traj.videos, traj.prompts)


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
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    adapter = load(args.model, args.state, args.raw)
    sampler = dataclasses.replace(SamplerConfig(), num_steps=args.steps, shift=args.shift, eta=args.eta,
                                  sde_steps=args.sde_steps, guidance_scale=args.guidance, window=[0.0, 0.6])
    prompts = load_prompts(args.prompts)
    rows = {seed: adherence(adapter, prompts, args.samples, sampler, seed) for seed in args.seeds}
    keys = list(next(iter(rows.values())))
    print("seed  " + "  ".join(f"{k:>9}" for k in keys))
    for seed, r in rows.items():
        print(f"{seed:<5} " + "  ".join(f"{r[k]:9.3f}" for k in keys))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "by_seed": rows}, indent=1))


if __name__ == "__main__":
    main()
