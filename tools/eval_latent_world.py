"""What the latent world's parts can do, measured on held-out prompts.

    .venv/bin/python tools/eval_latent_world.py vae runs/latent_vae            # reconstructions
    .venv/bin/python tools/eval_latent_world.py model flowdppo_video/world/weights/latent-world

``vae DIR``: renders held-out videos, encodes and decodes them with the VAE in ``DIR/vae`` and
reports how often the checkers (:mod:`rewards.latent_checks`) give the same verdict on the
reconstruction as on the original (each asked object's presence, shape, direction and speed), the
PSNR and the background error and grid energy of the reconstructions. The issue's bar: >= 98%.

``model DIR``: samples the held-out prompts with the ODE sampler (fixed seeds) and reports the
checkers' accuracies and artifact levels, beside those of the rendered ground truth decoded by the
same VAE. ``--json`` writes the numbers to a file; ``--record`` keeps them in the folder's
``pretrain.json``. ``model DIR --word-loss``: does the model read its direction words (the flow loss
with the right, the opposite and an other-axis word, and none; docs/latent_world.md)?
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from typing import Any
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from flowdppo_video.runs.resources import resolve
from flowdppo_video.world.latent import render_batch, video_to_pixels
from rewards.latent_checks import adherence_table, artifact_measurements, classify
from rewards.latent_world import draw_scene

FIELDS = ("present", "shape", "direction", "speed")


def agreement(a: list[list[dict]], b: list[list[dict]]) -> dict[str, float]:
    """Share of (video, object) verdicts that agree, per field and over all fields."""
    same = {f: [x[f] == y[f] for ra, rb in zip(a, b) for x, y in zip(ra, rb)] for f in FIELDS}
    out = {f: float(np.mean(v)) for f, v in same.items()}
    out["all_fields"] = float(np.mean([v for f in FIELDS for v in same[f]]))
    return out


def held_out(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = random.Random(seed)
    scenes = [draw_scene(rng, held_out=True) for _ in range(n)]
    return [s.prompt for s in scenes], render_batch(scenes, seed=seed)


@torch.no_grad()
def reconstruct(vae: AutoencoderKLWan, videos: np.ndarray, chunk: int = 8) -> np.ndarray:
    outs = []
    for i in range(0, len(videos), chunk):
        x = video_to_pixels(videos[i:i + chunk])
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        outs.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy())
    return np.concatenate(outs)


def eval_vae(folder: str, n: int, seed: int) -> dict:
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae").eval()
    prompts, videos = held_out(n, seed)
    rec = reconstruct(vae, videos)
    psnr = 10 * np.log10(255.0 ** 2 / ((rec.astype(np.float64) - videos) ** 2).mean())
    art_o, art_r = artifact_measurements(videos, prompts), artifact_measurements(rec, prompts)
    return {"n": n, "seed": seed, "agreement": agreement(classify(videos, prompts), classify(rec, prompts)),
            "psnr": float(psnr), "adherence_original": adherence_table(videos, prompts),
            "adherence_reconstructed": adherence_table(rec, prompts),
            **{f"{k}_original": float(np.mean(v)) for k, v in art_o.items()},
            **{f"{k}_reconstructed": float(np.mean(v)) for k, v in art_r.items()}}


def strip(videos: np.ndarray, prompts: list[str], path: Path, rows: int = 8, every: int = 4, scale: int = 2) -> None:
    """A PNG of ``rows`` videos (every ``every``-th frame across) with their prompts on the left."""
    from PIL import Image, ImageDraw

    n = min(rows, len(videos))
    frames = videos[:n, ::every]                                   # (n, F', H, W, 3)
    h, w = frames.shape[2] * scale, frames.shape[3] * scale
    label = 270
    img = Image.new("RGB", (label + frames.shape[1] * (w + 2), n * (h + 2)), "white")
    draw = ImageDraw.Draw(img)
    for i in range(n):
        words, line, y = prompts[i].split(), "", i * (h + 2) + 2
        for word in words:                                         # wrap the prompt into the label column
            if len(line) + len(word) > 44:
                draw.text((4, y), line, fill="black")
                line, y = "", y + 11
            line += word + " "
        draw.text((4, y), line, fill="black")
        for j, f in enumerate(frames[i]):
            img.paste(Image.fromarray(f).resize((w, h), Image.NEAREST), (label + j * (w + 2), i * (h + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def load_model(folder: str, state: str | None = None) -> Any:
    """The latent-world model in ``folder``, with a pretraining ``state.pt``'s EMA weights over its own."""
    from flowdppo_video.world.latent import load_latent_adapter
    from flowdppo_video.world.model import world_modules

    adapter = load_latent_adapter(folder)
    if state:
        world_modules(adapter).load_state_dict(torch.load(state, weights_only=False)["ema"])
    return adapter


