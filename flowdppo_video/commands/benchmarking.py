"""Measuring the code: what the benchmark scripts in ``tools/bench`` share that is not theirs alone.

Timing (:func:`time_interleaved`, :func:`median`, :func:`median_interval`), peak memory
(:func:`peak_memory_of`, :func:`probe_in_subprocess`), the machine (:func:`machine_info`), a
result and its verdicts (:func:`make_result`, :func:`summarize`, :func:`verdict_text`), where a result
is written (:func:`write_json`, the sections of ``docs/benchmarks.md``: :func:`write_section`; the
data and figures folders beside a document: :data:`DATA`, :data:`FIGURES`), what code it measured
(:func:`git_commit`, :func:`command_line`), two-rank launches (:func:`launch_two_ranks`), and the
demo recipe trained at one seed through the CLI (:func:`run_seed`, :func:`summarise_seed_run`), which
the demo-across-seeds and clean-RL benchmarks share.

The scripts set ``OMP_WAIT_POLICY`` before anything imports torch; this module does not touch the
environment.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from flowdppo_video.models import family
from flowdppo_video.parallel.groups import free_port
from flowdppo_video.reporting.winrates import mean_ci_text
from flowdppo_video.runs.config import load_yaml, merge_trees
from flowdppo_video.training.metrics import read_metrics

# Beside a document (docs/ or a --docs folder): its JSON data and its figures, each in its own folder.
DATA = "data"
FIGURES = "figures"
# The frontier benchmark's training (docs/trust_regions.md): full fine-tuning on every step at lr 1e-4 and
# the plain rollout (independent noise, the whole schedule), as the committed fronts were measured before
# the default recipe routed low-noise steps to the base model, trained LoRA and shared noise. The grid
# (tools/bench/algorithms.py) runs it and calibrate_trust_region.py calibrates it.
FRONTIER_TRAINING = ["optim.lr=1e-4", "model.base_below=null", "model.lora.rank=0", "sampler.shared_noise=false",
                     "sampler.tail_steps=null"]


def data_file(doc: str | Path, suffix: str = ".json") -> Path:
    """Where the data of the document ``doc`` (``DIR/NAME`` or ``DIR/NAME.md``) goes: ``DIR/data/NAME.json``."""
    doc = Path(doc)
    return doc.parent / DATA / (doc.with_suffix("").name + suffix)


def figure_file(doc: str | Path, suffix: str = ".png") -> Path:
    """Where the figure of the document ``doc`` goes: ``DIR/figures/NAME.png``."""
    doc = Path(doc)
    return doc.parent / FIGURES / (doc.with_suffix("").name + suffix)


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


def probe_in_subprocess(script: Path, variant: str, extra: list[str] | None = None,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``script --memory-probe VARIANT --out FILE EXTRA`` in a fresh interpreter; it writes one
    JSON object (:func:`peak_memory_of`'s) to ``FILE``."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "probe.json"
        cmd = [sys.executable, str(script), "--memory-probe", variant, "--out", str(out), *(extra or [])]
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


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    """``data`` as indented JSON at ``path`` (its folder made); nothing when ``path`` is None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))


def git_commit(where: str | Path | None = None) -> str:
    """The commit of the checkout that holds ``where`` (default: the current directory), ``+dirty``
    when tracked files differ from it ("unknown" without git): what every benchmark result records
    as the code it measured. A script passes its own folder."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def command_line(repo: Path) -> list[str]:
    """How this script was started, relative to the repository root ``repo`` where possible."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(repo))
    except ValueError:
        script_s = str(script)
    return [".venv/bin/python", script_s, *sys.argv[1:]]


def profile_ops(variants: dict[str, Callable[[], Any]], names: list[str], rounds: int = 2,
                top: int = 10) -> dict[str, Any]:
    """Where the time of two variants differs: ``torch.profiler`` self CPU time per op.

    Runs the two variants A B B A ... (``rounds`` each) under the profiler, sums each op's self
    CPU time (the calling thread's time in the op, intra-op threads included in its wall) and
    returns the ``top`` ops by absolute difference, in ms per run.
    """
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


