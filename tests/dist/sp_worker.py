"""Ulysses SP exactness, run by tests/test_sequence_parallel.py under
``torchrun --nproc_per_node=2 tests/dist/sp_worker.py OUT.json`` (gloo, CPU).

For each tiny model: the single-process velocity and parameter gradients of a fixed loss, then the
same with ``apply_sequence_parallel(adapter, WORLD)``; gradients summed over the group. Rank 0
writes, per case, the max |diff| of the output and of the gradients, the output's difference
between the ranks and the tokens each rank held, as JSON.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

from flowdppo_video.models.base import ModelError, TextBatch
from flowdppo_video.models.hunyuan import HunyuanVideoAdapter
from flowdppo_video.models.hunyuan15 import HunyuanVideo15Adapter
from flowdppo_video.models.hunyuan15_i2v import HunyuanVideo15I2VAdapter
from flowdppo_video.models.wan import WanAdapter
from flowdppo_video.parallel.sequence import apply_sequence_parallel

CPU = torch.device("cpu")


def wan(init: dict | None = None) -> WanAdapter:
    return WanAdapter.from_config(init or {}, device=CPU, max_sequence_length=8)


def hunyuan() -> HunyuanVideoAdapter:
    return HunyuanVideoAdapter.from_config({}, device=CPU, max_sequence_length=8)


def hunyuan15() -> HunyuanVideo15Adapter:
    # Two blocks, so the text stream of the first one (its joint-attention outputs) reaches the output.
    return HunyuanVideo15Adapter.from_config({"transformer": {"num_layers": 2}}, device=CPU, max_sequence_length=8)


def hunyuan15_i2v() -> HunyuanVideo15I2VAdapter:
    return HunyuanVideo15I2VAdapter.from_config({"transformer": {"num_layers": 2}}, device=CPU, max_sequence_length=8)


def text_for(adapter, b: int, g: torch.Generator, shape: tuple[int, ...] = ()):
    """Random conditioning of ``b`` rows in the family's form; masks with padding that differs by row."""
    def mask(n: int) -> torch.Tensor:
        m = torch.ones(b, n, dtype=torch.long)
        m[0, n - 2:] = 0
        return m
    if isinstance(adapter, HunyuanVideo15I2VAdapter):        # image latents + mask channel, SigLIP tokens
        cond = torch.randn(b, shape[1] + 1, *shape[2:], generator=g)
        return TextBatch(embeds=torch.randn(b, 6, 16, generator=g), mask=mask(6),
                         embeds_2=torch.randn(b, 5, 16, generator=g), mask_2=mask(5), cond=cond,
                         image=torch.randn(b, 16, 8, generator=g))
    if isinstance(adapter, HunyuanVideo15Adapter):
        return TextBatch(embeds=torch.randn(b, 6, 16, generator=g), mask=mask(6),
                         embeds_2=torch.randn(b, 5, 16, generator=g), mask_2=mask(5))
    if isinstance(adapter, HunyuanVideoAdapter):
        return TextBatch(embeds=torch.randn(b, 6, 16, generator=g), mask=mask(6),
                         pooled=torch.randn(b, 8, generator=g))
    return torch.randn(b, 8, int(adapter.transformer.config.text_dim), generator=g)


