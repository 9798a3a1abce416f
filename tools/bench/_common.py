"""Shared pieces of the benchmarks in ``tools/bench``: the model size, timing, memory, tables.

Not a library module: the scripts next to this file import it by path (``python tools/bench/x.py``
puts this folder first on ``sys.path``).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle worker threads sleep instead of spinning. On a shared machine
# where another process holds a core, spinning threads make every parallel region wait for a
# descheduled peer (measured here: 2.7 s instead of 0.86 s per forward). Override by setting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import ctypes
import gc
import json
import math
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run from anywhere, with or without `pip install -e .`
    sys.path.insert(0, str(REPO))

THREADS = 2

# A Wan of a few thousand tokens: a 33-frame 256x256 video -> latent (16, 9, 32, 32) -> patch
# (1, 2, 2) -> 9 * 16 * 16 = 2304 tokens; 4 blocks of 4 heads x 32 dims. Real diffusers classes,
# random weights (the timings do not depend on the values).
WAN_INIT: dict[str, dict[str, Any]] = {
    "transformer": {"patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 32,
                    "in_channels": 16, "out_channels": 16, "text_dim": 64, "freq_dim": 64,
                    "ffn_dim": 512, "num_layers": 4, "rope_max_seq_len": 256},
    "vae": {"base_dim": 8, "z_dim": 16},
    "text_encoder": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
}
VIDEO = {"num_frames": 33, "height": 256, "width": 256}
MAX_SEQUENCE_LENGTH = 32
PROMPT = "a red ball rolls to the left"
GROUP_SIZE = 2                 # B = 1 prompt x 2 samples; with CFG every forward sees 2B = 4 rows
NUM_STEPS = 8
SDE_STEPS = 2
GUIDANCE = 4.5
SHIFT = 3.0


# --smoke: the same code paths at a size that runs in seconds, so CI notices when a benchmark no
# longer runs against the current code (tests/test_bench_smoke.py). Its numbers mean nothing.
SMOKE = False
SMOKE_VIDEO = {"num_frames": 5, "height": 32, "width": 32}   # latent (16, 2, 4, 4) -> 8 tokens
SMOKE_REPEATS = 2                 # timed repeats at smoke size (1 for the two-process benchmarks)


def use_smoke_size() -> None:
    """Shrink the shared video and sampler to smoke size (the model stays :data:`WAN_INIT`).

    Set before anything is built: the scripts read :data:`VIDEO`, :data:`NUM_STEPS` and
    :data:`SDE_STEPS` when they build, and pass ``--smoke`` on to their fresh processes.
    """
    global SMOKE, NUM_STEPS
    SMOKE = True
    VIDEO.update(SMOKE_VIDEO)
    NUM_STEPS = 4          # 2 of them SDE steps, as at full size


def smoke_args() -> list[str]:
    """``["--smoke"]`` in a smoke run: the flag a child process of the same script needs."""
    return ["--smoke"] if SMOKE else []


def latent_and_tokens(adapter: Any) -> tuple[list[int], int]:
    """The latent ``(C, F, H, W)`` of :data:`VIDEO` for ``adapter`` and its transformer token count."""
    latent = list(adapter.latent_shape(VIDEO["num_frames"], VIDEO["height"], VIDEO["width"]))
    pt, ph, pw = adapter.patch_size
    return latent, (latent[1] // pt) * (latent[2] // ph) * (latent[3] // pw)


def setup_torch() -> None:
    torch.set_num_threads(THREADS)


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> dict[str, int]:
    """Make glibc malloc keep freed memory: no heap trimming, blocks up to 32 MiB from the heap.

    A diagnostic (``--malloc-tuned``): with glibc's defaults freed activation blocks go back to
    the OS and the next allocation of the same size touches fresh pages (minor page faults).
    Call before torch allocates much. Same effect as ``MALLOC_TRIM_THRESHOLD_`` /
    ``MALLOC_MMAP_THRESHOLD_`` in the environment.
    """
    libc = ctypes.CDLL("libc.so.6")
    settings = {"M_TRIM_THRESHOLD": 2**31 - 1, "M_MMAP_THRESHOLD": 32 * 2**20}
    ok1 = libc.mallopt(_M_TRIM_THRESHOLD, settings["M_TRIM_THRESHOLD"])
    ok2 = libc.mallopt(_M_MMAP_THRESHOLD, settings["M_MMAP_THRESHOLD"])
    if not (ok1 and ok2):
        raise RuntimeError("mallopt failed")
    return settings


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- timing
def _machine_busy_s() -> float:
    """CPU seconds all processes on the machine have spent busy (``/proc/stat``), or NaN."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return float("nan")
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def time_interleaved(variants: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
                     warmup: int = 1, log: Callable[..., None] = print
                     ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall time of each variant, ``repeats`` times, variants interleaved within every repeat.

    Every variant first runs ``warmup`` times untimed. The order inside a repeat rotates
    (A B, B A, A B, ...) so a slow drift of the machine's load hits both sides alike.

    Returns ``(times, extra)``: seconds per run, and per variant and run ``others_cpu_share``, the
    share of the machine's CPUs that *other* processes kept busy meanwhile (``/proc/stat`` busy
    time minus this process's CPU time, over wall time x CPUs; 0 = the machine was ours alone),
    and ``minor_faults``, this process's minor page faults (fresh pages touched) during the run.
    """
    names = list(variants)
    ncpu = os.cpu_count() or 1
    for _ in range(warmup):
        for n in names:
            variants[n]()
            sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    extra: dict[str, dict[str, list[float]]] = {n: {"others_cpu_share": [], "minor_faults": []} for n in names}
    for r in range(repeats):
        # Rotate the order (A B, B A, ...; A B C, B C A, C A B, ...): each variant takes each place in turn.
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            gc.collect()
            sync(device)
            busy0, own0 = _machine_busy_s(), _own_cpu_s()
            flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            variants[n]()
            sync(device)
            wall = time.perf_counter() - t0
            other = (_machine_busy_s() - busy0) - (_own_cpu_s() - own0)
            times[n].append(wall)
            extra[n]["minor_faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0)
            extra[n]["others_cpu_share"].append(max(0.0, other) / (wall * ncpu))
        log(f"  repeat {r + 1}/{repeats}: " + ", ".join(
            f"{n} {times[n][-1]:.3f}s (others {100 * extra[n]['others_cpu_share'][-1]:.0f}% CPU, "
            f"{extra[n]['minor_faults'][-1]} faults)" for n in names), flush=True)
    return times, extra


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def median_interval(xs: list[float], confidence: float = 0.9) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``xs``: ``(low, high, coverage)``.

    Order statistics ``x_(k) .. x_(n+1-k)`` with the largest ``k`` whose coverage (the chance that
    the true median lies between them, ``1 - 2 P(Binomial(n, 1/2) < k)``) is still at least
    ``confidence``; with too few samples for that, the whole range and its coverage (5 samples:
    min..max, 93.8%; 2 samples: 50%).
    """
    x, n = sorted(xs), len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0.0

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return float(x[k - 1]), float(x[n - k]), coverage(k)


# ---------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else -1


def peak_memory_of(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of one call of ``fn``.

    CUDA: ``torch.cuda.max_memory_allocated`` over the call, minus what was allocated before.
    CPU: the process's resident-set high-water mark (``VmHWM``, reset through
    ``/proc/self/clear_refs`` just before the call) minus the resident set before the call
    (after ``gc`` and ``malloc_trim``). Meant for a fresh process, so both sides of a
    comparison start from the same state.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"method": "torch.cuda.max_memory_allocated", "peak_mb": peak / 2**20,
                "peak_extra_mb": (peak - before) / 2**20}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    rss_before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")     # reset VmHWM (Linux >= 4.0)
        method = "VmHWM (reset before the call) - VmRSS before, fresh process"
    except OSError:
        method = "ru_maxrss-like VmHWM (could not reset), fresh process"
    fn()
    hwm = _status_kb("VmHWM")
    return {"method": method, "peak_mb": hwm / 1024, "peak_extra_mb": (hwm - rss_before) / 1024,
            "rss_before_mb": rss_before / 1024}


