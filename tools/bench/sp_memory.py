"""Benchmark: Ulysses sequence parallelism (SP) at 2 ranks against one process, and the memory
planner's predictions beside the measurements.

At equal total tokens (one video of the benchmarks' few-thousand-token Wan, ``_common.WAN_INIT``:
4 blocks of 4 heads x 32, latent (16, 9, 32, 32) = 2304 tokens, 32 text tokens, float32, full
fine-tuning), for one forward + backward of ``adapter.velocity`` with and without gradient
checkpointing:

(1) Per-rank activation memory, SP=2 against SP=1. *Saved for backward*: bytes of the tensors
autograd keeps during the forward, counted with ``torch.autograd.graph.saved_tensors_hooks``
(each storage once, weights excluded). Under checkpointing the blocks' own saved tensors are packed
by the checkpoint, not by an outer hook: what it keeps is the blocks' tensor arguments (counted
from forward pre-hooks), and the backward re-runs one block at a time, whose saved set is the
largest block's from the run without checkpointing. *Peak RSS growth*: the process's resident-set
high-water mark during the call minus its resident set before (``benchmarking.peak_memory_of``: after
gc and ``malloc_trim``; includes the gradients and the backward's temporaries). Target: SP=2
<= 0.6x SP=1.
(2) SP communication time as a share of the step: time inside ``parallel.sequence``'s
``_all_to_all`` / ``_all_gather`` (wrapped here with timers; the module is not edited; the
collective alone in brackets) over the forward + backward wall time; median of ``--repeats``
interleaved runs after a warm-up, each run's time the slowest rank's.
(3) The planner (``flowdppo_video.commands.planner.plan_memory``) for the same model and tokens: activation
bytes at SP=1 and SP=2 with and without checkpointing, and the ZeRO-3 parameter + gradient +
optimizer bytes per rank beside ``tools/bench/zero_memory.py``'s measurement (its code, run here at
2 ranks; or its ``--out`` JSON with ``--zero-json``).

SP=1 runs in the same two processes (each computes the whole video alone, no communication), so
both sides see the same machine load.

    .venv/bin/python tools/bench/sp_memory.py --repeats 5     # starts itself under torchrun
    .venv/bin/python tools/bench/sp_memory.py --smoke --section /tmp/s.md --out /tmp/s.json   # does it run?

Prints markdown tables and writes them into ``docs/benchmarks.md`` as its section ``sp``
(between ``<!-- section: sp -->`` markers; ``--section FILE`` for another file), the JSON to ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch; see _common.py

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

import _common as C  # this folder's shared setup (the script's folder is on sys.path)

from flowdppo_video.commands import benchmarking as B

TARGET = 0.6
SECTION = "sp"                  # its section of docs/benchmarks.md
BATCH = 1                      # videos per forward (per rank: SP=2 ranks share this one video)
VARIANTS = [("sp1", 1, False), ("sp1_ckpt", 1, True), ("sp2", 2, False), ("sp2_ckpt", 2, True)]


build = C.build_bench_wan


def inputs(adapter: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same ``(x, sigma, text)`` on every rank: ``(B, C, F, H, W)`` latents, ``(B,)``, ``(B, L, text_dim)``."""
    g = torch.Generator().manual_seed(11)
    latent = adapter.latent_shape(**C.VIDEO)
    x = torch.randn(BATCH, *latent, generator=g)
    sigma = torch.full((BATCH,), 0.6)
    text = torch.randn(BATCH, C.MAX_SEQUENCE_LENGTH, int(adapter.transformer.config.text_dim), generator=g)
    return x, sigma, text


def set_checkpointing(adapter: Any, on: bool) -> None:
    t = adapter.transformer
    if on:
        t.enable_gradient_checkpointing()
    else:
        t.disable_gradient_checkpointing()


def step(adapter: Any, data: tuple[torch.Tensor, ...]) -> None:
    """One forward + backward of a velocity loss (gradients reset first, so each call allocates them)."""
    for p in adapter.trainable_parameters():
        p.grad = None
    v = adapter.velocity(*data)
    v.square().mean().backward()


