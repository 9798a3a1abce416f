"""A random build in bfloat16 never holds its transformer or text encoder in float32 first.

Wan's UMT5-XXL is 5.7B parameters: built in float32 and cast afterwards it needs 23 GB before it
shrinks to 11.4 GB, more than the machines the real-size dry run is meant for
(``tools/bench/real_size.py``); HunyuanVideo's 13B transformer would need 52 GB. A dispatch mode
records every tensor the build allocates, for every registered family.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flowdppo_video.runs.config import ModelConfig
from flowdppo_video.models import families, family
from flowdppo_video.models import ltx2
from flowdppo_video.models.wan import WanAdapter

# The text encoder's embedding (8192 x its width, 131k elements or more) is made the largest tensor of
# every tiny model here (HunyuanVideo 1.5's transformer has a larger one of its own): the tiny VAEs'
# largest is 13,824 elements, the other parts' a few thousand.
INIT = {"text_encoder": {"vocab_size": 8192}}
# LTX-2's Gemma 3 keeps its vocabulary in its text config.
_GEMMA = ltx2.TINY_INIT["text_encoder"]
INITS = {"ltx2": {"text_encoder": {**_GEMMA, "text_config": {**_GEMMA["text_config"], "vocab_size": 8192}}}}
LARGE = 100_000
# Parts created in the model dtype; the VAE (and Wan I2V's CLIP image encoder) stay float32, as
# from_pretrained keeps them.
IN_MODEL_DTYPE = ("transformer", "transformer_2", "text_encoder", "text_encoder_2")


class _Allocations(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.float32_sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            self.float32_sizes.append(out.numel())
        return out


def _largest_float32(name: str, dtype: str):
    with _Allocations() as seen:
        adapter = family(name).build(ModelConfig(family=name, init=INITS.get(name, INIT), dtype=dtype), None,
                                     torch.device("cpu"))
    return max(seen.float32_sizes), adapter


@pytest.mark.parametrize("name", sorted(families()))
def test_bfloat16_build_allocates_no_float32_copy_of_the_large_parts(name: str) -> None:
    largest, _ = _largest_float32(name, "float32")
    assert largest >= LARGE                       # the mode sees the embedding when it is float32
    largest, adapter = _largest_float32(name, "bfloat16")
    assert largest < LARGE
    for part in IN_MODEL_DTYPE:
        module = getattr(adapter, part, None)
        if module is not None:
            assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, part
    assert {p.dtype for p in adapter.vae.parameters()} <= {torch.float32}
    if isinstance(adapter, WanAdapter):
        # The RoPE tables are computed in float64 by their constructor, then cast as before.
        assert adapter.transformer.rope.freqs_cos.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32         # restored after the build


def test_export_merge_matches_peft_merge_of_a_whole_copy() -> None:
    """The export merges layer by layer into a meta-built model (no second transformer in memory);
    its weights are those of peft's merge of a deep copy of the whole transformer, bit for bit."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter = WanAdapter.from_config({}, device=torch.device("cpu"), dtype="bfloat16")
    adapter.enable_lora(4, 8.0, ["to_q", "to_k", "to_v", "to_out.0"])
    for n, p in adapter.transformer.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)          # B = 0 at the start: make the merge matter
    plain = adapter.export_single()
    whole = copy.deepcopy(adapter.transformer)
    for m in whole.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    want = {k.replace(".base_layer.", "."): v for k, v in whole.state_dict().items() if "lora_" not in k}
    got = plain.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    assert torch.equal(plain.rope.freqs_cos, adapter.transformer.rope.freqs_cos)
    assert not torch.equal(got["blocks.0.attn1.to_q.weight"],
                           adapter.transformer.blocks[0].attn1.to_q.base_layer.weight)   # merged, base untouched
