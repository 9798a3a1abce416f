"""Pretrain the latent world's text-to-video transformer on VAE latents of world videos.

    .venv/bin/python tools/pretrain_latent_world.py --vae runs/latent_vae --work runs/latent_world1 \\
        --cache runs/latent_cache.pt --out runs/latent_world_model

The VAE comes first (``tools/pretrain_latent_vae.py``, a diffusers folder with ``vae/``). The
script encodes ``--cache-size`` rendered train-split videos once (the posterior means, normalised
by the VAE's ``latents_mean``/``latents_std``, as the adapter's ``decode`` undoes), resumable in
chunks, then trains the ``WanTransformer3DModel`` by flow matching on them, as
``tools/pretrain_world.py`` trains the shapes world: 30% of captions carry a wrong direction word
(per object, as web captions do: the headroom RL must close), 10% are empty (classifier-free
guidance), noise levels logit-normal plus a share near 1 where a motion is decided. One call is one
stage (``--init`` from a ``state.pt`` or a folder this script wrote); resumable; the final stage
writes a diffusers folder with every part (``--out``) and ``pretrain.json`` with every stage's
command and the VAE's record.
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
from diffusers import AutoencoderKLWan
from tqdm.auto import tqdm

from flowdppo_video.world.latent import (build_latent_adapter, latent_object_cover, load_latent_adapter, render_batch,
                                         video_to_pixels)
from flowdppo_video.world.latent_diagnostics import normalised_latents, object_cells
from flowdppo_video.world.model import draw_sigmas, ema_update, flow_matching_loss, world_modules
from rewards.latent_world import DIRECTIONS, LatentScene, draw_scene, parse_prompt


def caption(scene: LatentScene, rng: random.Random, wrong_motion: float, drop: float) -> str:
    """The scene's prompt, each object's direction word replaced by another with prob ``wrong_motion``,
    or empty with prob ``drop``."""
    if rng.random() < drop:
        return ""
    things = tuple(dataclasses.replace(t, direction=rng.choice([d for d in DIRECTIONS if d != t.direction]))
                   if rng.random() < wrong_motion else t for t in scene.things)
    return LatentScene(things, scene.background).prompt


def cache_chunk(seed: int, start: int, n: int) -> tuple[list[LatentScene], np.ndarray, np.ndarray]:
    """The cache's videos ``start .. start + n``: scenes, videos and the objects' coverage (per chunk,
    deterministic: a chunk is drawn and rendered again the same)."""
    rng = random.Random(seed * 1_000_003 + start)
    scenes = [draw_scene(rng) for _ in range(n)]
    return (scenes, *render_batch(scenes, seed=seed * 1_000_003 + start, with_mask=True))


@torch.no_grad()
def build_cache(vae: AutoencoderKLWan, path: Path, size: int, seed: int, chunk: int = 8) -> dict:
    """Encode ``size`` train-split videos into ``path`` (resumable: saved every 256 videos), with the
    objects' coverage on the latent grid (``covers``; a cache from before it has them filled in by
    rendering its chunks again)."""
    cache = torch.load(path, weights_only=False) if path.is_file() else {"latents": [], "prompts": [], "seed": seed}
    done = sum(len(x) for x in cache["latents"])
    if "covers" not in cache:
        cache["covers"] = [latent_object_cover(cache_chunk(seed, i, len(z))[2]).half()
                           for i, z in zip(range(0, done, chunk), cache["latents"])]
    bar = tqdm(total=size, initial=done, desc="encode")
    while done < size:
        n = min(chunk, size - done)
        scenes, videos, cover = cache_chunk(seed, done, n)
        cache["latents"].append(normalised_latents(vae, vae.encode(video_to_pixels(videos)).latent_dist.mode()).half())
        cache["covers"].append(latent_object_cover(cover).half())
        cache["prompts"] += [s.prompt for s in scenes]
        done += n
        bar.update(n)
        if done % 256 == 0 or done == size:
            torch.save(cache, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
    bar.close()
    return {"latents": torch.cat(cache["latents"]), "covers": torch.cat(cache["covers"]), "prompts": cache["prompts"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="a folder with vae/ (tools/pretrain_latent_vae.py --out)")
    ap.add_argument("--cache", required=True, help="latent cache file (built once, shared by stages)")
    ap.add_argument("--cache-size", type=int, default=8192)
    ap.add_argument("--cache-seed", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--wrong-motion", type=float, default=0.3)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--logit-mean", type=float, default=0.3)
    ap.add_argument("--high-noise-frac", type=float, default=0.2)
    ap.add_argument("--objects", type=int, choices=[1, 2],
                    help="train only on the cached videos with this many objects (default: all)")
    ap.add_argument("--train-text-encoder", action="store_true")
    ap.add_argument("--object-weight", type=float, default=0.0,
                    help="weight the flow loss by 1 + W on the latent cells the objects cover "
                         "(default 0: the plain loss of stages 1-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", required=True)
    ap.add_argument("--init", help="an earlier stage's state.pt, or a folder this script wrote")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--out", help="write the final model here as a diffusers folder")
    ap.add_argument("--export", action="store_true",
                    help="write --init's weights (a state.pt's EMA) to --out as a diffusers folder, without "
                         "building the cache or training")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: must be at least 1 (--export writes a state without training)")
    if args.export and not (args.init and args.out):
        ap.error("--export needs --init (the state to write) and --out (the folder)")
    if args.init and not Path(args.init).exists():
        ap.error(f"--init {args.init}: no such state.pt or folder")

    torch.set_num_threads(args.threads)
    vae = AutoencoderKLWan.from_pretrained(args.vae, subfolder="vae").eval().requires_grad_(False)
    if args.export:
        export(args, vae)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = build_cache(vae, Path(args.cache), args.cache_size, args.cache_seed)
    scenes = [parse_prompt(p) for p in data["prompts"]]
    latents, covers = data["latents"], data["covers"]
    if args.objects:
        keep = [i for i, sc in enumerate(scenes) if len(sc.things) == args.objects]
        scenes, latents, covers = [scenes[i] for i in keep], latents[keep], covers[keep]
        print(f"--objects {args.objects}: {len(keep)} of {len(data['prompts'])} cached videos")

    adapter = build_latent_adapter(torch.device("cpu"), seed=args.seed)
    adapter.vae = vae
    modules = world_modules(adapter)
    adapter.text_encoder.requires_grad_(args.train_text_encoder)
    modules.train()
    ckpt, start, log, init_meta = work / "state.pt", 0, [], None
    if args.init and not ckpt.is_file():
        init = Path(args.init)
        if init.is_file():
            st = torch.load(init, weights_only=False)
            state, init_meta = st["model"], {"state": str(init), "step": st["step"], "command": st["command"],
                                             "init": st["init"], "log_tail": st["log"][-1] if st["log"] else None}
        else:
            state = world_modules(load_latent_adapter(init)).state_dict()
            rec = json.loads((init / "pretrain.json").read_text())
            init_meta = {"state": str(init), "step": rec.get("steps"), "command": rec.get("command"),
                         "init": rec.get("init"), "weights": "ema"}
        modules.load_state_dict(state)
        print(f"initialised from {init}")
    ema = {k: v.detach().clone() for k, v in modules.state_dict().items()}
    trainable = {n for n, p in modules.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in modules.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        modules.load_state_dict(st["model"])
        ema, start, log, init_meta = st["ema"], st["step"], st["log"], st["init"]
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        print(f"resumed at step {start}")
    command = "tools/pretrain_latent_world.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if k not in ("work", "out", "cache") and v is not None and v is not False)
    elapsed0 = log[-1]["elapsed_s"] if log else 0.0
    t0 = time.time()
    running = None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="pretrain")
    for step in bar:
        rng = random.Random(args.seed * 1_000_003 + step)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        x0 = latents[idx].float()
        text = adapter.embed_text([caption(scenes[i], rng, args.wrong_motion, args.caption_dropout) for i in idx.tolist()])
        sigma = draw_sigmas(args.batch, gen, args.logit_mean, args.high_noise_frac)
        eps = torch.randn(x0.shape, generator=gen)
        weight = 1.0 + args.object_weight * object_cells(covers[idx]) if args.object_weight else None
        loss = flow_matching_loss(adapter, x0, eps, sigma, text, weight)
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
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            tmp = work / "state.pt.tmp"
            torch.save({"model": modules.state_dict(), "ema": ema, "step": step + 1, "log": log, "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "init": init_meta, "command": command}, tmp)
            tmp.replace(ckpt)
            (work / "log.json").write_text(json.dumps(log, indent=0))
    bar.close()
    if args.out:
        modules.load_state_dict(ema)
        save_folder(adapter, Path(args.out), args, {
            "command": command, "steps": args.steps, "final_loss": log[-1]["loss"] if log else None,
            "train_seconds": round(log[-1]["elapsed_s"]) if log else None, "init": init_meta,
            "cache": {"size": args.cache_size, "seed": args.cache_seed}})


def vae_record(vae_dir: Path) -> dict | None:
    """How the VAE was trained: its own ``vae_pretrain.json``, else the ``vae`` entry of the folder's
    ``pretrain.json`` (a folder this script wrote)."""
    for name, key in (("vae_pretrain.json", None), ("pretrain.json", "vae")):
        path = vae_dir / name
        if path.is_file():
            rec = json.loads(path.read_text())
            return rec if key is None else rec.get(key)
    return None


def save_folder(adapter, out: Path, args: argparse.Namespace, record: dict) -> None:
    """The adapter (its weights already the ones to ship) as a diffusers folder with ``pretrain.json``."""
    world_modules(adapter).eval()
    if out.exists():
        shutil.rmtree(out)
    adapter.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({
        **record, "vae": vae_record(Path(args.vae)), "torch": torch.__version__, "threads": args.threads,
        "shipped": "ema"}, indent=1))
    print(f"saved {out}")


def export(args: argparse.Namespace, vae: AutoencoderKLWan) -> None:
    """``--export``: ``--init``'s weights (a state.pt's EMA, or a folder's) to ``--out``, with its record."""
    init = Path(args.init)
    adapter = build_latent_adapter(torch.device("cpu"), seed=args.seed)
    adapter.vae = vae
    if init.is_file():
        st = torch.load(init, weights_only=False)
        world_modules(adapter).load_state_dict(st.get("ema", st["model"]))
        record = {"command": st["command"], "steps": st["step"],
                  "final_loss": st["log"][-1]["loss"] if st.get("log") else None,
                  "train_seconds": round(st["log"][-1]["elapsed_s"]) if st.get("log") else None,
                  "init": st["init"]}
    else:
        world_modules(adapter).load_state_dict(world_modules(load_latent_adapter(init)).state_dict())
        record = json.loads((init / "pretrain.json").read_text())
    save_folder(adapter, Path(args.out), args, {**record, "exported_from": str(init)})


if __name__ == "__main__":
    main()
