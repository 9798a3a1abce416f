"""``flowdppo-video sample``: videos from a run's checkpoint (or its base model).

    flowdppo-video sample --run RUN --out DIR [--num N] [--prompts SPEC] [--checkpoint CKPT|base] [key=value ...]

``--num`` is videos **per prompt**. ``--prompts`` picks the prompts (:func:`select_prompts`); by
default every training prompt of the run. Before sampling the command prints how many videos it
will write and from which checkpoint; ``DIR/index.json`` records both, and each video's prompt:
``{"run", "checkpoint", "iterations", "sampler", "seed", "videos_per_prompt",
"videos": [{"file", "prompt", "prompt_index", "sample"}]}`` (``flowdppo-video score DIR`` reads
the prompts from it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from flowdppo_video.runs.config import ConfigError
from flowdppo_video.runs.data import load_prompts
from flowdppo_video.runs.fsio import check_new_output
from flowdppo_video.runs.resources import resolve
from flowdppo_video.runs.video import write_video
from flowdppo_video.training.checkpoint import latest_checkpoint, load_checkpoint
from flowdppo_video.training.rollout import plain_sampler, rollout, sound
from flowdppo_video.training.run_builder import build_model, open_run

_INDICES = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
SETS = ("train", "heldout")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def parse_indices(spec: str, count: int, what: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]`` (0-based, ranges inclusive, order kept, repeats dropped)."""
    if not _INDICES.match(spec):
        raise ConfigError(f"--prompts {spec!r}: indices look like 0-3,7")
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        a, b = int(lo), int(hi or lo)
        if a > b:
            raise ConfigError(f"--prompts {spec!r}: the range {part} runs backwards")
        if b >= count:
            raise ConfigError(f"--prompts {spec!r}: index {b} is past the {count} {what} (0 to {count - 1})")
        out += [i for i in range(a, b + 1) if i not in out]
    return out


def select_prompts(spec: str | None, cfg: Any) -> tuple[list[tuple[int, str]], str]:
    """``[(index, prompt)]`` and a few words saying where they came from.

    ``spec``: ``None`` or ``train`` (the run's training prompts), ``heldout`` (its ``eval.prompts``),
    either followed by ``:INDICES`` to take a subset (``heldout:0-3,7``), bare ``INDICES`` (training
    prompts), or a prompt file (one prompt a line); an existing file wins over the other readings.
    Indices are 0-based positions in the set.
    """
    if spec is not None and (spec.startswith("builtin:") or Path(resolve(spec)).is_file()):
        prompts = load_prompts(spec)
        return list(enumerate(prompts)), f"prompt file {spec}"
    name, _, idx = (spec or "train").partition(":")
    if name not in SETS:
        if _INDICES.match(name) and not idx:
            name, idx = "train", name
        else:
            raise ConfigError(f"--prompts {spec!r}: not a prompt file, nor train or heldout (optionally with "
                              ":INDICES such as heldout:0-3,7), nor indices of the training prompts")
    source = cfg.data.prompts if name == "train" else cfg.eval.prompts
    if source is None:
        raise ConfigError(f"--prompts {spec}: the run has no held-out prompts (eval.prompts)")
    prompts = load_prompts(source)
    label = "training" if name == "train" else "held-out"
    if not idx:
        return list(enumerate(prompts)), f"the run's {label} prompts"
    return [(i, prompts[i]) for i in parse_indices(idx, len(prompts), f"{label} prompts")], \
        f"the run's {label} prompts {idx}"


def run_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Sample, write ``out/NNN.mp4`` (prompt-major: a prompt's videos are consecutive) and
    ``out/index.json``; returns the index."""
    run_dir = Path(args.run)
    cfg = open_run(run_dir, args.overrides)
    out = Path(args.out)
    check_new_output(out, "--out")      # before any weights load: samples never replace files (export alike)
    chosen, source = select_prompts(args.prompts, cfg)      # a bad selection fails before any weights load
    base = args.checkpoint == "base"
    ckpt = None if base else Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run_dir)
    if not base and (ckpt is None or not (ckpt / "meta.json").is_file()):
        raise ConfigError(f"--checkpoint: no checkpoint at {ckpt or run_dir / 'checkpoints'}")
    iterations = 0 if ckpt is None else int(json.loads((ckpt / "meta.json").read_text())["next_iteration"])
    what = ("the base model (no checkpoint)" if ckpt is None
            else f"checkpoint {ckpt} (after {_count(iterations, 'iteration')})")
    n = len(chosen) * args.num
    kind = "sde" if args.sde else "ode"
    print(f"sampling {_count(n, 'video')}: {args.num} per prompt x {_count(len(chosen), 'prompt')} ({source}), "
          f"from {what}, {kind.upper()} sampling, seed {args.seed}, into {out}", flush=True)

    # Image-to-video: with the images of the run's prompts. The run's text cache serves the chosen
    # prompts; only rows it lacks build the text encoder, released before the transformer is built.
    built = build_model(cfg, prompts=[p for _, p in chosen], run_dir=run_dir)
    adapter, latent_shape = built.adapter, built.latent_shape
    if ckpt is not None:
        load_checkpoint(ckpt, adapter, None)
    # Independent noise and the full schedule: the training rollout's economies are not the model's.
    sampler = dataclasses.replace(plain_sampler(cfg.sampler), sde_steps=cfg.sampler.sde_steps if args.sde else 0)
    with torch.no_grad():
        traj = rollout(adapter, [p for _, p in chosen], args.num, latent_shape, sampler,
                       torch.Generator().manual_seed(args.seed), negative_prompt=cfg.data.negative_prompt)
    videos = []
    for k, v in enumerate(traj.videos):
        i, p = chosen[k // args.num]
        write_video(out / f"{k:03d}.mp4", v, fps=cfg.video.fps, **sound(traj, k))
        videos.append({"file": f"{k:03d}.mp4", "prompt": p, "prompt_index": i, "sample": k % args.num})
    index = {"run": str(run_dir), "checkpoint": str(ckpt) if ckpt is not None else "base",
             "iterations": iterations, "prompts": source, "sampler": kind, "seed": args.seed,
             "videos_per_prompt": args.num, "videos": videos}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    print(f"wrote {_count(len(videos), 'video')} and index.json to {out}")
    return index
