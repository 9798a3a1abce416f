"""Where a run's damage is made: the final model against the base, step by step of the schedule.

    .venv/bin/python tools/step_damage.py runs/clean_rl/every_step-s0 runs/clean_rl/every_step-s1 --out docs/step_damage

For each run (its ``config.yaml`` and newest checkpoint):

1. **Velocity drift per step.** Along the base model's deterministic (ODE) trajectories of the held-out
   prompts, from the evaluation's noise, at every step: the RMS of ``v_final - v_base`` relative to the
   RMS of ``v_base``, and the share of that drift's energy in the transformer's patch-periodic pattern
   (the 2x2 grid of the shapes world's patch; near 0 for a drift without that structure).
2. **Mixed models.** The held-out evaluation (the run's sampler, SDE steps and fixed noise) with the
   final model taking only some steps and the base model the others: the first k steps, or the last k,
   scored by the run's evaluation rewards (direction, the artifacts of ``world_fidelity``, ...).

Writes ``OUT.md``, and beside it ``data/NAME.json`` and ``figures/NAME.png`` (``NAME`` is OUT's last
part; the figure: drift per step, and direction and artifacts against the steps given to the final
model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

from flowdppo_video import sde
from flowdppo_video.training.checkpoint import latest_checkpoint, load_checkpoint
from flowdppo_video.runs.data import load_prompts
from flowdppo_video.commands.benchmarking import data_file, figure_file
from flowdppo_video.training.evaluation import evaluate
from flowdppo_video.training.run_builder import build_model, open_run
from flowdppo_video.training.rollout import guided_velocity
from rewards import build_rewards

# (eval.jsonl-style key, label, decimals) of what the mixed-model table shows.
SHOWN = [("eval/world_direction/mean", "direction", 3),
         ("eval/world_fidelity/background_error/mean", "background error", 2),
         ("eval/world_fidelity/grid_energy/mean", "grid energy", 2),
         ("eval/world_colour/mean", "colour", 3), ("eval/world_shape/mean", "shape", 3)]


def periodic_share(d: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Share of the energy of ``d`` ``(B, C, F, H, W)`` in its patch-periodic spatial pattern: the mean
    over patch-aligned positions of each in-patch offset, per (video, channel, frame). ``(B,)``."""
    _, ph, pw = patch
    b, c, f, h, w = d.shape
    cells = d.reshape(b, c, f, h // ph, ph, w // pw, pw)
    pattern = cells.mean(dim=(3, 5), keepdim=True)              # (B, C, F, 1, ph, 1, pw)
    pattern = pattern - pattern.mean(dim=(4, 6), keepdim=True)  # the periodic part, zero mean per frame
    share = pattern.expand_as(cells).square().sum(dim=(1, 2, 3, 4, 5, 6))
    return share / d.square().sum(dim=(1, 2, 3, 4)).clamp_min(1e-20)


@torch.no_grad()
def velocity_drift(adapter: Any, cfg: Any, prompts: list[str], samples: int, latent_shape: tuple[int, ...]
                   ) -> list[dict[str, float]]:
    """Per step of the base model's ODE trajectories: sigma, relative RMS drift, periodic share."""
    s = cfg.sampler
    schedule = sde.flow_schedule(s.num_steps, s.shift)
    batch = [p for p in prompts for _ in range(samples)]
    text = adapter.prompt_text(batch)
    g = s.guidance_scale                          # the run's CFG: the velocity the policy follows
    text_u = adapter.negative_text(cfg.data.negative_prompt, batch) if g != 1.0 else None
    x = torch.randn((len(batch), *latent_shape), generator=torch.Generator().manual_seed(cfg.eval.seed))
    rows = []
    for k in range(s.num_steps):
        sig, nxt = float(schedule[k]), float(schedule[k + 1])
        sigma = torch.full((len(batch),), sig)
        v_final = guided_velocity(adapter, x, sigma, text, text_u, g)
        with adapter.reference():
            v_base = guided_velocity(adapter, x, sigma, text, text_u, g)
        d = v_final - v_base
        rows.append({"step": k, "sigma": sig,
                     "drift_rel_rms": float(d.square().mean().sqrt() / v_base.square().mean().sqrt()),
                     "drift_periodic_share": float(periodic_share(d, adapter.patch_size).mean())})
        x = sde.ode_step(x, v_base, sig, nxt)
    return rows


def mixed_evaluation(adapter: Any, cfg: Any, prompts: list[str], samples: int, latent_shape: tuple[int, ...],
                     rewards: dict, final_at: Callable[[int], bool]) -> dict[str, float]:
    """The held-out evaluation with the final model on the steps ``final_at(k)`` and the base elsewhere.
    The model is chosen per step through the adapter's routing hook (:meth:`policy_at`), so the SDE steps
    and their noise are the evaluation's own."""
    schedule = sde.flow_schedule(cfg.sampler.num_steps, cfg.sampler.shift)
    index = {float(schedule[k]): k for k in range(cfg.sampler.num_steps)}
    adapter.policy_at = lambda sigma: (contextlib.nullcontext() if final_at(index[sigma]) else adapter.reference())
    try:
        with torch.no_grad():
            out, _ = evaluate(adapter, prompts, samples, latent_shape, cfg.sampler, cfg.eval.seed, rewards,
                              cfg.data.negative_prompt, measure_kl=False, fps=cfg.video.fps)
    finally:
        del adapter.policy_at                       # back to the class's routing
    return out


def splits(num_steps: int) -> list[tuple[str, Callable[[int], bool]]]:
    """The base alone, the final model on the first k steps (k even), on every step, on the last k."""
    out: list[tuple[str, Callable[[int], bool]]] = [("no step (the base)", lambda k: False)]
    for n in range(2, num_steps, 2):
        out.append((f"the first {n} steps", lambda k, n=n: k < n))
    out.append(("every step (the final model)", lambda k: True))
    for n in range(2, num_steps, 2):
        out.append((f"the last {n} steps only", lambda k, n=n: k >= num_steps - n))
    return out


def probe(run_dir: Path, samples: int | None) -> dict[str, Any]:
    cfg = open_run(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"step_damage.py: {run_dir} holds no checkpoint")
    built = build_model(cfg, torch.device("cpu"), reference=True)      # the base is half of every comparison
    adapter, latent_shape = built.adapter, built.latent_shape
    load_checkpoint(ckpt, adapter, None)
    prompts = load_prompts(cfg.eval.prompts)
    samples = samples or cfg.eval.samples_per_prompt
    rewards = build_rewards(cfg.eval.rewards or cfg.rewards)
    drift = velocity_drift(adapter, cfg, prompts, samples, latent_shape)
    mixed = []
    for label, final_at in splits(cfg.sampler.num_steps):
        mixed.append({"final model on": label, **mixed_evaluation(adapter, cfg, prompts, samples, latent_shape,
                                                                   rewards, final_at)})
        print(f"{run_dir.name}: {label}: " + ", ".join(f"{n} {mixed[-1].get(k, float('nan')):.3f}"
                                                       for k, n, _ in SHOWN), flush=True)
    return {"run": str(run_dir), "checkpoint": ckpt.name, "samples_per_prompt": samples,
            "prompts": len(prompts), "drift": drift, "mixed": mixed}


def table(results: list[dict[str, Any]]) -> str:
    seeds = " / ".join(Path(r["run"]).name for r in results)
    lines = [f"## The final model on some steps, the base on the others ({seeds})", "",
             "| final model on | " + " | ".join(n for _, n, _ in SHOWN) + " |", "|---|" + "---|" * len(SHOWN)]
    for i, row in enumerate(results[0]["mixed"]):
        cells = [" / ".join(f"{r['mixed'][i].get(k, float('nan')):.{d}f}" for r in results) for k, _, d in SHOWN]
        lines.append(f"| {row['final model on']} | " + " | ".join(cells) + " |")
    lines += ["", f"## Velocity drift from the base along its ODE trajectories ({seeds})", "",
              "| step | sigma | drift (relative RMS) | patch-periodic share of the drift |", "|---|---|---|---|"]
    for i, row in enumerate(results[0]["drift"]):
        rel = " / ".join(f"{r['drift'][i]['drift_rel_rms']:.4f}" for r in results)
        per = " / ".join(f"{r['drift'][i]['drift_periodic_share']:.3f}" for r in results)
        lines.append(f"| {row['step']} | {row['sigma']:.2f} | {rel} | {per} |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    for r in results:
        name = Path(r["run"]).name
        ax[0].plot([d["sigma"] for d in r["drift"]], [d["drift_rel_rms"] for d in r["drift"]], "o-", label=name)
        first = [m for m in r["mixed"] if m["final model on"].startswith(("no step", "the first", "every"))]
        ks = list(range(0, 2 * len(first), 2))[:len(first) - 1] + [len(r["drift"])]
        ax[1].plot(ks, [m["eval/world_direction/mean"] for m in first], "o-", label=name)
        ax[2].plot(ks, [m["eval/world_fidelity/background_error/mean"] for m in first], "o-", label=f"{name} background")
        ax[2].plot(ks, [m["eval/world_fidelity/grid_energy/mean"] for m in first], "s--", label=f"{name} grid")
    ax[0].set(xlabel="sigma of the step", ylabel="|v_final - v_base| / |v_base|", title="velocity drift per step")
    ax[0].invert_xaxis()
    ax[1].set(xlabel="first k steps by the final model (rest: base)", ylabel="held-out direction",
              title="where the direction is decided")
    ax[2].set(xlabel="first k steps by the final model (rest: base)", ylabel="levels",
              title="where the artifacts are made")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run directories (config.yaml and checkpoints)")
    ap.add_argument("--samples", type=int, default=None, help="per held-out prompt (default: the run's)")
    ap.add_argument("--out", type=Path, default=Path("docs/step_damage"),
                    help="writes OUT.md, OUT's folder/data/NAME.json and OUT's folder/figures/NAME.png")
    args = ap.parse_args()
    results = [probe(r, args.samples) for r in args.runs]
    for d in (args.out.parent, data_file(args.out).parent, figure_file(args.out).parent):
        d.mkdir(parents=True, exist_ok=True)
    data_file(args.out).write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text("# Where the damage is made (generated by tools/step_damage.py)\n\n"
                                           + table(results) + "\n")
    plot(results, figure_file(args.out))
    print(table(results))


if __name__ == "__main__":
    main()