def launch_two_ranks(script: str | Path, argv: list[str], cwd: str | Path | None = None) -> int:
    """Re-run ``script --worker ARGV`` under torchrun with 2 CPU processes of one thread each (in ``cwd``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(Path(script).resolve()), "--worker", *argv]
    return subprocess.run(cmd, cwd=cwd, env=env).returncode


# ---------------------------------------------------------------- sections of a document
def _markers(name: str) -> tuple[str, str]:
    return f"<!-- section: {name} -->", f"<!-- /section: {name} -->"


_SECTION = re.compile(r"^<!-- section: (?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- /section: (?P=name) -->\n?",
                      re.M | re.S)


def sections(text: str) -> dict[str, str]:
    """The sections of a document, in order: ``name -> text`` between ``<!-- section: NAME -->`` and
    ``<!-- /section: NAME -->`` (each marker on a line of its own, the text without them)."""
    return {m["name"]: m["body"] for m in _SECTION.finditer(text)}


def section_block(name: str, text: str) -> str:
    """``text`` between the section's two markers, as it stands in the document."""
    start, end = _markers(name)
    return f"{start}\n{text.strip()}\n{end}\n"


def outside_sections(text: str) -> tuple[str, str]:
    """``(head, rest)``: the document before its first section, and whatever stands between and after
    its sections (blank lines only in a document that a rewrite keeps whole)."""
    first = _SECTION.search(text)
    if first is None:
        return text, ""
    return text[:first.start()], _SECTION.sub("", text[first.start():])


def write_section(doc: Path, name: str, text: str) -> None:
    """Put ``text`` into ``doc`` as its section ``name``: in place of the section's old text, or at the
    end of ``doc`` where it has none (``doc`` is created when missing). Everything else is kept.

    A benchmark that writes a part of ``docs/benchmarks.md`` writes it here: the section exists once,
    in the document, and ``tools/bench/run_all.py`` keeps every section when it rewrites the rest."""
    old = doc.read_text() if doc.is_file() else ""
    block = section_block(name, text)
    start, end = _markers(name)
    m = re.search(rf"^{re.escape(start)}\n.*?^{re.escape(end)}\n?", old, re.M | re.S)
    if m:
        new = old[:m.start()] + block + old[m.end():]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


# ---------------------------------------------------------------- the demo recipe at one seed
# (name in the tables, eval.jsonl key, decimals): what a seed run is summarised by.
SEED_RUN_METRICS = [("direction", "eval/world_direction/mean", 3), ("colour", "eval/world_colour/mean", 3),
                    ("shape", "eval/world_shape/mean", 3),
                    ("background_error", "eval/world_fidelity/background_error/mean", 1),
                    ("grid_energy", "eval/world_fidelity/grid_energy/mean", 1)]


def seed_run_finished(run_dir: Path) -> bool:
    """Trained to the end by :func:`run_seed`: the metadata is written only after the run exits 0, and a
    rerun deletes the directory first."""
    return (run_dir / "demo_seed.json").is_file()


def run_seed(out: Path, tag: str, seed: int, overrides: list[str], threads: int,
             cwd: str | Path | None = None) -> dict:
    """Train ``flowdppo-video train run.seed=SEED OVERRIDES`` (the default recipe) into ``OUT/TAG-sSEED``
    in its own process (``threads`` OpenMP threads, in ``cwd``), or read the run if it finished;
    return its row (:func:`summarise_seed_run`). The log goes to ``OUT/TAG-sSEED.log``."""
    run_dir = out / f"{tag}-s{seed}"
    if not seed_run_finished(run_dir):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
        cmd = [sys.executable, "-m", "flowdppo_video", "train", f"run.seed={seed}", f"run.output_dir={run_dir}",
               "run.progress=false", *overrides]
        t = time.perf_counter()
        shutil.rmtree(run_dir, ignore_errors=True)        # an interrupted run starts over
        with open(out / f"{tag}-s{seed}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise SystemExit(f"{Path(sys.argv[0]).name}: seed {seed} ({tag}) failed with exit {rc}; "
                             f"see {out / f'{tag}-s{seed}.log'}")
        (run_dir / "demo_seed.json").write_text(json.dumps({"wall_seconds": time.perf_counter() - t,
                                                            "threads": threads, "commit": git_commit(cwd),
                                                            "overrides": overrides}))
    return summarise_seed_run(run_dir, tag, seed)