# ---------------------------------------------------------------- communication timers
class CommTimer:
    """Seconds spent in ``parallel.sequence``'s ``_all_to_all`` / ``_all_gather`` (and in the
    ``torch.distributed`` collectives they call), installed by replacing the module attributes the
    autograd functions look up at call time."""

    def __init__(self) -> None:
        import torch.distributed as dist

        from flowdppo_video.parallel import sequence as seq

        self.fn_s = 0.0
        self.coll_s = 0.0
        self.calls = 0

        def timed(fn: Callable[..., Any], attr: str) -> Callable[..., Any]:
            def wrapper(*a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    setattr(self, attr, getattr(self, attr) + time.perf_counter() - t0)
                    if attr == "fn_s":
                        self.calls += 1
            return wrapper

        seq._all_to_all = timed(seq._all_to_all, "fn_s")
        seq._all_gather = timed(seq._all_gather, "fn_s")
        # sequence.py reaches the collectives as `dist.<name>`: wrap them on torch.distributed (this
        # process only; nothing else here calls them during a timed step).
        dist.all_to_all_single = timed(dist.all_to_all_single, "coll_s")
        dist.all_gather = timed(dist.all_gather, "coll_s")

    def reset(self) -> None:
        self.fn_s = self.coll_s = 0.0
        self.calls = 0


# ---------------------------------------------------------------- saved-for-backward bytes
def saved_bytes(adapter: Any, data: tuple[torch.Tensor, ...], ckpt: bool) -> dict[str, Any]:
    """Bytes autograd keeps after one forward (each storage once, weights excluded), by place.

    Without checkpointing: ``blocks`` (per block) and ``outside``. With it: ``outside`` (what the
    outer hook still sees) and ``block_args`` (the tensors the checkpoint keeps: each block's
    arguments). The forward is discarded without a backward (no collectives in backward needed).
    """
    t = adapter.transformer
    weights = {p.untyped_storage().data_ptr() for p in t.parameters()}
    seen: dict[int, tuple[int, str]] = {}
    where = ["outside"]

    def add(x: torch.Tensor, place: str) -> None:
        s = x.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in weights and ptr not in seen:
            seen[ptr] = (s.nbytes(), place)

    def pack(x: torch.Tensor) -> torch.Tensor:
        add(x, where[0])
        return x

    handles = []
    for i, blk in enumerate(t.blocks):
        def pre(m: Any, args: tuple, kwargs: dict, i: int = i) -> None:
            if ckpt:                # checkpoint keeps the block's tensor arguments
                for a in [*args, *kwargs.values()]:
                    for x in (a if isinstance(a, (tuple, list)) else (a,)):
                        if isinstance(x, torch.Tensor):
                            add(x, "block_args")
            else:
                where[0] = f"block{i}"

        def post(m: Any, args: tuple, out: Any) -> None:
            where[0] = "outside"
        handles += [blk.register_forward_pre_hook(pre, with_kwargs=True), blk.register_forward_hook(post)]
    set_checkpointing(adapter, ckpt)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = adapter.velocity(*data)
        del out
    finally:
        for h in handles:
            h.remove()
    by: dict[str, int] = {}
    for n, place in seen.values():
        by[place] = by.get(place, 0) + n
    blocks = [by.get(f"block{i}", 0) for i in range(len(t.blocks))]
    return {"outside": by.get("outside", 0), "block_args": by.get("block_args", 0), "blocks": blocks,
            "kept": sum(by.values())}


def peak_allocated(fn: Callable[[], Any]) -> int:
    """Peak bytes of live tensors during one call of ``fn``, above those live before it: the running
    sum of the CPU allocator's allocations and frees that ``torch.profiler`` records
    (``profile_memory``), the CPU analogue of ``torch.cuda.max_memory_allocated``."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------- the planner
def planner_rows(sp: int, world: int, zero_stage: int = 0) -> dict[str, float]:
    """The plan's device bytes for the benchmark's model and tokens (full fine-tuning, one video per
    update minibatch, no CFG: one forward per video, as measured here)."""
    from flowdppo_video.runs.config import config_from_dict
    from flowdppo_video.commands.planner import plan_memory

    with tempfile.TemporaryDirectory() as d:
        raw = C.trainer_config(d, torch.device("cpu"), "flow_dppo")
        raw["sampler"]["guidance_scale"] = 1.0
        raw["optim"]["minibatch_size"] = BATCH
        raw["parallel"] = {"sequence_parallel": sp, "zero_stage": zero_stage}
        plan = plan_memory(config_from_dict(raw), world=world)
    return {r.name.rstrip(" *"): r.device for r in plan.rows if r.device is not None}


# ---------------------------------------------------------------- the ZeRO-3 measurement
def zero_measure(rank: int) -> dict[str, Any]:
    """``tools/bench/zero_memory.py``'s memory measurement (its code): unsharded AdamW after one
    update, and ZeRO-3 (every weight sharded) per rank after one update, at this world."""
    import torch.distributed as dist

    import zero_memory as Z
    from flowdppo_video.runs.config import OptimConfig, ParallelConfig
    from flowdppo_video.parallel.zero import ZeroUpdater, plain_memory

    optim = OptimConfig(lr=1e-5, grad_clip=1.0)
    plain = Z.build()
    latent = plain.latent_shape(**C.VIDEO)
    params = plain.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=optim.lr)
    Z.one_update(plain, lambda loss: loss.backward(), slice(None), latent)
    opt.step()
    mem0 = plain_memory([plain.transformer], params, opt)
    zero_adapter = Z.build()
    upd = ZeroUpdater(zero_adapter, optim, ParallelConfig(zero_stage=3), accumulation_steps=C.SDE_STEPS,
                      persistence_threshold=0)
    upd.zero_grad()
    Z.one_update(zero_adapter, upd.backward, slice(rank, rank + 1), latent)
    upd.step()
    mems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(mems, upd.memory())
    return {"memory_stage0": mem0, "memory_zero3_per_rank": mems, "source": "measured in this run with its code"}


# ---------------------------------------------------------------- the worker
def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    log = print if rank == 0 else (lambda *a, **k: None)
    machine = B.machine_info(torch.device("cpu"))
    timer = CommTimer()
    adapters = {1: build(), 2: build()}
    from flowdppo_video.parallel.sequence import apply_sequence_parallel

    apply_sequence_parallel(adapters[2], dist.group.WORLD)
    data = inputs(adapters[1])
    latent = adapters[1].latent_shape(**C.VIDEO)
    pt, ph, pw = adapters[1].patch_size
    tokens = (latent[1] // pt) * (latent[2] // ph) * (latent[3] // pw)
    log(f"model: {sum(p.numel() for p in adapters[1].trainable_parameters()) / 1e6:.2f}M trained weights, "
        f"latent {latent}, {tokens} tokens, batch {BATCH}", flush=True)

    def run(name: str) -> Callable[[], dict[str, float]]:
        sp = dict((n, s) for n, s, _ in VARIANTS)[name]
        ckpt = dict((n, c) for n, _, c in VARIANTS)[name]

        def f() -> dict[str, float]:
            set_checkpointing(adapters[sp], ckpt)
            gc.collect()
            dist.barrier()
            timer.reset()
            t = time.perf_counter()
            step(adapters[sp], data)
            wall = time.perf_counter() - t
            slowest = torch.tensor([wall], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            return {"wall_s": wall, "slowest_s": float(slowest), "comm_fn_s": timer.fn_s,
                    "comm_coll_s": timer.coll_s, "comm_calls": timer.calls}
        return f

    names = [n for n, _, _ in VARIANTS]
    variants = {n: run(n) for n in names}
    # (1b) peak RSS growth: each variant warmed up, then probed once (both ranks at once).
    rss: dict[str, float] = {}
    log("peak RSS growth (one warm-up, then one probed call per variant)", flush=True)
    for n in names:
        variants[n]()
        dist.barrier()
        rss[n] = B.peak_memory_of(variants[n], torch.device("cpu"))["peak_extra_mb"] * 2**20
        log(f"  {n}: +{rss[n] / 2**20:.1f} MiB", flush=True)
    # (1c) peak live tensor bytes (the allocator's view): the median of 3 profiled calls per variant
    # (it moves by a few MiB between calls), variants interleaved; one call at smoke size.
    allocs: dict[str, list[int]] = {n: [] for n in names}
    for _ in range(1 if C.SMOKE else 3):
        for n in names:
            dist.barrier()
            allocs[n].append(peak_allocated(variants[n]))
    alloc = {n: int(statistics.median(v)) for n, v in allocs.items()}
    log("peak allocated (MiB): " + ", ".join(
        f"{n} {alloc[n] / 2**20:.1f} ({', '.join(f'{b / 2**20:.1f}' for b in allocs[n])})" for n in names), flush=True)
    # (2) timing, interleaved, the order rotating every repeat.
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    log(f"timing: {args.repeats} interleaved repeats", flush=True)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            runs[n].append(variants[n]())
        log(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} {runs[n][-1]['slowest_s']:.2f}s (comm {runs[n][-1]['comm_fn_s']:.2f}s)" for n in names), flush=True)
    # (1a) saved-for-backward bytes.
    saved = {}
    for n, sp, ckpt in VARIANTS:
        dist.barrier()
        saved[n] = saved_bytes(adapters[sp], data, ckpt)
    for sp in (1, 2):     # checkpointing's backward re-runs one block: the largest block's saved set
        saved[f"sp{sp}_ckpt"]["rerun"] = max(saved[f"sp{sp}"]["blocks"])
    log("saved for backward (MiB): " + ", ".join(f"{n} {saved[n]['kept'] / 2**20:.1f}" for n in names), flush=True)
    # (3) the planner, and the ZeRO-3 measurement.
    plans = {"sp1": planner_rows(1, 1), "sp2": planner_rows(2, 2), "zero3": planner_rows(1, 2, zero_stage=3)}
    if args.zero_json is not None:
        z = json.loads(args.zero_json.read_text())
        zero = {"memory_stage0": z["memory_stage0"], "memory_zero3_per_rank": z["memory_zero3_per_rank"],
                "source": f"read from {args.zero_json} ({z.get('command', 'zero_memory.py')})"}
    else:
        log("ZeRO-3 memory measurement (zero_memory.py's code)", flush=True)
        zero = zero_measure(rank)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, {"rss": rss, "alloc": alloc, "allocs": allocs, "runs": runs, "saved": saved})
    if rank == 0:
        result = {"ranks": everyone, "plans": plans, "zero": zero, "machine": machine, "world": world,
                  "tokens": tokens, "latent": list(latent), "batch": BATCH, "repeats": args.repeats,
                  "text_tokens": C.MAX_SEQUENCE_LENGTH, "smoke": C.SMOKE,
                  "trained_weights": sum(p.numel() for p in adapters[1].trainable_parameters()),
                  "command": " ".join(C.command_line()).replace(" --worker", "")}
        report(result, args)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- the report
def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """Per variant: the fuller rank's memory numbers and the medians over runs."""
    out: dict[str, Any] = {}
    for n, _, ckpt in VARIANTS:
        ranks = res["ranks"]
        sv = max((r["saved"][n] for r in ranks), key=lambda s: s["kept"] + s.get("rerun", 0))
        total = sv["kept"] + sv.get("rerun", 0)
        share = [statistics.median(x["comm_fn_s"] / x["wall_s"] for x in r["runs"][n]) for r in ranks]
        coll = [statistics.median(x["comm_coll_s"] / x["wall_s"] for x in r["runs"][n]) for r in ranks]
        out[n] = {"saved": sv, "saved_total": total, "rss": max(r["rss"][n] for r in ranks),
                  "alloc": max(r["alloc"][n] for r in ranks),
                  "alloc_range": (min(min(r["allocs"][n]) for r in ranks), max(max(r["allocs"][n]) for r in ranks)),
                  "median_s": statistics.median(x["slowest_s"] for x in ranks[0]["runs"][n]), "runs_s": [x["slowest_s"] for x in ranks[0]["runs"][n]],
                  "comm_share": share, "coll_share": coll,
                  "comm_s": [statistics.median(x["comm_fn_s"] for x in r["runs"][n]) for r in ranks],
                  "calls": ranks[0]["runs"][n][0]["comm_calls"]}
    return out


def report(res: dict[str, Any], args: argparse.Namespace) -> None:
    s = summarize(res)
    m = res["machine"]
    p1, p2 = res["plans"]["sp1"], res["plans"]["sp2"]
    sv1, sv2 = s["sp1"]["saved"], s["sp2"]["saved"]
    blk1, blk2 = statistics.median(sv1["blocks"]), statistics.median(sv2["blocks"])
    out1, out2 = sv1["outside"], sv2["outside"]
    NO, CK = "activations, update, no checkpointing", "activations, update, checkpointing"
    r_saved = s["sp2"]["saved_total"] / s["sp1"]["saved_total"]
    r_saved_ck = s["sp2_ckpt"]["saved_total"] / s["sp1_ckpt"]["saved_total"]
    r_rss = s["sp2"]["rss"] / s["sp1"]["rss"]
    r_rss_ck = s["sp2_ckpt"]["rss"] / s["sp1_ckpt"]["rss"]

    def alloc_cell(v: dict[str, Any]) -> str:
        lo, hi = v["alloc_range"]
        return f"{_mb(v['alloc'])} ({_mb(lo)}-{_mb(hi)})"

    def verdict(r: float) -> str:
        return f"<= {TARGET:.1f}x {'PASS' if r <= TARGET else 'FAIL'}"

    lines = [
        "## Sequence parallelism (Ulysses) at 2 ranks against one process",
        "",
        f"`{res['command']}`: one forward + backward of `adapter.velocity` through the benchmarks' Wan "
        f"({res['trained_weights'] / 1e6:.2f}M weights, full fine-tuning, 4 blocks of 4 heads x 32), one video "
        f"(latent {tuple(res['latent'])}, {res['tokens']} tokens, {res['text_tokens']} text tokens), float32, "
        f"loss `v.square().mean()`. Equal total tokens: at SP=2 the two ranks share the one video (each holds "
        f"{res['tokens'] // 2} tokens from the first block to the output projection); SP=1 is each of the same "
        f"two processes computing the whole video alone. CPU, gloo, 2 processes x 1 thread, torch {m['torch']}, "
        f"diffusers {m['diffusers']}; {m['cpu']}, {m['logical_cpus']} logical CPUs, load average at start "
        f"{m['loadavg_at_start'][0]:.2f} (another job was running).",
        "",
        "Per-rank activation memory (the fuller rank). *Saved for backward*: tensors autograd keeps during the "
        "forward (`saved_tensors_hooks`, each storage once, weights excluded); with checkpointing, what the "
        "checkpoint keeps (the blocks' inputs and what lies outside the blocks) plus the largest block's "
        "saved set, which the backward re-runs one block at a time. *Peak allocated*: the peak of live tensor "
        "bytes during the call above those live before it, from the CPU allocator's events (`torch.profiler`, "
        "`profile_memory`; the CPU analogue of `torch.cuda.max_memory_allocated`; median of 3 calls): it also holds the gradients "
        "(4.68 MiB, whole on every rank) and the backward's working set. *Peak RSS growth*: the process's "
        "resident-set high-water mark during the call minus its resident set before (after gc and "
        "`malloc_trim`, variant warmed up), which adds glibc's heap behaviour to the allocator's peak. "
        "The range in brackets is over both ranks' calls: at SP=2 the allocator peak moves by several MiB "
        "from call to call (all its allocations and frees are on the calling thread, and not with gc disabled "
        "either; the cause is not pinned down here), at SP=1 it barely moves:",
        "",
        "| per rank (MiB) | saved for backward | SP=2 / SP=1 | peak allocated | SP=2 / SP=1 | peak RSS growth "
        "| SP=2 / SP=1 | target (saved) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, label in [("sp1", "SP=1, no checkpointing"), ("sp2", "SP=2, no checkpointing"),
                     ("sp1_ckpt", "SP=1, checkpointing"), ("sp2_ckpt", "SP=2, checkpointing")]:
        v, base = s[n], s[n.replace("sp2", "sp1")]
        saved = _mb(v["saved_total"])
        if n.endswith("ckpt"):
            saved += f" ({_mb(v['saved']['kept'])} kept + {_mb(v['saved']['rerun'])} re-run)"
        if n.startswith("sp2"):
            r = v["saved_total"] / base["saved_total"]
            cells = [f"**{r:.3f}x**", alloc_cell(v), f"{v['alloc'] / base['alloc']:.3f}x", _mb(v["rss"]),
                     f"{v['rss'] / base['rss']:.3f}x", verdict(r)]
        else:
            cells = ["", alloc_cell(v), "", _mb(v["rss"]), "", ""]
        lines.append(f"| {label} | {saved} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Step time and SP communication: median of {res['repeats']} interleaved runs after a warm-up, each run's "
        "time the slowest rank's. *Comm share*: time inside `parallel/sequence.py`'s `_all_to_all` / `_all_gather` "
        "(wrapped with timers by the benchmark; the gloo collective alone in brackets) over the rank's "
        "forward + backward wall time, median over runs, rank 0 / rank 1:",
        "",
        "| forward + backward | median s | runs s | vs SP=1 | SP calls | comm s (r0 / r1) | comm share (r0 / r1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, label, base in [("sp1", "SP=1, no checkpointing", "sp1"), ("sp2", "SP=2, no checkpointing", "sp1"),
                           ("sp1_ckpt", "SP=1, checkpointing", "sp1_ckpt"),
                           ("sp2_ckpt", "SP=2, checkpointing", "sp1_ckpt")]:
        v = s[n]
        runs = ", ".join(f"{t:.2f}" for t in v["runs_s"])
        if n.startswith("sp2"):
            comm = " / ".join(f"{c:.2f}" for c in v["comm_s"])
            share = " / ".join(f"{100 * a:.0f}% ({100 * b:.0f}%)" for a, b in zip(v["comm_share"], v["coll_share"]))
            calls = str(v["calls"])
        else:
            comm, share, calls = "-", "-", "0"
        lines.append(f"| {label} | {v['median_s']:.2f} | {runs} | {v['median_s'] / s[base]['median_s']:.2f}x | "
                     f"{calls} | {comm} | {share} |")
    lines += [
        "",
        "SP calls per step: 4 all-to-alls per block forward (q, k, v in, the output back) and the final all-gather, "
        "their inverses in backward, and with checkpointing the forward's again when each block is re-run. On this "
        "machine two single-thread ranks share 2 cores with another job, so a collective's time includes waiting "
        "for the other rank to arrive (load imbalance), not only the copy; GPU timings (NCCL) are not measured here.",
        "",
        f"Where SP=2 keeps more than half: per block {_mb(blk2)} MiB against half of SP=1's {_mb(blk1)} "
        f"({_mb(blk2 - blk1 / 2)} MiB more, {(blk2 - blk1 / 2) / (res['tokens'] // 2):.0f} bytes per local token, "
        "one float32 row of D = 128: the input of attention's output projection is the inverse all-to-all's "
        "result, a new tensor, where without SP it is a view of the attention output that attention itself "
        f"saves); outside the blocks {_mb(out2)} MiB against half of {_mb(out1)} (the patch embedding's input, "
        "the gathered output the loss reads and the conditioning embeddings are whole on every rank).",
        "",
        "### The memory planner beside the measurements",
        "",
        "`flowdppo_video.commands.planner.plan_memory` for the same model and tokens (full fine-tuning, "
        f"`optim.minibatch_size={res['batch']}`, no CFG so one forward per video), against the saved-for-backward "
        "bytes above. The planner's activation model is a fused attention's (q, k, v, out, log-sum-exp, no N^2 "
        "term); here torch's CPU SDPA runs its flash kernel, which saves the same:",
        "",
        "| per rank (MiB) | planner | measured | planner / measured |",
        "|---|---|---|---|",
    ]
    for label, pred, meas in [("activations, SP=1, no checkpointing", p1[NO], s["sp1"]["saved_total"]),
                              ("activations, SP=2, no checkpointing", p2[NO], s["sp2"]["saved_total"]),
                              ("activations, SP=1, checkpointing", p1[CK], s["sp1_ckpt"]["saved_total"]),
                              ("activations, SP=2, checkpointing", p2[CK], s["sp2_ckpt"]["saved_total"])]:
        lines.append(f"| {label} | {_mb(pred)} | {_mb(meas)} | {pred / meas:.3f} |")
    lines.append(f"| SP=2 / SP=1, no checkpointing | {p2[NO] / p1[NO]:.3f}x | {r_saved:.3f}x | |")
    lines.append(f"| SP=2 / SP=1, checkpointing | {p2[CK] / p1[CK]:.3f}x | {r_saved_ck:.3f}x | |")
    z = res["zero"]
    pz, p0 = res["plans"]["zero3"], p1
    m3 = max(z["memory_zero3_per_rank"], key=lambda q: q["total"])
    m0 = z["memory_stage0"]
    lines += [
        "",
        f"ZeRO-3 at 2 ranks (every weight sharded) and unsharded AdamW: the planner (`parallel.zero_stage=3`, world 2; "
        f"stage 0, world 1) beside `tools/bench/zero_memory.py`'s measurement after one update step "
        f"({z['source']}):",
        "",
        "| per rank (MiB) | planner | measured | planner / measured |",
        "|---|---|---|---|",
    ]
    for label, key, mkey in [("parameters", "trained: transformer", "parameters"), ("gradients", "gradients", "gradients"),
                             ("optimizer state", "optimizer state", "optimizer_state")]:
        for tag, plan, meas in [("ZeRO-3", pz, m3), ("unsharded", p0, m0)]:
            lines.append(f"| {tag}: {label} | {_mb(plan[key])} | {_mb(meas[mkey])} | {plan[key] / meas[mkey]:.3f} |")
    tz = pz["trained: transformer"] + pz["gradients"] + pz["optimizer state"]
    t0 = p0["trained: transformer"] + p0["gradients"] + p0["optimizer state"]
    lines += [f"| ZeRO-3: total | {_mb(tz)} | {_mb(m3['total'])} | {tz / m3['total']:.3f} |",
              f"| unsharded: total | {_mb(t0)} | {_mb(m0['total'])} | {t0 / m0['total']:.3f} |", ""]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    if args.section is not None:
        B.write_section(args.section, SECTION, text)
        print(f"wrote section {SECTION!r} of {args.section}")
    B.write_json(args.out, {**res, "summary": s, "ratios": {"saved": r_saved, "saved_ckpt": r_saved_ck,
                                                           "rss": r_rss, "rss_ckpt": r_rss_ck},
                            "target": TARGET, "pass": max(r_saved, r_saved_ck) <= TARGET})


def main(argv: list[str] | None = None) -> int:
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--zero-json", type=Path, default=None,
                       help="read the ZeRO-3 measurement from zero_memory.py's --out JSON instead of measuring it")

    def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.zero_json is not None and not args.zero_json.is_file():
            p.error(f"--zero-json {args.zero_json}: no such file")

    return C.two_process_main(__doc__, __file__, worker, report, argv, repeats=5, add_arguments=add_arguments,
                              check=check)


if __name__ == "__main__":
    sys.exit(main())
