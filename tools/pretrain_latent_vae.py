"""Pretrain the latent world's video VAE (diffusers' AutoencoderKLWan) on latent-world videos.

    .venv/bin/python tools/pretrain_latent_vae.py --work runs/latent_vae1 --frames 9 --crop 32 --steps 1500
    .venv/bin/python tools/pretrain_latent_vae.py --work runs/latent_vae2 --init runs/latent_vae1/state.pt \\
        --frames 17 --crop 64 --batch 4 --steps 300 --lr 3e-4 --out runs/latent_vae

One call is one stage, from scratch or ``--init`` from an earlier stage's ``state.pt``. Clips are
random windows of ``--frames`` frames and ``--crop`` pixels of rendered train-split videos (a crop
holds an object most of the time): the causal VAE is convolutional, so short small clips teach it
cheaply and a last stage at full size fits the whole frame. Clips of all 17 frames matter: a VAE taught on 9-frame clips (three latent frames) lost its colours from the
fourth latent frame on. The loss is an L1 and a squared error
that weigh object pixels ``1 + --object-weight`` (objects are 4% of a frame and carry every
verdict), plus a small KL to keep the latent scale bounded. Resumable: rerun the same command.
With ``--out`` the final stage writes the VAE as a diffusers folder, ``latents_mean`` and
``latents_std`` measured on 256 full videos, and ``vae_pretrain.json`` with every stage's command.
"""

from __future__ import annotations

import argparse
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

from flowdppo_video.world.latent import FRAMES, SIZE, VAE, render_batch, video_to_pixels
from rewards.latent_world import draw_scene


def batch(step_seed: int, n: int, frames: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random clips ``(n, 3, frames, crop, crop)`` in [-1, 1] and their object coverage
    ``(n, 1, frames, crop, crop)``, all drawn from ``step_seed``."""
    rng = random.Random(step_seed)
    scenes = [draw_scene(rng) for _ in range(n)]
    videos, masks = render_batch(scenes, seed=step_seed, with_mask=True)
    xs, ms = [], []
    for v, m in zip(videos, masks):
        f0 = rng.randrange(0, FRAMES - frames + 1)
        v, m = v[f0:f0 + frames], m[f0:f0 + frames]
        if crop < SIZE:
            ys, xs_ = np.nonzero(m[len(m) // 2] > 0.5)
            if len(ys) and rng.random() < 0.8:       # centred near an object, jittered
                i = rng.randrange(len(ys))
                cy, cx = ys[i] + rng.randint(-crop // 4, crop // 4), xs_[i] + rng.randint(-crop // 4, crop // 4)
            else:
                cy, cx = rng.randrange(SIZE), rng.randrange(SIZE)
            y0 = min(max(0, cy - crop // 2), SIZE - crop)
            x0 = min(max(0, cx - crop // 2), SIZE - crop)
            v, m = v[:, y0:y0 + crop, x0:x0 + crop], m[:, y0:y0 + crop, x0:x0 + crop]
        xs.append(v)
        ms.append(m)
    return video_to_pixels(np.stack(xs)), torch.from_numpy(np.stack(ms))[:, None]


def losses(vae: AutoencoderKLWan, x: torch.Tensor, mask: torch.Tensor, object_weight: float,
           kl_weight: float, posterior: str = "mode") -> tuple[torch.Tensor, dict[str, float]]:
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mode() if posterior == "mode" else post.sample()).sample
    w = 1.0 + object_weight * mask
    l1 = ((rec - x).abs() * w).mean() / w.mean()
    l2 = ((rec - x).square() * w).mean() / w.mean()
    kl = 0.5 * (post.mean.square() + post.var - 1.0 - post.logvar).mean()     # per latent element
    loss = l1 + l2 + kl_weight * kl
    psnr = float(10 * torch.log10(4.0 / (rec.detach() - x).square().mean()))
    return loss, {"l1": float(l1.detach()), "l2": float(l2.detach()), "kl": float(kl.detach()), "psnr": psnr}


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, n: int = 256, seed: int = 99, chunk: int = 8) -> tuple[list, list]:
    """Per-channel mean and std of the posterior means of ``n`` full train-split videos."""
    zs = []
    for i in range(0, n, chunk):
        x, _ = batch(seed * 1_000_003 + i, min(chunk, n - i), FRAMES, SIZE)
        zs.append(vae.encode(x).latent_dist.mode())
    z = torch.cat(zs).transpose(0, 1).reshape(VAE["z_dim"], -1)
    return z.mean(1).tolist(), z.std(1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--frames", type=int, default=9, choices=[5, 9, 13, 17])
    ap.add_argument("--crop", type=int, default=32, choices=[16, 32, 48, 64])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--object-weight", type=float, default=4.0)
    ap.add_argument("--kl", type=float, default=1e-3, help="weight of the per-element KL to N(0, 1)")
    ap.add_argument("--posterior", choices=["mode", "sample"], default="mode",
                    help="decode the posterior mean (a deterministic autoencoder, as the adapter encodes) or a "
                    "sample (its unit initial variance drowned the mean: 18 dB after 700 steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", required=True, help="work folder (state.pt, log.json)")
    ap.add_argument("--init", help="an earlier stage's state.pt (fresh optimizer and schedule)")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--out", help="write the final VAE here as a diffusers folder (its vae/ subfolder)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKLWan(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    command = "tools/pretrain_latent_vae.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("work", "out") and v is not None)
    ckpt, start, log, init_meta = work / "state.pt", 0, [], None
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        start, log, init_meta = st["step"], st["log"], st["init"]
        print(f"resumed at step {start}")
    elif args.init:
        st = torch.load(args.init, weights_only=False)
        vae.load_state_dict(st["model"])
        init_meta = {"state": args.init, "step": st["step"], "command": st["command"], "init": st["init"],
                     "log_tail": st["log"][-1] if st["log"] else None}
        print(f"initialised from {args.init} (step {st['step']})")
    vae.train()
    elapsed0 = log[-1]["elapsed_s"] if log else 0.0
    t0 = time.time()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="vae")
    run: dict[str, float] = {}
    for step in bar:
        x, mask = batch(args.seed * 1_000_003 + step, args.batch, args.frames, args.crop)
        loss, parts = losses(vae, x, mask, args.object_weight, args.kl, args.posterior)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        run = {k: v if k not in run else 0.95 * run[k] + 0.05 * v for k, v in parts.items()}
        bar.set_postfix(psnr=f"{run['psnr']:.1f}", l1=f"{run['l1']:.4f}")
        if (step + 1) % 25 == 0:
            log.append({"step": step + 1, **run, "lr": sched.get_last_lr()[0], "elapsed_s": elapsed0 + time.time() - t0})
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            tmp = work / "state.pt.tmp"
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step + 1, "log": log, "init": init_meta, "command": command}, tmp)
            tmp.replace(ckpt)
            (work / "log.json").write_text(json.dumps(log, indent=0))
    bar.close()
    if args.out:
        vae.eval()
        mean, std = latent_statistics(vae)
        vae.register_to_config(latents_mean=mean, latents_std=std)
        out = Path(args.out) / "vae"
        if out.exists():
            shutil.rmtree(out)
        vae.save_pretrained(out)
        (Path(args.out) / "vae_pretrain.json").write_text(json.dumps({
            "command": command, "steps": args.steps, "final": log[-1] if log else None, "init": init_meta,
            "train_seconds": round(log[-1]["elapsed_s"]) if log else None, "torch": torch.__version__,
            "threads": args.threads}, indent=1))
        print(f"saved {out}")


if __name__ == "__main__":
    main()