def summarise_seed_run(run_dir: Path, tag: str, seed: int) -> dict:
    """A finished seed run's row: :data:`SEED_RUN_METRICS` of its first (base) and last evaluation, the
    KL to the base model, and :func:`run_seed`'s metadata (wall time, threads, commit, overrides)."""
    evals, meta = read_metrics(run_dir, "eval"), json.loads((run_dir / "demo_seed.json").read_text())
    base, final = evals[0], evals[-1]
    row = {"tag": tag, "seed": seed, "iterations": final["after_iterations"], **meta,
           "kl_to_base": final.get("eval/kl_base/mean")}
    for name, key, _ in SEED_RUN_METRICS:
        row[f"{name}_base"], row[name] = base.get(key), final.get(key)
    if row["direction"] is not None and row["direction_base"] is not None:
        row["direction_gain"] = row["direction"] - row["direction_base"]
    if None not in (row["colour"], row["shape"], row["colour_base"], row["shape_base"]):
        # forgetting as the frontier computes it: the mean of colour and shape lost
        row["forgotten"] = (row["colour_base"] + row["shape_base"] - row["colour"] - row["shape"]) / 2
    return row


def finished_seed_runs(out: Path, names: list[str], seeds: list[int] | tuple[int, ...],
                       row: Callable[[Path, str, int], dict]) -> dict[str, dict[int, dict]]:
    """``name -> seed -> row(run_dir, name, seed)`` of the grid's runs in ``out`` that finished
    (:func:`seed_run_finished`), in the order of ``names``."""
    rows: dict[str, dict[int, dict]] = {}
    for name in names:
        for seed in seeds:
            d = out / f"{name}-s{seed}"
            if seed_run_finished(d):
                rows.setdefault(name, {})[seed] = row(d, name, seed)
    return rows


def seed_grid_main(description: str, table: dict[str, list[str]], what: str, out: str, docs: Path,
                   docs_help: str, write_docs: Callable[[Path, Path], str], cwd: Path) -> None:
    """The whole command of a grid of default-recipe runs: its arguments (:func:`seed_grid_arguments`),
    the cells (:func:`run_seed_cells`, ``write_docs(out, docs)`` after each) unless ``--report``, then
    the docs written and printed."""
    ap = argparse.ArgumentParser(description=description)
    seed_grid_arguments(ap, list(table), what, out, docs, docs_help)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run_seed_cells(args.out, args.cells, getattr(args, f"{what}s"), args.seeds, table, args.jobs,
                       lambda: write_docs(args.out, args.docs), cwd)
    print(write_docs(args.out, args.docs))


def seed_grid_arguments(ap: Any, names: list[str], what: str, out: str, docs: Path, docs_help: str) -> None:
    """The command line of a grid of default-recipe runs (:func:`run_seed_cells`): ``--<what>s`` (the
    names to run), ``--seeds``, ``--cells``, ``--jobs``, ``--out``, ``--docs``, ``--report``."""
    ap.add_argument(f"--{what}s", nargs="+", choices=names, default=names)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cells", nargs="+", default=None, metavar=f"{what.upper()}:SEED",
                    help=f"run exactly these cells, in this order (instead of --{what}s x --seeds)")
    ap.add_argument("--jobs", type=int, default=2, help="cells side by side (one thread each when > 1)")
    ap.add_argument("--out", type=Path, default=Path(out))
    ap.add_argument("--docs", type=Path, default=docs, help=docs_help)
    ap.add_argument("--report", action="store_true", help="only read finished runs and write the docs")


