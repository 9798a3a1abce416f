"""A random build in bfloat16 never holds its transformer or text encoder in float32 first.

Wan's UMT5-XXL is 5.7B parameters: built in float32 and cast afterwards it needs 23 GB before it
shrinks to 11.4 GB, more than the machines the real-size dry run is meant for
(``tools/bench/real_size.py``). A dispatch mode records every tensor the build allocates.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flowdppo_video.models.wan import WanAdapter

# The text encoder's embedding (4096 x 32 = 131k elements) is by far the largest tensor here: the
# tiny VAE's largest is a 16 x 16 x 3 x 3 x 3 convolution (6,912), the transformer's 64 x 32.
INIT = {"text_encoder": {"vocab_size": 4096}}
LARGE = 100_000


class _Allocations(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.float32_sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            self.float32_sizes.append(out.numel())
        return out


def _largest_float32(dtype: str) -> tuple[int, WanAdapter]:
    with _Allocations() as seen:
        adapter = WanAdapter.from_config(INIT, device=torch.device("cpu"), dtype=dtype)
    return max(seen.float32_sizes), adapter


def test_bfloat16_build_allocates_no_float32_copy_of_the_large_parts() -> None:
    largest, _ = _largest_float32("float32")
    assert largest >= LARGE                       # the mode sees the embedding when it is float32
    largest, adapter = _largest_float32("bfloat16")
    assert largest < LARGE
    assert {p.dtype for p in adapter.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in adapter.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in adapter.vae.parameters()} == {torch.float32}
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
    plain = adapter._merged(0)
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
