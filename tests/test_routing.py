"""Routing by noise level (``model.base_below``): the tuned weights denoise at sigma >= the boundary,
the frozen base model below it, in rollouts and in the exported diffusers pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from flowdppo_video import sde
from flowdppo_video.runs.config import ConfigError, load_config
from flowdppo_video.models import ModelError, build_adapter
from flowdppo_video.training.rollout import guided_velocity, rollout

from .conftest import ROOT, tiny_config

PROMPTS = ["a red ball rolls to the left", "a blue square slides up"]


def _perturb(adapter) -> None:
    """Make the tuned model differ from the base (LoRA's B starts at zero)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _ode_by_hand(adapter, cfg, traj, tuned_from: float) -> torch.Tensor:
    """The oracle: from the state after the rollout's one SDE step (step 0), the ODE steps written out
    one by one, those at sigma >= ``tuned_from`` through the tuned model and the rest the base."""
    s = cfg.sampler
    schedule = sde.flow_schedule(s.num_steps, s.shift)
    text = adapter.encode_prompts([p for p in PROMPTS for _ in range(2)])
    assert traj.steps.tolist() == [0]
    x = traj.next_latents[:, 0]
    for k in range(1, s.num_steps):
        sig, nxt = float(schedule[k]), float(schedule[k + 1])
        sigma = torch.full((4,), sig)
        if sig >= tuned_from:
            v = guided_velocity(adapter, x, sigma, text, None, 1.0)
        else:
            with adapter.reference():
                v = guided_velocity(adapter, x, sigma, text, None, 1.0)
        x = sde.ode_step(x, v, sig, nxt)
    return x


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_routed_rollout_takes_the_base_below_the_boundary(tmp_path, lora_rank):
    # One SDE step, the first: every later step is deterministic and written out by the oracle.
    cfg = tiny_config(tmp_path, f"model.lora.rank={lora_rank}", "model.base_below=0.5", "sampler.sde_steps=1",
                      "sampler.window=[0.0,0.1]", "sampler.guidance_scale=1.0")
    adapter = build_adapter(cfg.model, torch.device("cpu"))
    assert adapter.base_below == 0.5 and (lora_rank or adapter.reference_copies())   # full FT keeps a copy
    shape = adapter.latent_shape(cfg.video.num_frames, cfg.video.height, cfg.video.width)
    _perturb(adapter)
    traj = rollout(adapter, PROMPTS, 2, shape, cfg.sampler, torch.Generator().manual_seed(5), progress=False,
                   decode=False)
    schedule = sde.flow_schedule(cfg.sampler.num_steps, cfg.sampler.shift)
    assert any(float(s) < 0.5 for s in schedule[:-1]) and any(float(s) >= 0.5 for s in schedule[:-1])
    with torch.no_grad():
        routed = _ode_by_hand(adapter, cfg, traj, tuned_from=0.5)
        tuned = _ode_by_hand(adapter, cfg, traj, tuned_from=0.0)
    assert torch.allclose(traj.final, routed, atol=1e-6)
    assert not torch.allclose(traj.final, tuned, atol=1e-3)          # the routing did change the video
    # The tuned weights are live again after the rollout (the reference context was left).
    x, sigma, text = traj.latents[:, 0], traj.sigmas[:1].expand(4), traj.text
    with torch.no_grad():
        v_now = adapter.velocity(x, sigma, text)
        with adapter.reference():
            v_base = adapter.velocity(x, sigma, text)
    assert not torch.allclose(v_now, v_base, atol=1e-4)
    # Inside an outer reference context (the base model's own evaluation) a routed rollout is the base's
    # at every step: the context is re-entrant and the inner one does not switch the tuned weights back.
    with torch.no_grad(), adapter.reference():
        inner = rollout(adapter, PROMPTS, 2, shape, cfg.sampler, torch.Generator().manual_seed(5), progress=False,
                        decode=False)
    with torch.no_grad():
        base = _ode_by_hand(adapter, cfg, inner, tuned_from=2.0)
    assert torch.allclose(inner.final, base, atol=1e-6)


def test_sde_steps_are_drawn_only_above_the_boundary(tmp_path):
    cfg = tiny_config(tmp_path, "model.base_below=0.6", "sampler.window=[0.0,1.0]", "sampler.sde_steps=2",
                      "sampler.num_steps=8", "sampler.shift=1.0")
    adapter = build_adapter(cfg.model, torch.device("cpu"))
    shape = adapter.latent_shape(cfg.video.num_frames, cfg.video.height, cfg.video.width)
    seen = set()
    for seed in range(6):
        traj = rollout(adapter, PROMPTS[:1], 1, shape, cfg.sampler, torch.Generator().manual_seed(seed),
                       progress=False, decode=False)
        assert all(float(s) >= 0.6 for s in traj.sigmas)
        seen.update(traj.steps.tolist())
    assert seen <= {0, 1, 2, 3} and len(seen) > 2           # sigma 1, .875, .75, .625 of 8 steps
    cfg.sampler.sde_steps = 5
    with pytest.raises(ModelError, match=r"sampler.sde_steps=5 exceeds the 4 steps at or above model.base_below=0.6"):
        rollout(adapter, PROMPTS[:1], 1, shape, cfg.sampler, torch.Generator().manual_seed(0), progress=False)


def test_routed_model_exports_as_two_experts(tmp_path):
    """The export reproduces the routing in diffusers: the tuned transformer above ``boundary_ratio``
    and the base below, as Wan 2.2 A14B is laid out; loading it back gives the same videos."""
    from diffusers import WanPipeline

    cfg = tiny_config(tmp_path, "model.base_below=0.5", "sampler.guidance_scale=1.0")
    a = build_adapter(cfg.model, torch.device("cpu"))
    _perturb(a)
    a.save_pretrained(tmp_path / "export")
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.5 and index["transformer_2"][1] == "WanTransformer3DModel"
    pipe = WanPipeline.from_pretrained(str(tmp_path / "export"))
    assert pipe.config.boundary_ratio == 0.5 and pipe.transformer_2 is not None
    loaded = load_config(ROOT / "configs" / "wan_tiny.yaml", [f"model.path={tmp_path / 'export'}", "model.init=null",
                                                               "model.lora.rank=0", "sampler.guidance_scale=1.0"])
    b = build_adapter(loaded.model, torch.device("cpu"))
    assert b.num_experts == 2 and b.boundary_ratio == 0.5
    shape = a.latent_shape(cfg.video.num_frames, cfg.video.height, cfg.video.width)
    ours = rollout(a, PROMPTS, 2, shape, cfg.sampler, torch.Generator().manual_seed(9), progress=False, decode=False)
    theirs = rollout(b, PROMPTS, 2, shape, loaded.sampler, torch.Generator().manual_seed(9), progress=False,
                     decode=False)
    assert torch.allclose(ours.final, theirs.final, atol=1e-5)


def test_bad_boundaries_are_refused_in_one_line(tmp_path):
    for bad in ("1.0", "0", "-0.2", "true", "high"):
        with pytest.raises(ConfigError, match=r"^model.base_below must be (a sigma in \(0, 1\) or null|a number)"):
            tiny_config(tmp_path, f"model.base_below={bad}")
    cfg = load_config(ROOT / "configs" / "wan22_tiny.yaml", ["model.base_below=0.5"])
    with pytest.raises(ModelError, match=r"^model.base_below 0.5: this model already routes its two experts"):
        build_adapter(cfg.model, torch.device("cpu"))