def run_seed_cells(out: Path, cells: list[str] | None, names: list[str], seeds: list[int],
                   overrides: dict[str, list[str]], jobs: int, after: Callable[[], Any], cwd: str | Path) -> None:
    """Train the default recipe for each cell, ``jobs`` side by side (one thread each when > 1), with
    :func:`run_seed`: ``cells`` (``"NAME:SEED"``, in that order) or else every name of ``names`` at
    every seed; ``after()`` (writing the docs, say) runs after each cell, one at a time. An unknown
    name is a one-line exit naming the known ones."""
    todo = [(n, s) for n in names for s in seeds]
    if cells:
        todo = [(c.rsplit(":", 1)[0], int(c.rsplit(":", 1)[1])) for c in cells]
        bad = [n for n, _ in todo if n not in overrides]
        if bad:
            raise SystemExit(f"{Path(sys.argv[0]).name}: unknown name {bad[0]!r} in --cells; known: {', '.join(overrides)}")
    threads, lock = (1 if jobs > 1 else 2), threading.Lock()

    def one(cell: tuple[str, int]) -> None:
        name, seed = cell
        run_seed(out, name, seed, overrides[name], threads, cwd=cwd)
        with lock:
            after()
        print(f"done {name} seed {seed}", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


def seeds_mean_ci(xs: list[float], scale: float, d: int, signed: bool = False) -> str:
    """The frontier's ``"mean [lo, hi]"`` over seeds (:func:`~flowdppo_video.reporting.winrates.mean_ci_text`);
    one seed alone without an interval, none a dash."""
    if len(xs) == 1:
        return f"{xs[0] * scale:{'+' if signed else ''}.{d}f}"
    return mean_ci_text(xs, scale, d, signed) if xs else "—"


# ---------------------------------------------------------------- one iteration at a real width
# The run of parallel_width.py and update_memory.py (issue 33): a recipe at a real architecture's width
# with random weights, at the size of (h)'s dry run, two prompts so that two data-parallel ranks get one each.
WIDTH_PROMPTS = ["a red ball rolls to the left across a wooden table", "a blue cube slides up a white wall"]
WIDTH_SIZE: dict[str, Any] = {
    "data": {"prompts_per_iteration": 2, "group_size": 2},
    "video": {"num_frames": 9, "height": 128, "width": 128},
    # One video per transformer call, CFG as two calls: every layout runs the same shapes in the rollout.
    "sampler": {"num_steps": 10, "sde_steps": 2, "batch_size": 1, "cfg_batch": "split"},
    "optim": {"inner_epochs": 1, "minibatch_size": 4},
}
WIDTH_TINY_SIZE: dict[str, Any] = {"video": {"num_frames": 5, "height": 32, "width": 32}, "sampler": {"num_steps": 4}}


def width_run_config(recipe: Path, width_config: Path | None, tiny: bool, dtype: str | None) -> dict[str, Any]:
    """``recipe`` at :data:`WIDTH_SIZE` for one iteration on the CPU, ``model.init`` from ``width_config``
    (the family's own reader of a shapes folder) or, with ``tiny``, the family's tiny shapes; prompts
    :data:`WIDTH_PROMPTS`, no evaluation, no output dir yet (per run)."""
    cfg = load_yaml(recipe)
    fam = family(cfg["model"].get("family", "wan"))
    if tiny:
        init = copy.deepcopy(fam.tiny_init)
    else:
        assert width_config is not None
        init, missing = fam.init_from_folder(width_config)
        if missing:
            raise SystemExit(f"{width_config}: no config.json for {missing}")
    cfg = merge_trees(cfg, copy.deepcopy(WIDTH_SIZE))
    if tiny:
        cfg = merge_trees(cfg, copy.deepcopy(WIDTH_TINY_SIZE))
    cfg["model"].pop("path", None)
    cfg["model"]["init"] = init
    if dtype is not None:
        cfg["model"]["dtype"] = dtype
    cfg = merge_trees(cfg, {"run": {"iterations": 1, "checkpoint_every": 1, "sample_every": 1, "num_sample_videos": 0,
                                    "device": "cpu", "tensorboard": False, "report_every": 0, "progress": False,
                                    "seed": 0},
                            "data": {"prompts": list(WIDTH_PROMPTS)}})
    cfg.pop("eval", None)
    cfg["run"].pop("keep_best", None)          # it picks by the evaluation, removed above
    return cfg