def eval_model(folder: str, samples: int, seeds: list[int], steps: int, state: str | None = None,
               strip_path: Path | None = None) -> dict:
    """Held-out adherence and artifacts of the model's ODE samples (the eval prompts, fixed seeds),
    and of the rendered ground truth through the same VAE."""
    from flowdppo_video.runs.config import SamplerConfig
    from flowdppo_video.runs.data import load_prompts
    from flowdppo_video.training.rollout import rollout
    from flowdppo_video.world.latent import FRAMES, SIZE

    adapter = load_model(folder, state)
    prompts = load_prompts(resolve("builtin:latent-prompts/heldout.txt"))
    sampler = dataclasses.replace(SamplerConfig(), num_steps=steps, shift=1.0, eta=0.0, sde_steps=0, window=[0.0, 0.3])
    shape = adapter.latent_shape(FRAMES, SIZE, SIZE)
    by_seed = {}
    for seed in seeds:
        traj = rollout(adapter, prompts, samples, shape, sampler, torch.Generator().manual_seed(seed), progress=False)
        if strip_path is not None and seed == seeds[0]:             # one video of each of 4 one- and 4 two-object prompts
            pick = [i * samples for i in (0, 6, 12, 18, 24, 30, 36, 42)]
            strip(traj.videos.numpy()[pick], [traj.prompts[i] for i in pick], strip_path)
        art = artifact_measurements(traj.videos, traj.prompts)
        by_seed[seed] = {**adherence_table(traj.videos, traj.prompts), **{k: float(np.mean(v)) for k, v in art.items()},
                         "one_object": adherence_table(*_subset(traj.videos, traj.prompts, 1)),
                         "two_objects": adherence_table(*_subset(traj.videos, traj.prompts, 2))}
    truth_prompts = [p for p in prompts for _ in range(samples)]
    from rewards.latent_world import parse_prompt
    truth = reconstruct(adapter.vae, render_batch([parse_prompt(p) for p in truth_prompts], seed=0))
    art = artifact_measurements(truth, truth_prompts)
    return {"folder": folder, "state": state, "samples_per_prompt": samples, "prompts": len(prompts), "steps": steps,
            "by_seed": by_seed, "ground_truth_through_vae": {**adherence_table(truth, truth_prompts),
                                                             **{k: float(np.mean(v)) for k, v in art.items()}}}


def word_loss(folder: str, state: str | None, seed: int, sigmas: tuple[float, ...] = (0.95, 0.8, 0.6, 0.4)) -> dict:
    """The direction-word probe (:func:`flowdppo_video.world.latent_diagnostics.direction_word_losses`),
    with the relative gap of the opposite word over the right one per noise level."""
    from flowdppo_video.world.latent_diagnostics import direction_word_losses_by_region

    model = load_model(folder, state)
    out: dict = {"folder": folder, "state": state, "seed": seed}
    # The whole video, and the cells the objects cover (one set of forward passes for both): the
    # background dilutes a word about the objects in the first by about the share of the frame they
    # leave free.
    by_region = direction_word_losses_by_region(model, list(sigmas), seed=seed)
    for suffix, region in (("", "video"), ("_objects", "objects")):
        losses = by_region[region]
        out["word_loss" + suffix] = {str(s): v for s, v in losses.items()}
        out["opposite_over_right" + suffix] = {str(s): v["opposite"] / v["right word"] - 1 for s, v in losses.items()}
    return out


def record(folder: Path, res: dict) -> None:
    """Write ``res``'s held-out numbers into ``folder/pretrain.json`` under ``heldout``: what the
    shipped weights can do, kept with the commands that made them."""
    path = folder / "pretrain.json"
    if not path.is_file():
        raise SystemExit(f"eval_latent_world.py: --record: {path} not found (a folder tools/pretrain_latent_world.py "
                         "--out wrote)")
    rec = json.loads(path.read_text())
    rec["heldout"] = {k: res[k] for k in ("samples_per_prompt", "prompts", "steps", "by_seed", "ground_truth_through_vae")}
    path.write_text(json.dumps(rec, indent=1))


def _subset(videos, prompts: list[str], n_objects: int):
    keep = [i for i, p in enumerate(prompts) if (" and " in p) == (n_objects == 2)]
    return videos[keep], [prompts[i] for i in keep]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["vae", "model"])
    ap.add_argument("folder")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=4, help="model: samples per held-out prompt")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="model: sampling seeds")
    ap.add_argument("--steps", type=int, default=10, help="model: ODE steps")
    ap.add_argument("--state", help="model: a tools/pretrain_latent_world.py state.pt (its EMA weights) "
                    "loaded over the folder's")
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--strip", help="model: a PNG of eight held-out samples (seed 0), frames across")
    ap.add_argument("--word-loss", action="store_true",
                    help="model: only the direction-word probe (the flow loss with the right, opposite and "
                         "other-axis direction word and none, 128 held-out one-object videos)")
    ap.add_argument("--record", action="store_true",
                    help="model: also write the held-out numbers into FOLDER/pretrain.json (key 'heldout'), "
                         "beside the stages' commands and times")
    args = ap.parse_args()
    if args.word_loss and (args.what != "model" or args.record):
        ap.error("--word-loss: only for 'model FOLDER', without --record")
    if args.record and (args.what != "model" or args.state):
        ap.error("--record: only for 'model FOLDER' without --state (it describes the folder's own weights)")
    torch.set_num_threads(args.threads)
    if args.word_loss:
        res = word_loss(resolve(args.folder), args.state, args.seed)
    elif args.what == "vae":
        res = eval_vae(resolve(args.folder), args.n, args.seed)
    else:
        res = eval_model(resolve(args.folder), args.samples, args.seeds, args.steps, args.state,
                         Path(args.strip) if args.strip else None)
    print(json.dumps(res, indent=1))
    if args.record:
        record(Path(resolve(args.folder)), res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