def time_and_probe(script: Path, variants: dict[str, Callable[[], Any]], repeats: int, dev: torch.device,
                   device: str, traj: Any, workdir: Path, memory: bool
                   ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Time ``variants`` interleaved, then (with ``memory``) each variant's peak memory once in a
    fresh process of ``script`` replaying the same trajectory (saved under ``workdir``)."""
    print(f" timing (1 warm-up each, then {repeats} interleaved repeats)", flush=True)
    timed = time_interleaved(variants, repeats, dev)
    traj_file = workdir / "traj.pt"
    torch.save(traj, traj_file)
    mem: dict[str, dict[str, Any]] = {}
    if memory:
        print(" peak memory, each variant once in a fresh process", flush=True)
        for n in variants:
            mem[n] = probe_in_subprocess(script, n, ["--device", device, "--trajectory", str(traj_file)])
    return timed, mem


def probe_in_subprocess(script: Path, variant: str, extra: list[str] | None = None,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``script --memory-probe VARIANT`` in a fresh interpreter; it prints one JSON line."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "probe.json"
        cmd = [sys.executable, str(script), "--memory-probe", variant, "--out", str(out), *(extra or []),
               *smoke_args()]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            log(f"  memory probe {variant} failed (rc {res.returncode}):\n{res.stderr[-2000:]}")
            return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
        data = json.loads(out.read_text())
        log(f"  memory {variant}: peak {data['peak_mb']:.0f} MB, +{data['peak_extra_mb']:.0f} MB during the call "
            f"({time.perf_counter() - t0:.0f}s)")
        return data


# ---------------------------------------------------------------- machine and output
def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    info = {"cpu": cpu, "logical_cpus": os.cpu_count(),
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(), "device": str(device),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_at_start": list(os.getloadavg())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def summarize(result: dict[str, Any]) -> None:
    """Print a result dict (see :func:`make_result`) as tables."""
    print(f"\n== {result['title']} ({result['repeats']} repeats, device {result['machine']['device']})")
    rows = []
    for name, v in result["variants"].items():
        mem = v.get("memory") or {}
        share = v.get("others_cpu_share_median")
        flt = v.get("minor_faults_median")
        rows.append([name, f"{v['median_s']:.3f}", f"{min(v['times_s']):.3f}", f"{max(v['times_s']):.3f}",
                     f"{100 * share:.0f}%" if share is not None else "-", f"{flt:.0f}" if flt is not None else "-",
                     f"{mem['peak_mb']:.0f}" if "peak_mb" in mem else "-",
                     f"{mem['peak_extra_mb']:.0f}" if "peak_extra_mb" in mem else "-"])
    print_table(rows, ["variant", "median s", "min s", "max s", "others' CPU", "page faults", "peak MB",
                       "+MB in call"])
    print()
    rows = [[c["label"], f"{c['ratio']:.3f}x", f"{c['paired_ratio_median']:.3f}x",
             f"{c['paired_interval'][0]:.3f}x-{c['paired_interval'][1]:.3f}x ({100 * c['paired_interval_coverage']:.0f}%)",
             f"{c['ratio_of_minima']:.3f}x", f"<= {c['target']:.2f}x", c["verdict_on"], verdict_text(c)]
            for c in result["comparisons"]]
    print_table(rows, ["comparison (ours / baseline)", "ratio of medians", "paired median", "paired interval",
                       "ratio of min", "target", "verdict on", ""])


def verdict_text(c: dict[str, Any]) -> str:
    """PASS / FAIL of a comparison; for a paired verdict, whether its interval settles it."""
    out = "PASS" if c["pass"] else "FAIL"
    if c.get("verdict_on") == "paired_ratio_median":
        lo, hi = c["paired_interval"]
        if lo <= c["target"] < hi:
            out += " (interval spans the target)"
    return out


def make_result(name: str, title: str, argv: list[str], repeats: int, machine: dict[str, Any],
                timed: tuple[dict[str, list[float]], dict[str, list[float]]], memory: dict[str, dict[str, Any]],
                pairs: list[tuple[str, str, str, float]], config: dict[str, Any], note: str,
                verdict_on: str = "ratio") -> dict[str, Any]:
    """``timed``: :func:`time_interleaved`'s ``(times, extra)``; ``pairs``: ``(label, ours, baseline, target)``.

    ``verdict_on="ratio"``: the verdict uses the ratio of the medians; the median of the per-repeat
    ratios (each ours/baseline pair ran back to back) and the ratio of the minima are kept as
    checks against load noise. ``verdict_on="paired_ratio_median"``: the verdict uses the median
    of the per-repeat ratios, reported with :func:`median_interval`'s interval (a slow drift of
    the machine's load moves both sides of a pair alike, so the paired ratio is the steadier one).
    """
    if verdict_on not in ("ratio", "paired_ratio_median"):
        raise ValueError(f"verdict_on must be 'ratio' or 'paired_ratio_median', got {verdict_on!r}")
    times, extra = timed
    foreign = {n: e["others_cpu_share"] for n, e in extra.items()}
    faults = {n: e["minor_faults"] for n, e in extra.items()}
    variants = {n: {"times_s": ts, "median_s": median(ts), "min_s": min(ts), "memory": memory.get(n),
                    "others_cpu_share": foreign.get(n, []),
                    "others_cpu_share_median": median(foreign[n]) if foreign.get(n) else None,
                    "minor_faults": faults.get(n, []),
                    "minor_faults_median": median(faults[n]) if faults.get(n) else None}
                for n, ts in times.items()}
    comps = []
    for label, ours, base, target in pairs:
        ratio = variants[ours]["median_s"] / variants[base]["median_s"]
        per_pair = [a / b for a, b in zip(times[ours], times[base])]
        paired = median(per_pair)
        lo, hi, cover = median_interval(per_pair)
        verdict = ratio if verdict_on == "ratio" else paired
        comps.append({"label": label, "ours": ours, "baseline": base, "ratio": ratio, "target": target,
                      "verdict_on": verdict_on, "verdict_ratio": verdict, "pass": verdict <= target,
                      "paired_ratio_median": paired, "paired_ratios": per_pair, "paired_interval": [lo, hi],
                      "paired_interval_coverage": cover,
                      "ratio_of_minima": variants[ours]["min_s"] / variants[base]["min_s"]})
    return {"name": name, "title": title, "command": " ".join(argv), "repeats": repeats, "machine": machine,
            "variants": variants, "comparisons": comps, "config": config, "note": note}


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (after one warm-up)")
    p.add_argument("--out", type=Path, default=None, help="write the result dict as JSON here")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (fresh processes)")
    p.add_argument("--smoke", action="store_true",
                   help=f"smoke size: a {SMOKE_VIDEO['num_frames']}-frame {SMOKE_VIDEO['height']}x"
                        f"{SMOKE_VIDEO['width']} video, {SMOKE_REPEATS} repeats, seconds in all; checks "
                        "that the benchmark runs, its numbers mean nothing")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)   # internal: one variant, one call
    return p


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))


def git_commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it ("unknown" without git):
    what every benchmark result records as the code it measured."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def command_line() -> list[str]:
    """How this script was started, relative to the repository root where possible."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = str(script)
    return [".venv/bin/python", script_s, *sys.argv[1:]]


# ---------------------------------------------------------------- shared setups
def sampler_dict() -> dict[str, Any]:
    return {"kind": "flow_sde", "eta": 0.7, "num_steps": NUM_STEPS, "shift": SHIFT, "sde_steps": SDE_STEPS,
            "window": [0.0, 0.5], "guidance_scale": GUIDANCE}


def trainer_config(output_dir: str, device: torch.device, objective: str) -> dict[str, Any]:
    """A config dict (``config_from_dict``) for the few-thousand-token Wan, one minibatch per update."""
    return {
        "run": {"output_dir": output_dir, "seed": 0, "progress": False, "tensorboard": False,
                "device": str(device)},
        "model": {"family": "wan", "init": WAN_INIT, "max_sequence_length": MAX_SEQUENCE_LENGTH,
                  "lora": {"rank": 0}},
        "data": {"prompts": [PROMPT], "prompts_per_iteration": 1, "group_size": GROUP_SIZE,
                 "negative_prompt": ""},
        "video": {**VIDEO, "fps": 8},
        # (b) and (c) compare against a bare step that runs [cond; uncond] as one call: same here.
        "sampler": {**sampler_dict(), "cfg_batch": "joint"},
        # Token-wise, as (b) and (c) were measured (it was the default then).
        "objective": {"kind": objective, "granularity": "token", "delta": 0.01, "clip_range": 1e-3},
        # inner_epochs 1 and minibatch_size = B: Trainer.update is exactly one minibatch, one optimizer step.
        "optim": {"lr": 1e-5, "inner_epochs": 1, "minibatch_size": GROUP_SIZE, "grad_clip": 1.0},
        "rewards": {"frame_change": 1.0},
    }


def build_trainer(output_dir: str, device: torch.device, objective: str = "flow_dppo") -> Any:
    from flowdppo_video.config import config_from_dict
    from flowdppo_video.trainer import Trainer

    return Trainer(config_from_dict(trainer_config(output_dir, device, objective)))


def trajectory_for(trainer: Any, seed: int = 0) -> Any:
    """One rollout (no decoding) with the trainer's model and sampler."""
    from flowdppo_video.rollout import rollout

    cfg = trainer.cfg
    return rollout(trainer.adapter, [PROMPT], cfg.data.group_size, trainer.latent_shape, cfg.sampler,
                   torch.Generator().manual_seed(seed), negative_prompt=cfg.data.negative_prompt,
                   progress=False, decode=False)


def advantages_for(batch: int) -> torch.Tensor:
    """Alternating +1 / -1 advantages (a group with both signs)."""
    return torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(batch)])


