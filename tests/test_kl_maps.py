"""Token-KL maps on a hand-made trajectory where exactly one token moved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowdppo_video.training import kl_maps
from flowdppo_video import objectives
from flowdppo_video.training.rollout import Trajectory

PATCH = (1, 2, 2)
C, F, H, W = 4, 3, 4, 6                     # token grid (3, 2, 3); Wan-like 9 pixel frames of 32 x 48
MOVED = (1, 2, 1, 2)                        # row 1, token (f'=2, h'=1, w'=2)
SHIFT = 0.3


def hand_made() -> tuple[Trajectory, torch.Tensor]:
    """A 2-video, 1-SDE-step trajectory and a new mean equal to mu_old but for one token."""
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 1, C, F, H, W, generator=g)
    means = torch.randn(2, 1, C, F, H, W, generator=g)
    videos = torch.randint(0, 256, (2, 9, 32, 48, 3), generator=g, dtype=torch.uint8)
    traj = Trajectory(prompts=["a", "b"], text=torch.zeros(2, 3, 8), text_uncond=None,
                      steps=torch.tensor([1]), sigmas=torch.tensor([0.8]), sigmas_next=torch.tensor([0.6]),
                      latents=lat, next_latents=lat.clone(), means=means, stds=torch.tensor([[0.5], [0.25]]),
                      final=lat[:, 0], videos=videos, sigma_1=0.9, kind="flow_sde", eta=0.7, guidance_scale=1.0)
    new = means[:, 0].clone()
    b, f, h, w = MOVED
    new[b, :, f, h * 2:(h + 1) * 2, w * 2:(w + 1) * 2] += SHIFT
    return traj, new


def test_kl_map_lights_exactly_the_moved_token():
    traj, new = hand_made()
    kl = kl_maps.step_kl_map(traj, 0, new, PATCH)
    assert kl.shape == (2, 3, 2, 3)
    expected = C * 2 * 2 * SHIFT ** 2 / (2 * 0.25 ** 2)      # sum over the token's D elements / 2 s^2
    assert kl[MOVED].item() == pytest.approx(expected, rel=1e-5)
    others = kl.clone()
    others[MOVED] = 0
    assert others.abs().max().item() == 0.0


def test_overlay_tints_only_that_tokens_pixels():
    traj, new = hand_made()
    kl = kl_maps.step_kl_map(traj, 0, new, PATCH)
    b, f, h, w = MOVED
    # Token frame 2 covers latent frame 2 = pixel frames 5..8 of Wan's causal VAE; its middle is 7.
    assert kl_maps.latent_to_pixel_frames(3, 9) == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    frames = kl_maps.token_frame_pixels(3, 1, 3, 9)
    assert frames == [0, 3, 7]
    frame = traj.videos[b, frames[f]].numpy()
    lit = kl_maps.overlay(frame, kl[b, f].numpy(), None, vmax=float(kl.max()))
    dark = kl_maps.overlay(frame, np.zeros((2, 3)), None, vmax=float(kl.max()))
    changed = (lit != dark).any(axis=2)
    want = np.zeros((32, 48), bool)
    want[16:32, 32:48] = True                               # token (h'=1, w'=2) of a 2 x 3 grid
    assert (changed == want).all()
    # Every other token frame draws no colour at all.
    for other in (0, 1):
        img = kl_maps.overlay(traj.videos[b, frames[other]].numpy(), kl[b, other].numpy(), None, float(kl.max()))
        base = kl_maps.overlay(traj.videos[b, frames[other]].numpy(), np.zeros((2, 3)), None, float(kl.max()))
        assert (img == base).all()


def test_drop_mask_and_its_outline_mark_that_token():
    traj, new = hand_made()
    kl = kl_maps.step_kl_map(traj, 0, new, PATCH).reshape(2, -1)
    log_ratio = torch.full_like(kl, 0.1)                   # the update pushes every token up
    flat = np.ravel_multi_index(MOVED[1:], (3, 2, 3))
    # A > 0 and rho > 1: the far token is dropped; A < 0 pushes it back, so it is kept.
    d = 2 * 2 * C
    drop = objectives.trust_region_mask("flow_dppo", log_ratio, kl, torch.tensor([1.0, 1.0]), delta=0.5 / d,
                             elements_per_token=d)
    assert drop.nonzero().tolist() == [[1, flat]]
    assert not objectives.trust_region_mask("flow_dppo", log_ratio, kl, torch.tensor([-1.0, -1.0]), delta=0.5 / d,
                                 elements_per_token=d).any()
    # Sample granularity and ratio clipping decide per row and spread the decision over its tokens.
    row = objectives.trust_region_mask("grpo_clip", log_ratio, kl, torch.tensor([1.0, -1.0]), delta=0.5,
                            clip_range=1e-3, elements_per_token=d)
    assert row[0].all() and not row[1].any()
    # The overlay outlines the dropped token in cyan, one pixel wide, inside its 16 x 16 square.
    grid = kl_maps.to_grid(drop.float(), (3, 2, 3)).bool()
    b, f = MOVED[:2]
    img = kl_maps.overlay(traj.videos[b, 7].numpy(), np.zeros((2, 3)), grid[b, f].numpy(), vmax=1.0)
    cyan = (img == [0, 255, 255]).all(axis=2)
    ring = np.zeros((32, 48), bool)
    ring[16:32, 32:48] = True
    ring[17:31, 33:47] = False
    assert (cyan == ring).all()


def test_snapshot_round_trip(tmp_path):
    traj, new = hand_made()
    kl = kl_maps.step_kl_map(traj, 0, new, PATCH).reshape(2, -1)
    drop = kl > 1.0
    adv = torch.tensor([-0.5, 2.0])
    path = kl_maps.save_snapshot(tmp_path / "iter_000003.npz", iteration=3, kl=kl[None], drop=drop[None],
                                 advantages=adv, traj=traj, patch=PATCH, latent_frames=F,
                                 objective={"kind": "flow_dppo", "delta": 1.0})
    snap = kl_maps.load_snapshot(path)
    assert snap["iteration"] == 3
    assert snap["prompts"] == ["b", "a"]                    # highest advantage first, then lowest
    assert snap["kl"].shape == (1, 2, 3, 2, 3) and snap["drop"].dtype == bool
    assert snap["kl"][0, 0, 2, 1, 2] == pytest.approx(float(kl[1].max()))
    assert snap["frames"].shape == (2, 3, 32, 48, 3)
    assert (snap["frames"][0, 2] == traj.videos[1, 7].numpy()).all()


def test_snapshot_of_tensors_left_on_the_device(tmp_path):
    """The update keeps the token KL and mask on the GPU (policy_update.py): the snapshot brings them
    over itself (issue 28, item 1: ``np.float32(kl.mean())`` crashed every default CUDA run)."""
    from .device_double import OnDevice

    traj, new = hand_made()
    kl = kl_maps.step_kl_map(traj, 0, new, PATCH).reshape(2, -1)[None]
    with pytest.raises(TypeError, match="cuda"):                 # the double refuses as CUDA does
        np.float32(OnDevice.wrap(kl).mean())
    path = kl_maps.save_snapshot(tmp_path / "iter_000000.npz", iteration=0, kl=OnDevice.wrap(kl),
                                 drop=OnDevice.wrap(kl > 1.0), advantages=OnDevice.wrap(torch.tensor([-0.5, 2.0])),
                                 traj=traj, patch=PATCH, latent_frames=F, objective={"kind": "flow_dppo"})
    snap = kl_maps.load_snapshot(path)
    assert snap["kl_mean_all"] == pytest.approx(float(kl.mean()))
    assert snap["prompts"] == ["b", "a"] and snap["kl"].shape == (1, 2, 3, 2, 3)
