"""Pretrain the shapes-world model that ships with the package (flow matching on world videos).

    .venv/bin/python tools/pretrain_world.py --seed 7 --work runs/pretrain_world     # one stage
    tools/pretrain_world_stages.sh                                                   # the shipped model

One call is one stage: from scratch, or ``--init`` from an earlier stage's ``state.pt`` (its raw
weights) or a diffusers directory this script wrote (its shipped weights). The shipped model is
five stages (``tools/pretrain_world_stages.sh``); its ``pretrain.json`` records every stage's
command. The text encoder stays frozen (as the RL adapter keeps it) unless
``--train-text-encoder``. The seed fixes data, initialisation and noise; the same torch build
and thread count give the same weights. The captions' motion words are wrong for 30% of the videos, as web
captions are, so the model learns colour from its prompt but follows the direction only
partly: the headroom RL must close. ``--shape-mix`` draws some shapes more often than others.
Resumable: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from flowdppo_video.world import DIRECTIONS, SHAPES, Scene, render_batch, split_scenes
from flowdppo_video.world.model import (POSITION_CHANNELS, WEIGHTS_DIR, build_world_adapter, draw_sigmas, ema_update,
                                         flow_matching_loss, load_world_adapter, video_to_latent, world_modules)


def caption(scene: Scene, rng: random.Random, wrong_motion: float, drop: float) -> str:
    """The scene's prompt; its direction word replaced by another with prob ``wrong_motion``;
    empty with prob ``drop`` (so classifier-free guidance has an unconditional model)."""
    if rng.random() < drop:
        return ""
    if rng.random() < wrong_motion:
        other = rng.choice([d for d in DIRECTIONS if d != scene.direction])
        scene = dataclasses.replace(scene, direction=other)
    return scene.prompt


def parse_shape_mix(text: str) -> dict[str, float]:
    """``'circle=1,square=2'`` -> ``{'circle': 1.0, 'square': 2.0, 'triangle': 0.0}``."""
    mix = dict.fromkeys(SHAPES, 0.0)
    for item in text.split(","):
        name, _, weight = item.partition("=")
        if name.strip() not in mix:
            raise ValueError(f"unknown shape {name.strip()!r} (shapes: {', '.join(SHAPES)})")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"weight of {name.strip()!r} is {weight!r}, not a number") from None
    if min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"shape weights must be >= 0 and not all 0: {text!r}")
    return mix


def draw_scene(scenes: list[Scene], rng: random.Random, shape_mix: dict[str, float] | None) -> Scene:
    """A training scene: uniform over ``scenes``, or first a shape by ``shape_mix`` then a scene of it."""
    if shape_mix is None:
        return rng.choice(scenes)
    shape = rng.choices(list(shape_mix), weights=list(shape_mix.values()))[0]
    return rng.choice([s for s in scenes if s.shape == shape])


def read_init(path: Path) -> dict:
    """The weights and provenance to start from: a ``state.pt`` of this script (its raw weights)
    or a diffusers directory this script wrote (its shipped weights, and the stages recorded in
    its ``pretrain.json``)."""
    if path.is_file():
        return torch.load(path, weights_only=False)
    if not (path / "model_index.json").is_file():
        raise SystemExit(f"--init {path}: neither a state.pt nor a diffusers directory with model_index.json")
    loaded = load_world_adapter(path)
    model = world_modules(loaded).state_dict()
    meta = path / "pretrain.json"
    rec = json.loads(meta.read_text()) if meta.is_file() else {}
    return {"model": model, "step": rec.get("steps"), "log": [],
            "command": rec.get("command"), "init": rec.get("init"), "shipped": rec.get("shipped")}


def load_init(modules: torch.nn.ModuleDict, path: Path) -> dict:
    """Load the weights of ``path`` (see :func:`read_init`) into ``modules``; a weight with fewer
    input channels than its new shape (the patch embedding when position channels are added) is
    zero-padded, so the model starts out computing exactly what it did."""
    st = read_init(path)
    own = modules.state_dict()
    for k, v in st["model"].items():
        if v.shape != own[k].shape:
            if v.ndim < 2 or v.shape[0] != own[k].shape[0] or v.shape[2:] != own[k].shape[2:]:
                raise SystemExit(f"--init {path}: {k} has shape {tuple(v.shape)}, the model wants {tuple(own[k].shape)}")
            pad = torch.zeros(own[k].shape, dtype=v.dtype)
            pad[:, :v.shape[1]] = v
            v = pad
        own[k] = v
    modules.load_state_dict(own)
    print(f"initialised from {path} (step {st['step']})")
    # The init's own command and init travel along, so the final pretrain.json holds every stage.
    return {"state": str(path), "step": st["step"], "log_tail": st["log"][-1] if st["log"] else None,
            "command": st.get("command"), "init": st.get("init"), "weights": st.get("shipped", "raw")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--wrong-motion", type=float, default=0.3, help="fraction of captions with a wrong direction")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--logit-mean", type=float, default=0.8, help="logit-normal sigma sampling: mean (>0 favours noise)")
    ap.add_argument("--high-noise-frac", type=float, default=0.25,
                    help="fraction of each batch with sigma ~ U[0.85, 1): where a trajectory's direction is decided")
    ap.add_argument("--embed-lr-mult", type=float, default=1.0,
                    help="learning-rate multiplier of the patch embedding (new position channels start at 0)")
    ap.add_argument("--train-text-encoder", action="store_true",
                    help="also train the UMT5 text encoder (it is frozen, i.e. random, otherwise)")
    ap.add_argument("--text-lr-mult", type=float, default=1.0,
                    help="with --train-text-encoder: learning-rate multiplier of the text encoder")
    ap.add_argument("--shape-mix", help="how often each shape is drawn, e.g. "
                    "'circle=1,square=2,triangle=1' (default: every training scene equally often)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/pretrain_world", help="work folder (checkpoints, log)")
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="where the final diffusers directory goes")
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--stop-at", type=int, help="save the state and stop after this step (a stage of a longer "
                    "recipe); nothing is shipped")
    ap.add_argument("--init", help="start from another run's state.pt (its raw weights; input channels the "
                    "old model lacks, e.g. new position channels, start at zero); fresh optimizer and schedule")
    ap.add_argument("--position-channels", type=int, default=POSITION_CHANNELS, choices=[0, 3, 5])
    ap.add_argument("--ship", choices=["ema", "raw"], default="ema",
                    help="which weights of the final state go into --out")
    args = ap.parse_args()
    try:
        shape_mix = parse_shape_mix(args.shape_mix) if args.shape_mix else None
    except ValueError as e:
        ap.error(f"--shape-mix: {e}")

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    adapter = build_world_adapter(torch.device("cpu"), seed=args.seed, position_channels=args.position_channels)
    modules = world_modules(adapter)
    # The adapter freezes its text encoder (RL never trains it); pretraining may.
    adapter.text_encoder.requires_grad_(args.train_text_encoder)
    modules.train()
    init_from = None
    if args.init and not (work / "state.pt").is_file():
        init_from = load_init(modules, Path(args.init))
    ema = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    def group(name: str) -> str:
        return ("embed" if name.startswith("transformer.patch_embedding.") else
                "text" if name.startswith("text_encoder.") else "rest")
    params: dict[str, list[torch.nn.Parameter]] = {"rest": [], "embed": [], "text": []}
    for n, p in modules.named_parameters():
        if p.requires_grad:
            params[group(n)].append(p)
    trainable = {n for n, p in modules.named_parameters(remove_duplicate=False) if p.requires_grad}
    mult = {"rest": 1.0, "embed": args.embed_lr_mult, "text": args.text_lr_mult}
    opt = torch.optim.AdamW([{"params": ps, "lr": args.lr * mult[g]} for g, ps in params.items() if ps],
                            lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    train_scenes, _ = split_scenes()
    start, log, resumes = 0, [], []
    init_meta = init_from
    ckpt = work / "state.pt"
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        modules.load_state_dict(st["model"])
        ema, start, log = st["ema"], st["step"], st["log"]
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        init_meta = st.get("init")
        resumes = st.get("resumes", []) + [{"at_step": start, **{k: v for k, v in vars(args).items() if k not in ("out", "work")}}]
        print(f"resumed at step {start}")
    command = "tools/pretrain_world.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if k not in ("out", "work") and v is not False)
    elapsed0 = log[-1]["elapsed_s"] if log else 0.0
    t0 = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="pretrain")
    running = None
    for step in bar:
        # Everything random in a step derives from (seed, step): resuming changes nothing.
        rng = random.Random(args.seed * 1_000_003 + step)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        scenes = [draw_scene(train_scenes, rng, shape_mix) for _ in range(args.batch)]
        x0 = video_to_latent(torch.from_numpy(render_batch(scenes, seed=args.seed * 1_000_003 + step)))
        text = adapter.embed_text([caption(s, rng, args.wrong_motion, args.caption_dropout) for s in scenes])
        sigma = draw_sigmas(args.batch, gen, args.logit_mean, args.high_noise_frac)
        eps = torch.randn(x0.shape, generator=gen)
        loss = flow_matching_loss(adapter, x0, eps, sigma, text)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, modules, trainable, args.ema)
        running = float(loss.detach()) if running is None else 0.98 * running + 0.02 * float(loss.detach())
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % 50 == 0:
            log.append({"step": step + 1, "loss": running, "lr": sched.get_last_lr()[0],
                        "elapsed_s": elapsed0 + time.time() - t0})
        if (step + 1) % args.save_every == 0 or step + 1 in (args.steps, args.stop_at):
            tmp = work / "state.pt.tmp"
            torch.save({"model": modules.state_dict(), "ema": ema, "step": step + 1, "log": log,
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "resumes": resumes,
                        "init": init_meta, "command": command}, tmp)
            tmp.replace(ckpt)
            (work / "log.json").write_text(json.dumps(log, indent=0))
        if args.stop_at is not None and step + 1 >= args.stop_at:
            break
    bar.close()
    if args.stop_at is not None and args.stop_at < args.steps:
        print(f"stopped at step {args.stop_at} as asked; state in {ckpt}")
        return

    # Ship the EMA (or raw) weights as a diffusers directory.
    if args.ship == "ema":
        modules.load_state_dict(ema)
    modules.eval()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    adapter.save_pretrained(out)
    total = log[-1]["elapsed_s"] if log else time.time() - t0
    (out / "pretrain.json").write_text(json.dumps({
        "command": command,
        "steps": args.steps, "final_loss": log[-1]["loss"] if log else None, "train_seconds": round(total),
        "resumed": resumes,  # a resume with another --steps changes the LR schedule from there on
        "init": init_meta,
        "torch": torch.__version__, "threads": args.threads, "shipped": args.ship}, indent=1))
    print(f"saved {out} after {args.steps} steps, {total / 60:.1f} min")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