def profile_ops(variants: dict[str, Callable[[], Any]], names: list[str], rounds: int = 2,
                top: int = 10) -> dict[str, Any]:
    """Where the time of two variants differs: ``torch.profiler`` self CPU time per op.

    Runs the two variants A B B A ... (``rounds`` each) under the profiler, sums each op's self
    CPU time (the calling thread's time in the op, intra-op threads included in its wall) and
    returns the ``top`` ops by absolute difference, in ms per run.
    """
    from torch.profiler import ProfilerActivity, profile

    a, b = names
    acc: dict[str, dict[str, list[float]]] = {a: {}, b: {}}
    walls: dict[str, float] = {a: 0.0, b: 0.0}
    order = [a, b, b, a] * ((rounds + 1) // 2)
    counts = {a: 0, b: 0}
    for n in order:
        if counts[n] >= rounds:
            continue
        counts[n] += 1
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            variants[n]()
            walls[n] += time.perf_counter() - t0
        for e in prof.key_averages():
            slot = acc[n].setdefault(e.key, [0.0, 0.0])
            slot[0] += e.self_cpu_time_total / 1e3
            slot[1] += e.count
    keys = set(acc[a]) | set(acc[b])
    rows = []
    for k in keys:
        ta, ca = (x / rounds for x in acc[a].get(k, [0.0, 0.0]))
        tb, cb = (x / rounds for x in acc[b].get(k, [0.0, 0.0]))
        rows.append({"op": k, f"{a}_ms": ta, f"{b}_ms": tb, "diff_ms": ta - tb, f"{a}_calls": ca, f"{b}_calls": cb})
    rows.sort(key=lambda r: -abs(r["diff_ms"]))
    total = {n: sum(v[0] for v in acc[n].values()) / rounds for n in names}
    return {"variants": names, "rounds": rounds, "wall_s": {n: walls[n] / rounds for n in names},
            "self_cpu_total_ms": total, "top": rows[:top]}


# ---------------------------------------------------------------- the update benchmarks' entry point
VariantsFor = Callable[[Any, Any, torch.Tensor], dict[str, Callable[[], Any]]]


def trajectory_probe(variants_for: VariantsFor, variant: str, device: str, out: Path | None,
                     traj_file: Path) -> None:
    """Peak memory of one variant, in this (fresh) process, on a saved trajectory."""
    setup_torch()
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(d, dev)
        traj = torch.load(traj_file, weights_only=False)
        variants = variants_for(trainer, traj, advantages_for(traj.batch_size))
        write_json(out, peak_memory_of(variants[variant], dev))


def trajectory_main(doc: str, variants_for: VariantsFor, run: Callable[..., dict[str, Any]],
                    argv: list[str] | None) -> dict[str, Any] | None:
    """Command line of (b) and (c): a timed run, or (internal) one memory probe."""
    p = base_parser(doc.splitlines()[0])
    p.add_argument("--trajectory", type=Path, default=None, help=argparse.SUPPRESS)
    a = parse_args(p, argv)
    if a.memory_probe:
        trajectory_probe(variants_for, a.memory_probe, a.device, a.out, a.trajectory)
        return None
    return run(a.repeats, a.out, a.device, memory=not a.no_memory)


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse a benchmark's arguments; ``--smoke`` shrinks the sizes and caps the repeats."""
    a = p.parse_args(argv)
    if a.smoke:
        use_smoke_size()
        a.repeats = min(a.repeats, SMOKE_REPEATS)
    return a


def launch_two_ranks(script: str | Path, argv: list[str]) -> int:
    """Re-run ``script --worker ARGV`` under torchrun with 2 CPU processes of one thread each."""
    from flowdppo_video.parallel.groups import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(Path(script).resolve()), "--worker", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def build_bench_wan(seed: int = 0) -> Any:
    """The benchmarks' Wan (:data:`WAN_INIT`) on the CPU, set up for full fine-tuning."""
    from flowdppo_video.models.wan import WanAdapter

    a = WanAdapter.from_config(WAN_INIT, device=torch.device("cpu"), max_sequence_length=MAX_SEQUENCE_LENGTH,
                               seed=seed)
    a.enable_full_finetune(keep_reference=False)
    return a
