"""Ulysses sequence parallelism (flowdppo_video/parallel/sequence.py and the families' plans).

One torchrun launch (2 processes, gloo, CPU) runs tests/dist/sp_worker.py over tiny Wan 2.1,
Wan 2.2 (two experts; TI2V ``expand_timesteps``), HunyuanVideo and HunyuanVideo 1.5 (text- and
image-to-video) models: the SP=2 velocity and the parameter gradients summed over the group must
equal the single-process ones, with batches of 2, token counts the degree does not divide
(padding), gradient checkpointing, LoRA and a frozen reference copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowdppo_video.models.base import ModelError
from flowdppo_video.parallel.sequence import apply_sequence_parallel, check_heads, group_degree

from .conftest import run_two_ranks

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "sp_worker.py"
TOL = 1e-5                      # float32


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sp") / "results.json"
    proc = run_two_ranks(str(WORKER), str(out), timeout=240)
    assert proc.returncode == 0, f"SP worker failed (rc {proc.returncode}):\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_sp2_equals_single_process(sp_results):
    cases = {c["case"]: c for c in sp_results["cases"]}
    assert len(cases) == 8
    for name, c in cases.items():
        # Each rank really held half of the (padded) tokens, and the padding path ran where N is odd.
        assert c["local_tokens"] == [c["padded"] // 2], name
        assert c["padded"] == c["tokens"] + c["tokens"] % 2, name
        assert c["out_diff"] <= TOL, (name, c["out_diff"])
        assert c["grad_diff"] <= TOL, (name, c["grad_diff"])
        assert c["between_ranks"] == 0.0, name                       # the same output on every rank
        assert c["out_scale"] > 0.1 and c["grad_scale"] > 0.1, name  # not a comparison of zeros
        assert c["grads_nonzero"] > 0, name
    assert any(c["tokens"] % 2 for c in cases.values())
    assert any(c["shape"][0] > 1 for c in cases.values())
    assert cases["wan2.2 two experts, both"]["experts"] == [0, 1]
    assert cases["wan2.2 two experts, both"]["grads_nonzero"] == cases["wan2.2 two experts, both"]["grads"]
    # The frozen reference (a copy) and LoRA's disabled adapters go through SP as well.
    assert cases["wan2.1 batch 2, 12 tokens, frozen reference"]["outputs"] == 2
    assert cases["hunyuan_video batch 2, 12 tokens, LoRA"]["outputs"] == 2


@pytest.mark.slow
def test_sp_refusals_name_the_cause(sp_results):
    errors = sp_results["errors"]
    assert errors["heads"] == ("sequence parallel degree 2 does not divide the 3 attention heads "
                               "(parallel.sequence_parallel must divide the model's head count)")
    assert errors["default"] == "WanAdapter does not support sequence parallelism"


def test_check_heads():
    check_heads(40, 4)
    check_heads(3, 1)
    with pytest.raises(ModelError, match=r"^sequence parallel degree 3 does not divide the 40 attention heads"):
        check_heads(40, 3)


def test_no_group_is_a_no_op():
    from flowdppo_video.models.wan import WanAdapter

    adapter = WanAdapter.from_config({}, device=torch.device("cpu"), max_sequence_length=8)
    t = adapter.transformer
    processors = dict(t.attn_processors)
    x, sigma, text = torch.randn(1, 4, 1, 4, 4), torch.tensor([0.5]), torch.randn(1, 8, 32)
    before = adapter.velocity(x, sigma, text)
    assert group_degree(None) == 1
    apply_sequence_parallel(adapter, None)
    assert getattr(t, "_sequence_parallel", None) is None and not t._forward_pre_hooks
    assert dict(t.attn_processors) == processors
    assert torch.equal(adapter.velocity(x, sigma, text), before)


@pytest.mark.parametrize("backend, frames, refused", [("flash", 3, True), ("flash", 2, False),
                                                      ("flash_varlen", 3, False), (None, 3, False)])
def test_a_maskless_backend_is_refused_where_sp_pads(monkeypatch, backend, frames, refused):
    """Issue 28, item 4: where the degree does not divide the token count (Wan's 3,510 at SP 4), the
    padded keys are masked; diffusers' flash-attn 2 path refuses masks. A 2-rank group's double
    (nothing here talks to another rank); the backend as diffusers' set_attention_backend leaves it
    on a GPU host (flash cannot be set on the CPU)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    from flowdppo_video.models.wan import WanAdapter
    from flowdppo_video.parallel import sequence
    from flowdppo_video.parallel.sequence import check_token_padding

    monkeypatch.setattr(sequence, "group_degree", lambda group: 2)
    monkeypatch.setattr(sequence.dist, "get_rank", lambda group=None: 0)
    adapter = WanAdapter.from_config({}, device=torch.device("cpu"), max_sequence_length=8)
    for m in adapter.transformer.modules():
        if backend is not None and hasattr(getattr(m, "processor", None), "_attention_backend"):
            m.processor._attention_backend = AttentionBackendName(backend)
    apply_sequence_parallel(adapter, group=object())
    latent = (4, frames, 6, 6)                      # patch (1, 2, 2): 3 x 3 x frames tokens
    if not refused:
        check_token_padding(adapter, latent)
        return
    with pytest.raises(ModelError) as e:
        check_token_padding(adapter, latent)
    assert str(e.value) == ("model.attention_backend 'flash' takes no attention mask, but parallel.sequence_parallel=2 "
                            "does not divide the 27 video tokens and masks the padding; use flash_varlen or native, "
                            "or a degree dividing 27")