def run(adapter, shape: tuple[int, ...], experts: list[int], seed: int):
    """Outputs per expert (and of the frozen reference, when the adapter keeps one) and gradients of
    ``sum_e <v_e, w>`` w.r.t. every parameter of the experts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    sigma = torch.rand(shape[0], generator=g) * 0.8 + 0.1
    text = text_for(adapter, shape[0], g, shape)
    weights = torch.randn(*shape, generator=g)
    params = [p for t in adapter.experts for p in t.parameters()]
    for p in params:
        p.grad = None
    outs, loss = [], 0.0
    for e in experts:
        v = adapter.velocity(x, sigma, text, expert=e)
        outs.append(v.detach())
        loss = loss + (v * weights).sum()
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    if adapter._lora_rank or adapter.reference_copies():
        with torch.no_grad(), adapter.reference():
            outs += [adapter.velocity(x, sigma, text, expert=e) for e in experts]
    return outs, grads


def case(name: str, make, shape: tuple[int, ...], experts: list[int] = (0,), checkpointing: bool = False,
         training: str = "full") -> dict:
    """``training``: ``full`` (every parameter, no reference), ``full+reference`` (a frozen copy
    too) or ``lora`` (rank-2 adapters on the attention projections)."""
    group = dist.group.WORLD
    adapter = make()
    if training == "lora":
        adapter.enable_lora(2, None, ["to_q", "to_k", "to_v", "to_out.0"])
        for t in adapter.experts:       # B = 0 at init would hide the adapters: give them weights
            for n, p in t.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(3))
    elif training == "full+reference":
        adapter.enable_full_finetune(keep_reference=True)
    if checkpointing:
        adapter.enable_gradient_checkpointing()
    ref_out, ref_grads = run(adapter, shape, list(experts), seed=1)
    apply_sequence_parallel(adapter, group)
    local = []
    for t in adapter.experts:        # tokens entering the output projection on this rank
        t.proj_out.register_forward_pre_hook(lambda m, a: local.append(a[0].shape[1]))
    t0 = time.perf_counter()
    sp_out, sp_grads = run(adapter, shape, list(experts), seed=1)
    sp_s = time.perf_counter() - t0
    for gr in sp_grads:
        dist.all_reduce(gr, group=group)
    between = 0.0
    for o in sp_out:
        parts = [torch.empty_like(o) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, o)
        between = max(between, max((p - parts[0]).abs().max().item() for p in parts))
    sp = adapter.transformer._sequence_parallel
    if training == "lora":   # exporting merged weights deep-copies the SP-enabled transformer
        assert not adapter._merged(0)._forward_hooks
    return {"case": name, "shape": list(shape), "experts": list(experts), "tokens": sp.length,
            "local_tokens": sorted(set(local)), "padded": sp.padded, "checkpointing": checkpointing,
            "training": training, "outputs": len(ref_out),
            "out_diff": max((a - b).abs().max().item() for a, b in zip(sp_out, ref_out)),
            "out_scale": max(a.abs().max().item() for a in ref_out),
            "grad_diff": max((a - b).abs().max().item() for a, b in zip(sp_grads, ref_grads)),
            "grad_scale": max(a.abs().max().item() for a in ref_grads),
            "grads_nonzero": sum(int(a.abs().sum() > 0) for a in ref_grads), "grads": len(ref_grads),
            "between_ranks": between, "sp_seconds": round(sp_s, 3)}


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    two_experts = {"transformer_2": {}, "pipeline": {"boundary_ratio": 0.5}}
    results = [
        case("wan2.1 batch 2, 12 tokens, frozen reference", wan, (2, 4, 2, 4, 6), training="full+reference"),
        case("wan2.1 9 tokens (padded), checkpointing", wan, (1, 4, 1, 6, 6), checkpointing=True),
        case("wan2.2 ti2v expand_timesteps, 9 tokens", lambda: wan({"pipeline": {"expand_timesteps": True}}),
             (2, 4, 1, 6, 6)),
        case("wan2.2 two experts, both", lambda: wan(two_experts), (2, 4, 2, 4, 6), experts=[0, 1]),
        case("hunyuan_video batch 2, 12 tokens, LoRA", hunyuan, (2, 4, 2, 4, 6), training="lora"),
        case("hunyuan_video 9 tokens (padded), checkpointing", hunyuan, (2, 4, 1, 6, 6), checkpointing=True),
        case("hunyuan_video_1.5 9 tokens (padded)", hunyuan15, (2, 4, 1, 3, 3)),
        case("hunyuan_video_1.5_i2v 9 tokens (padded), image tokens", hunyuan15_i2v, (2, 4, 1, 3, 3)),
    ]
    errors = {}

    def without_plan() -> WanAdapter:       # a Wan as a family whose spec has no plan would be
        a = wan()
        a.sequence_parallel_plan = lambda transformer: None
        return a

    for key, call in [   # 3 heads cannot be split over 2 ranks; a family without a plan refuses SP
            ("heads", lambda: apply_sequence_parallel(wan({"transformer": {"num_attention_heads": 3}}),
                                                      dist.group.WORLD)),
            ("default", lambda: apply_sequence_parallel(without_plan(), dist.group.WORLD))]:
        try:
            call()
            errors[key] = None
        except ModelError as e:
            errors[key] = str(e)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"cases": results, "errors": errors}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
