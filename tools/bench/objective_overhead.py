"""Benchmark (c): Flow-DPPO against the ``grpo_clip`` (Flow-GRPO ratio clipping) objective, step time.

One trainer, one model, one stored rollout; the only difference between the two variants is
``objective.kind``, switched (``trainer.policy_update.set_objective``) before each call of
``Trainer.update`` (exactly one minibatch of ``B`` videos x ``S`` SDE steps, one AdamW step, as in benchmark (b)). Flow-DPPO
computes a per-token mask from the token KL and ratio; grpo_clip a per-row clipped ratio; both
compute the same token log-probs and the token KL (grpo_clip for its stats).

    .venv/bin/python tools/bench/objective_overhead.py --repeats 5 --out /tmp/c.json
    .venv/bin/python tools/bench/objective_overhead.py --smoke --no-memory --out /tmp/c.json  # does it run?
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch; see _common.py

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

import _common as C  # this folder's shared setup (the script's folder is on sys.path)

from flowdppo_video.commands import benchmarking as B

TARGET = 1.02


def variants_for(trainer: Any, traj: Any, adv: torch.Tensor) -> dict[str, Callable[[], Any]]:
    def with_objective(kind: str) -> Callable[[], Any]:
        # Each side switches the run's update to its own objective through the public hook, keeping
        # the optimizer (a fresh one per call would time its state's creation too).
        section = dataclasses.replace(trainer.cfg.objective, kind=kind)

        def step() -> Any:
            trainer.policy_update.set_objective(section)
            out = trainer.update(traj, adv, 0)
            # Only ratio clipping reports a clip fraction: if the switch stops taking effect (an
            # objective fixed when the trainer is built), both sides would time the same thing.
            if ("ratio/clip_frac" in out) != (kind == "grpo_clip"):
                raise RuntimeError(f"swapping in the {kind!r} objective did not change Trainer.update's "
                                   "objective: this benchmark must switch objectives another way")
            return out
        return step

    return {"flow_dppo_update": with_objective("flow_dppo"), "grpo_clip_update": with_objective("grpo_clip")}


def run(repeats: int = 5, out: Path | None = None, device: str = "cpu", memory: bool = True,
        argv: list[str] | None = None) -> dict[str, Any]:
    C.setup_torch()
    dev = C.torch_device(device)
    machine = B.machine_info(dev)
    print(f"(c) Flow-DPPO vs grpo_clip objective on {dev}: building trainer, one rollout ...", flush=True)
    with tempfile.TemporaryDirectory() as d:
        trainer = C.build_trainer(d, dev)
        traj = C.trajectory_for(trainer)
        adv = C.advantages_for(traj.batch_size)
        variants = variants_for(trainer, traj, adv)
        timed, mem = C.time_and_probe(Path(__file__), variants, repeats, dev, device, traj, Path(d), memory)
    latent, tokens = C.latent_and_tokens(trainer.adapter)
    config = {"model_init": C.WAN_INIT, "video": C.VIDEO, "latent": latent, "tokens": tokens,
              "smoke": C.SMOKE, "minibatch_videos": traj.batch_size, "sde_steps_replayed": traj.num_sde_steps,
              "guidance_scale": C.GUIDANCE, "finetune": "full", "granularity": trainer.cfg.objective.granularity,
              "delta": trainer.cfg.objective.delta, "clip_range": trainer.cfg.objective.clip_range, "dtype": "float32"}
    note = ("Same trainer, model, trajectory and advantages; only objective.kind differs. The transformer "
            "forward and backward dominate both; the difference is the objective's per-token work.")
    result = B.make_result("objective_overhead", "(c) Flow-DPPO vs grpo_clip objective step time",
                           argv or C.command_line(), repeats, machine, timed, mem,
                           [("Trainer.update: flow_dppo / grpo_clip", "flow_dppo_update", "grpo_clip_update",
                             TARGET)], config, note)
    B.summarize(result)
    B.write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return C.trajectory_main(__doc__, variants_for, run, argv)


if __name__ == "__main__":
    main()
