"""SPEC invariant 1 on the real tiny WanTransformer3DModel: before any update the ratio is 1."""

from __future__ import annotations

import pytest
import torch

from flowdppo_video.training.rollout import rollout
from flowdppo_video.trainer import Trainer

from .conftest import tiny_config


def _replay_max_abs_log_ratio(trainer: Trainer, traj, groups: list[list[int]]) -> float:
    worst = 0.0
    adv = torch.ones(traj.batch_size)
    with torch.no_grad():
        for g in groups:
            idx = torch.tensor(g)
            mb = traj.select(idx)
            for j in range(traj.num_sde_steps):
                _, _, log_ratio = trainer.replay_step(mb, j, adv[idx])
                assert log_ratio.shape == (len(g), 3 * 2 * 2)   # tokens of a (4, 3, 4, 4) latent
                worst = max(worst, float(log_ratio.abs().max()))
    return worst


@pytest.mark.parametrize("kind, guidance, lora_rank, cfg_batch", [
    ("flow_sde", 1.0, 0, "auto"), ("flow_sde", 3.0, 0, "joint"), ("flow_sde", 3.0, 4, "split"),
    ("flow_sde", 1.0, 4, "auto"), ("cps", 3.0, 0, "split"), ("cps", 3.0, 4, "joint"), ("cps", 1.0, 0, "auto")])
def test_ratio_is_one_before_update(tmp_path, kind, guidance, lora_rank, cfg_batch):
    cfg = tiny_config(tmp_path, f"sampler.kind={kind}", f"sampler.guidance_scale={guidance}",
                      f"model.lora.rank={lora_rank}", "data.negative_prompt=blurry, static",
                      "sampler.batch_size=2", f"sampler.cfg_batch={cfg_batch}")
    trainer = Trainer(cfg)
    traj = rollout(trainer.adapter, ["a red ball rolls to the left", "a blue square slides up"], 3,
                   trainer.latent_shape, cfg.sampler, torch.Generator().manual_seed(7), "blurry, static",
                   progress=False, decode=False)
    assert traj.batch_size == 6 and traj.num_sde_steps == 2
    assert (traj.text_uncond is not None) == (guidance != 1.0)
    assert traj.cfg_joint == (cfg_batch == "joint")          # auto: split on the CPU
    # Replay with batch compositions unlike the rollout's chunks of 2: shuffled, 1, 3, 6 rows.
    worst = _replay_max_abs_log_ratio(trainer, traj, [[5], [4, 0, 2], [1, 3], list(range(6))])
    assert worst < 1e-5


def test_ratio_detects_a_changed_policy(tmp_path):
    """The check above is not vacuous: a perturbed transformer moves the token log-ratio."""
    cfg = tiny_config(tmp_path, "sampler.guidance_scale=3.0", "data.prompts=[a red ball]")
    trainer = Trainer(cfg)
    traj = rollout(trainer.adapter, ["a red ball"], 2, trainer.latent_shape, cfg.sampler,
                   torch.Generator().manual_seed(1), progress=False, decode=False)
    with torch.no_grad():
        for p in trainer.adapter.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert _replay_max_abs_log_ratio(trainer, traj, [[0, 1]]) > 1e-3


def test_trajectory_contents(tmp_path):
    cfg = tiny_config(tmp_path, "model.keep_text_encoder=true")     # prompts outside the run's
    trainer = Trainer(cfg)
    traj = rollout(trainer.adapter, ["a", "b"], 2, trainer.latent_shape, cfg.sampler,
                   torch.Generator().manual_seed(3), progress=False)
    b, s = 4, cfg.sampler.sde_steps
    assert traj.latents.shape == (b, s, 4, 3, 4, 4) and traj.latents.dtype == torch.float32
    assert traj.means.dtype == torch.float32 and traj.next_latents.dtype == torch.float32
    assert traj.stds.shape == (b, s) and bool((traj.stds > 0).all())
    assert traj.videos.shape == (b, 9, 32, 32, 3) and traj.videos.dtype == torch.uint8
    assert traj.prompts == ["a", "a", "b", "b"]
    assert not traj.latents.requires_grad and not traj.means.requires_grad
    # x' of one SDE step is x_k of the next when the two are consecutive.
    steps = traj.steps.tolist()
    for j in range(s - 1):
        if steps[j + 1] == steps[j] + 1:
            assert torch.equal(traj.next_latents[:, j], traj.latents[:, j + 1])
    # Same seed, same trajectory.
    again = rollout(trainer.adapter, ["a", "b"], 2, trainer.latent_shape, cfg.sampler,
                    torch.Generator().manual_seed(3), progress=False)
    assert torch.equal(again.means, traj.means) and torch.equal(again.videos, traj.videos)
