"""Benchmark: DeepSpeed ZeRO-3 at 2 ranks against unsharded AdamW (``parallel.zero_stage=0``).

(1) Per-rank bytes of parameters + gradients + optimizer state of the trained transformer after
one update step: :meth:`ZeroUpdater.memory` under ZeRO-3 against :func:`plain_memory` of the same
model with ``torch.optim.AdamW`` (what every rank of an unsharded run holds). Target <= 0.55x.
(2) Rollout wall time (no decoding) of the same rollout on every rank: ZeRO-3 with
``parallel.rollout_gather`` ``layer`` (each layer gathered as it runs, every denoising step) and
``full`` (the whole model gathered once per rollout), against the unsharded model. Median of
``--repeats`` interleaved runs after one warm-up; a run's time is the slowest rank's.

Full fine-tuning of the benchmarks' few-thousand-token Wan (``_common.WAN_INIT``: 4 blocks, 2304
tokens), float32, CPU, gloo, 2 processes of 1 thread each. Every weight is sharded
(``persistence_threshold=0``; DeepSpeed's default keeps tensors under 1e5 elements whole, which
here would be all of them, and in a real Wan only biases and norms).

    .venv/bin/python tools/bench/zero_memory.py --repeats 3     # starts itself under torchrun
    .venv/bin/python tools/bench/zero_memory.py --smoke --section /tmp/z.md --out /tmp/z.json  # does it run?

Prints a markdown table and writes it into ``docs/benchmarks.md`` as its section ``zero`` (between
``<!-- section: zero -->`` markers; ``--section FILE`` for another file), the JSON to ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch; see _common.py

import argparse
import statistics
import sys
import time
from typing import Any, Callable

import torch

import _common as C  # this folder's shared setup (the script's folder is on sys.path)

from flowdppo_video.commands import benchmarking as B

TARGET = 0.55
SECTION = "zero"                  # its section of docs/benchmarks.md


build = C.build_bench_wan


def one_update(adapter: Any, backward: Callable[[torch.Tensor], Any], rows: slice, latent: tuple[int, ...]) -> None:
    """S velocity losses on this rank's rows of a fixed batch, each backward'ed (the caller steps)."""
    g = torch.Generator().manual_seed(7)
    text = adapter.encode_prompts([C.PROMPT] * 2)
    for j in range(C.SDE_STEPS):
        x = torch.randn(2, *latent, generator=g)
        sigma = torch.full((2,), 0.5 + 0.1 * j)
        v = adapter.velocity(x[rows], sigma[rows], text[rows])
        backward(v.square().mean() / C.SDE_STEPS)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from flowdppo_video.runs.config import OptimConfig, ParallelConfig, SamplerConfig
    from flowdppo_video.parallel.zero import ZeroUpdater, plain_memory
    from flowdppo_video.training.rollout import rollout

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)
    optim = OptimConfig(lr=1e-5, grad_clip=1.0)
    plain = build()
    latent = plain.latent_shape(**C.VIDEO)
    params = plain.trainable_parameters()
    log(f"model: {sum(p.numel() for p in params) / 1e6:.2f}M trained weights, latent {latent}", flush=True)
    # (1) memory after one step: unsharded AdamW, then ZeRO-3.
    opt = torch.optim.AdamW(params, lr=optim.lr)
    one_update(plain, lambda loss: loss.backward(), slice(None), latent)
    opt.step()
    mem0 = plain_memory([plain.transformer], params, opt)
    opt.zero_grad(set_to_none=True)
    zero_adapter = build()
    t0 = time.perf_counter()
    upd = ZeroUpdater(zero_adapter, optim, ParallelConfig(zero_stage=3), accumulation_steps=C.SDE_STEPS,
                      persistence_threshold=0)
    init_s = time.perf_counter() - t0
    upd.zero_grad()
    one_update(zero_adapter, upd.backward, slice(rank, rank + 1), latent)
    stepped, norm = upd.step()
    mem3 = upd.memory()
    mems: list[Any] = [None] * world
    dist.all_gather_object(mems, mem3)
    log(f"ZeRO-3 engine built in {init_s:.1f} s; step {stepped}, grad norm {norm:.3g}", flush=True)
    # (2) rollouts, variants interleaved, the slowest rank's time per run.
    sampler = SamplerConfig(**C.sampler_dict())

    def run(adapter: Any, ctx: Callable[[], Any]) -> Callable[[], float]:
        def f() -> float:
            dist.barrier()
            t = time.perf_counter()
            with torch.no_grad(), ctx():
                rollout(adapter, [C.PROMPT], C.GROUP_SIZE, latent, sampler, torch.Generator().manual_seed(rank),
                        negative_prompt="", progress=False, decode=False)
            mine = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            return float(mine)
        return f

    def with_policy(policy: str) -> Callable[[], Any]:
        def ctx() -> Any:
            upd.rollout_gather = policy
            return upd.rollout()
        return ctx

    import contextlib

    variants = {"unsharded": run(plain, contextlib.nullcontext), "zero3_layer": run(zero_adapter, with_policy("layer")),
                "zero3_full": run(zero_adapter, with_policy("full"))}
    times: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    log(f"rollouts: {C.GROUP_SIZE} videos per rank, {C.NUM_STEPS} steps, CFG {C.GUIDANCE} (one warm-up, "
        f"then {args.repeats} interleaved repeats)", flush=True)
    for n in names:
        variants[n]()
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(variants[n]())
        log(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    if rank == 0:
        result = {"memory_stage0": mem0, "memory_zero3_per_rank": mems, "times_s": times,
                  "median_s": {n: statistics.median(t) for n, t in times.items()},
                  "machine": B.machine_info(torch.device("cpu")), "world": world, "init_s": init_s,
                  "trained_weights": sum(p.numel() for p in params), "latent": list(latent),
                  "tokens": C.latent_and_tokens(plain)[1], "smoke": C.SMOKE,
                  "command": " ".join(C.command_line()).replace(" --worker", "")}
        report(result, args)
    dist.barrier()
    dist.destroy_process_group()


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def report(res: dict[str, Any], args: argparse.Namespace) -> None:
    m0 = res["memory_stage0"]
    m3 = max(res["memory_zero3_per_rank"], key=lambda m: m["total"])   # the fuller rank
    ratio = m3["total"] / m0["total"]
    med = res["median_s"]
    lines = [
        "## ZeRO-3 at 2 ranks against unsharded AdamW",
        "",
        f"`{res['command']}`: full fine-tuning of the benchmarks' Wan ({res['trained_weights'] / 1e6:.2f}M weights, "
        f"latent {tuple(res['latent'])}, {res.get('tokens', 2304)} tokens), float32, CPU, gloo, 2 processes x 1 thread, every weight "
        f"sharded. {res['machine']['cpu']}, {res['machine']['logical_cpus']} logical CPUs, "
        f"load average at start {res['machine']['loadavg_at_start'][0]:.2f} (another job was running).",
        "",
        "Per-rank bytes held by the update after one step (`ZeroUpdater.memory()`; unsharded: `plain_memory`, "
        "what `torch.optim.AdamW` holds on every rank):",
        "",
        "| per rank (MiB) | parameters | gradients | optimizer state | total | vs unsharded | target |",
        "|---|---|---|---|---|---|---|",
        f"| unsharded (stage 0) | {_mb(m0['parameters'])} | {_mb(m0['gradients'])} | {_mb(m0['optimizer_state'])} | "
        f"{_mb(m0['total'])} | 1.00x | |",
        f"| ZeRO-3, 2 ranks | {_mb(m3['parameters'])} | {_mb(m3['gradients'])} | {_mb(m3['optimizer_state'])} | "
        f"{_mb(m3['total'])} | **{ratio:.3f}x** | <= {TARGET:.2f}x {'PASS' if ratio <= TARGET else 'FAIL'} |",
        "",
        f"ZeRO-3 also keeps {_mb(m3['buffers'])} MiB of reduce buckets (not in the total: a fixed size, "
        "4x the largest trained tensor, at least 1 MiB). Float32 shards are their own master weights. Under "
        "bf16 DeepSpeed keeps float32 masters and float32 moments: 16/W bytes per trained weight at W ranks "
        "(plus a float32 copy of the gradient shard during the step), against 8 for `torch.optim.AdamW` on "
        "bf16 weights with bf16 moments: the same at 2 ranks, a quarter at 8.",
        "",
        f"Rollout of {C.GROUP_SIZE} videos per rank, {C.NUM_STEPS} steps, CFG {C.GUIDANCE} (2 rows per video per "
        f"step), no decoding; median of {len(res['times_s']['unsharded'])} interleaved runs after a warm-up, each "
        "run the slowest rank's wall time:",
        "",
        "| rollout | median s | runs s | vs unsharded |",
        "|---|---|---|---|",
    ]
    for n, label in [("unsharded", "unsharded"), ("zero3_layer", "ZeRO-3, `rollout_gather: layer`"),
                     ("zero3_full", "ZeRO-3, `rollout_gather: full`")]:
        runs = ", ".join(f"{t:.2f}" for t in res["times_s"][n])
        lines.append(f"| {label} | {med[n]:.2f} | {runs} | {med[n] / med['unsharded']:.2f}x |")
    lines += ["", "`layer` gathers every submodule's weights each time it runs (every denoising step), one "
              "collective at a time and without prefetch (the rollout, the replay and the reference call the "
              "layers in different orders, so ZeRO-3's trace-based prefetch stays off); here that is a gloo "
              "all-gather between two single-thread processes per submodule call. `full` gathers the whole "
              "trained model once per rollout and holds it to the end (the memory of an unsharded model during "
              "the rollout); what remains is ZeRO-3's per-submodule hook bookkeeping. GPU timings (NCCL) are "
              "not measured here.", ""]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    if args.section is not None:
        B.write_section(args.section, SECTION, text)
        print(f"wrote section {SECTION!r} of {args.section}")
    B.write_json(args.out, {**res, "ratio": ratio, "target": TARGET, "pass": ratio <= TARGET})


def main(argv: list[str] | None = None) -> int:
    return C.two_process_main(__doc__, __file__, worker, report, argv, repeats=3)


if __name__ == "__main__":
    sys.exit(main())
