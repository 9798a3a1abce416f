"""The memory planner (``flowdppo-video plan``) against measurements on real tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowdppo_video.commands.cli import main
from flowdppo_video.runs.config import LoraConfig, ModelConfig, load_config
from flowdppo_video.models import build_adapter
from flowdppo_video.models.memory import activation_profile
from flowdppo_video.commands.planner import plan_memory

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "wan_tiny.yaml"


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("rank", [0, 4])
def test_parameter_gradient_optimizer_bytes_are_exact(rank: int) -> None:
    cfg = load_config(TINY, [f"model.lora.rank={rank}"])
    plan = plan_memory(cfg, world=1)
    adapter = build_adapter(cfg.model, torch.device("cpu"))
    params = adapter.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-3)
    c, f, h, w = adapter.latent_shape(cfg.video.num_frames, cfg.video.height, cfg.video.width)
    text = adapter.encode_prompts(["a red square moves left"] * 2)
    adapter.velocity(torch.randn(2, c, f, h, w), torch.full((2,), 0.5), text).square().mean().backward()
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert plan.row("trained: transformer").device == _nbytes(params)
    assert plan.row("gradients").device == _nbytes([p.grad for p in params])
    assert plan.row("optimizer state").device == _nbytes(state)
    frozen_tr = [p for p in adapter.transformer.parameters() if not p.requires_grad]
    if rank:
        assert plan.row("frozen: transformer base weights").device == _nbytes(frozen_tr) > 0
    # Released once the run's prompts are encoded (models/text_cache.py); kept, it is counted whole.
    assert plan.row("frozen: text_encoder").device == 0
    kept = plan_memory(load_config(TINY, [f"model.lora.rank={rank}", "model.keep_text_encoder=true"]), world=1)
    assert kept.row("frozen: text_encoder").device == _nbytes(adapter.text_encoder.parameters())
    assert plan.row("frozen: vae").device == _nbytes(adapter.vae.parameters())


def _saved_bytes(adapter, f: int, h: int, w: int, text_len: int) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (each storage once, weights excluded)."""
    t = adapter.transformer
    weights = {p.untyped_storage().data_ptr() for p in t.parameters()}
    seen: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        s = x.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return x

    x = torch.randn(1, int(t.config.in_channels), f, h, w)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        adapter.velocity(x, torch.full((1,), 0.5), torch.randn(1, text_len, int(t.config.text_dim)))
    return sum(seen.values())


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_prediction_matches_saved_tensors(rank: int, ckpt: bool) -> None:
    init = {"transformer": {"num_attention_heads": 2, "attention_head_dim": 32, "ffn_dim": 128, "num_layers": 2,
                            "text_dim": 32}, "text_encoder": {"d_model": 32}}
    cfg = ModelConfig(family="wan", init=init, max_sequence_length=16, gradient_checkpointing=ckpt,
                      lora=LoraConfig(rank=rank))
    adapter = build_adapter(cfg, torch.device("cpu"))
    prof = activation_profile(adapter)
    errors = []
    for f, h, w in [(3, 16, 16), (5, 24, 24)]:
        tokens = f * (h // 2) * (w // 2)
        measured = _saved_bytes(adapter, f, h, w, 16)
        predicted = ((prof.block_inputs if ckpt else prof.blocks) + prof.outside).bytes(tokens, 16)
        errors.append(predicted / measured - 1)
    print(f"rank={rank} checkpointing={ckpt}: relative errors {[f'{e:+.3f}' for e in errors]}")
    assert all(abs(e) <= 0.30 for e in errors), errors


def test_sequence_parallel_divides_activations() -> None:
    over = ["video.num_frames=33", "video.height=128", "video.width=128"]
    one = plan_memory(load_config(TINY, over), world=2)
    two = plan_memory(load_config(TINY, over + ["parallel.sequence_parallel=2"]), world=2)
    for row in ("activations, update, no", "activations, update, checkpointing"):
        assert two.row(row).device <= 0.6 * one.row(row).device
    zero3 = plan_memory(load_config(TINY, over + ["parallel.zero_stage=3"]), world=2)
    assert zero3.row("trained: transformer").device == one.row("trained: transformer").device / 2


ROWS = ["trained: transformer", "frozen: transformer base weights", "frozen: text_encoder", "frozen: vae",
        "gradients", "optimizer state", "activations, update, no checkpointing", "activations, update, checkpointing",
        "activations, rollout peak", "total per GPU"]


def test_cli_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", str(TINY), "--world", "1"]) == 0
    out = capsys.readouterr().out
    for row in ROWS:
        assert row in out


@pytest.mark.slow
@pytest.mark.parametrize("recipe, shapes, counts", [
    ("wan2.1_t2v_1.3b.yaml", "wan2.1_t2v_1.3b", ["1,418,996,800"]),       # Wan 2.1 1.3B's transformer
    # HunyuanVideo 1.5 480p T2V: the 8.3B transformer, Qwen2.5-VL-7B's language model, ByT5-small's encoder
    ("hunyuan_video_1.5_t2v.yaml", "hunyuan_video_1.5_t2v_480p", ["8,326,608,160", "7,070,619,136", "219,314,944"]),
])
def test_cli_real_size_from_model_shapes(capsys: pytest.CaptureFixture[str], recipe: str, shapes: str,
                                         counts: list[str]) -> None:
    assert main(["plan", "--config", str(ROOT / "configs" / recipe), "--world", "8",
                 "--model-config", str(ROOT / "configs" / "model_shapes" / shapes),
                 "parallel.sequence_parallel=2", "parallel.zero_stage=3"]) == 0
    out = capsys.readouterr().out
    for row in ROWS:
        assert row in out
    for n in counts:                          # counted on the meta device
        assert n in out


def test_bad_world_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", str(TINY), "--world", "3", "parallel.sequence_parallel=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flowdppo-video: error: --world 3 is not divisible by parallel.sequence_parallel=2"]


def test_speed_switches_do_not_stop_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    """A config for a CUDA-only attention backend, compiled, plans on a machine without CUDA or
    flash_attn (tools/gpu_check.sh plans its flash variants); the figures are those of native."""
    args = ["plan", "--config", str(TINY), "--world", "1"]
    assert main(args) == 0
    native = capsys.readouterr().out
    assert main([*args, "model.attention_backend=flash", "model.compile=true"]) == 0
    assert capsys.readouterr().out == native
