"""Benchmark (b): one Flow-DPPO update step against a bare forward+backward of the same transformer.

Ours is ``Trainer.update`` on a stored rollout, configured so that it is exactly one minibatch
(``optim.inner_epochs=1``, ``optim.minibatch_size=B``): ``zero_grad``, then for each of the ``S``
stored SDE steps ``Trainer.replay_step`` (CFG velocity, SDE mean, token log-probs, KL, the
Flow-DPPO loss) and ``backward``, then gradient clipping and the AdamW step.

The baseline is the same transformer, the same updater (``trainer.updater``: its AdamW, its
gradient clipping), the same latents: ``zero_grad``, then ``S`` times one plain forward on the
same ``[cond; uncond]`` rows (``2B``, as the replay's CFG forward), an MSE loss on the output and
the updater's ``backward``, then the updater's ``step`` (clipping and AdamW), as ``Trainer.update``
drives it. Full fine-tuning (every transformer weight trains), float32.

    .venv/bin/python tools/bench/update_step.py --repeats 5 --out /tmp/b.json
    .venv/bin/python tools/bench/update_step.py --smoke --no-memory --out /tmp/b.json   # seconds: does it run?
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch; see _common.py

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

import _common as C  # this folder's shared setup (the script's folder is on sys.path)

from flowdppo_video.commands import benchmarking as B

TARGET = 1.10


def bare_step(trainer: Any, traj: Any) -> Callable[[], float]:
    """Forward + MSE + backward per stored SDE step on the replay's rows, then the updater's step
    (clipping + AdamW): the optimizer work of ``Trainer.update`` through the same interface."""
    adapter, upd, dev = trainer.adapter, trainer.updater, trainer.device
    b, s = traj.batch_size, traj.num_sde_steps
    text = torch.cat([traj.text, traj.text_uncond]).to(dev)

    def step() -> float:
        upd.zero_grad()
        total = 0.0
        for j in range(s):
            x = traj.latents[:, j].to(dev)
            sigma = traj.sigmas[j].expand(b).to(dev)
            target = traj.next_latents[:, j].to(dev)
            out = adapter.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([sigma, sigma]) * 1000.0,
                                      encoder_hidden_states=text, return_dict=False)[0]
            loss = (out.float() - torch.cat([target, target])).square().mean()
            upd.backward(loss / s)
            total += float(loss.detach()) / s
        stepped, _ = upd.step()
        if not stepped:
            raise RuntimeError("the bare step's gradient is not finite: the comparison would time a skipped step")
        return total

    return step


def setup(device: torch.device, workdir: str, objective: str = "flow_dppo"
          ) -> tuple[Any, Any, torch.Tensor]:
    trainer = C.build_trainer(workdir, device, objective)
    traj = C.trajectory_for(trainer)
    return trainer, traj, C.advantages_for(traj.batch_size)


def variants_for(trainer: Any, traj: Any, adv: torch.Tensor) -> dict[str, Callable[[], Any]]:
    return {"flow_dppo_update": lambda: trainer.update(traj, adv, 0), "bare_fwd_bwd": bare_step(trainer, traj)}


def run(repeats: int = 5, out: Path | None = None, device: str = "cpu", memory: bool = True,
        argv: list[str] | None = None) -> dict[str, Any]:
    C.setup_torch()
    dev = C.torch_device(device)
    machine = B.machine_info(dev)
    print(f"(b) Flow-DPPO update step vs bare forward+backward on {dev}: building trainer, one rollout ...",
          flush=True)
    with tempfile.TemporaryDirectory() as d:
        trainer, traj, adv = setup(dev, d)
        variants = variants_for(trainer, traj, adv)
        timed, mem = C.time_and_probe(Path(__file__), variants, repeats, dev, device, traj, Path(d), memory)
    latent, tokens = C.latent_and_tokens(trainer.adapter)
    config = {"model_init": C.WAN_INIT, "video": C.VIDEO, "latent": latent, "tokens": tokens,
              "smoke": C.SMOKE, "minibatch_videos": traj.batch_size, "rows_per_forward": 2 * traj.batch_size,
              "sde_steps_replayed": traj.num_sde_steps, "guidance_scale": C.GUIDANCE, "finetune": "full",
              "optimizer": "AdamW", "grad_clip": 1.0, "dtype": "float32"}
    note = (f"One optimizer step over one minibatch of {traj.batch_size} videos x {traj.num_sde_steps} stored SDE steps. "
            "Both sides: the same transformer and AdamW object, the same 2B [cond; uncond] rows per forward, one "
            "backward per SDE step, gradient clipping, one AdamW step. The difference is what Flow-DPPO adds: "
            "the SDE mean, token log-probs and KL, the masked objective, the trajectory slicing and the stats.")
    result = B.make_result("update_step", "(b) Flow-DPPO update step vs bare forward+backward",
                           argv or C.command_line(), repeats, machine, timed, mem,
                           [("Trainer.update (1 minibatch) / bare forward+backward+AdamW", "flow_dppo_update",
                             "bare_fwd_bwd", TARGET)], config, note)
    B.summarize(result)
    B.write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    return C.trajectory_main(__doc__, variants_for, run, argv)


if __name__ == "__main__":
    main()
