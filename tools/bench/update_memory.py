"""Where the update's host memory goes (issue 33): one training iteration at a real width, the resident
set sampled through it, and the update profiled with torch's memory profiler.

    .venv/bin/python tools/bench/update_memory.py --cache runs/parallel_width/cache/bfloat16/text_cache.safetensors \\
        --work runs/update_memory --out runs/update_memory/result.json          # Wan 2.1 1.3B, 30 blocks
    .venv/bin/python tools/bench/update_memory.py --cache ... --layers 10 ...    # the same width, 10 blocks
    .venv/bin/python tools/bench/update_memory.py --tiny --work /tmp/um --out /tmp/um.json   # seconds (CI)

The run is ``parallel_width.py``'s one-process reference (``--shapes`` built with random weights in the
recipe's dtype, 2 prompts x G = 2, 9 frames at 128x128, 10 steps of which 2 SDE, CFG as two calls, one
update of 4 videos), in this process, its text rows from ``--cache`` (a ``text_cache.safetensors`` of
those prompts, re-keyed for this model: no text encoder is built). Overrides (``key=value``) change the
run, e.g. ``optim.minibatch_size=1``.

Measured, in bytes:

- the resident set (``/proc/self/statm``) every 20 ms, with the phase it falls in: ``build`` (the model),
  ``rollout`` (sampling, decoding and scoring the group), ``update`` (the replay, backward and the
  optimizer step);
- in the update, torch's own allocations (``torch.profiler`` with ``profile_memory``: every CPU
  allocation and free, with its address): the peak of the bytes torch holds, the bytes allocated in the
  update that are still held at that peak (grouped by the innermost operator that allocated them), and
  what the update leaves allocated at its end;
- the memory planner's figure for the same config (``plan_memory``: its training stage and rows).

The difference between the resident set's rise in the update and torch's peak is memory torch has freed
but the process still holds (the C allocator's free lists and arenas), or holds outside torch's allocator.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from flowdppo_video.commands.benchmarking import WIDTH_PROMPTS, width_run_config

REPO = Path(__file__).resolve().parents[2]
GiB = 2 ** 30
PAGE = os.sysconf("SC_PAGE_SIZE")


class RssTimeline:
    """The resident set every ``period`` seconds in a thread, each sample tagged with the current phase."""

    def __init__(self, period: float = 0.02) -> None:
        self.period, self.phase, self.samples = period, "start", []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - t0, self.phase, self.rss()))
            time.sleep(self.period)

    def __enter__(self) -> "RssTimeline":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def by_phase(self) -> dict[str, dict[str, float]]:
        """Per phase: the resident set at its first sample, its peak and its last sample (bytes)."""
        out: dict[str, dict[str, float]] = {}
        for _, phase, rss in self.samples:
            p = out.setdefault(phase, {"first": rss, "peak": rss, "last": rss})
            p["peak"], p["last"] = max(p["peak"], rss), rss
        return out


def torch_allocations(trace_file: Path) -> dict[str, Any]:
    """From a profiler trace with memory: torch's live bytes over the update (CPU allocations only),
    their peak, what was allocated in the update and still held at the peak, by the innermost
    operator around the allocation, and what stayed allocated at the end."""
    events = json.loads(trace_file.read_text())["traceEvents"]
    ops = sorted(((e["ts"], e["ts"] + e.get("dur", 0), e["name"], e.get("tid")) for e in events
                  if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")), key=lambda o: o[0])
    mem = sorted((e for e in events if e.get("name") == "[memory]"
                  and str(e["args"].get("Device Type", 0)) in ("0", "cpu")), key=lambda e: e["ts"])

    def owner(ts: float, tid: Any) -> str:
        best = None                      # the innermost (latest-starting) op that spans ts on that thread
        for start, end, name, t in ops:
            if start > ts:
                break
            if start <= ts <= end and t == tid:
                best = name
        return best or "(outside any operator)"

    live: dict[int, tuple[int, float, Any]] = {}
    held, peak, peak_live = 0, 0, {}
    for e in mem:
        a, n = int(e["args"]["Addr"]), int(e["args"]["Bytes"])
        if n > 0:
            live[a] = (n, e["ts"], e.get("tid"))
        else:
            live.pop(a, None)
        held += n
        if held > peak:
            peak, peak_live = held, dict(live)
    groups: dict[str, float] = defaultdict(float)
    for n, ts, tid in peak_live.values():
        groups[owner(ts, tid)] += n
    top = sorted(groups.items(), key=lambda kv: -kv[1])[:12]
    return {"allocations": sum(1 for e in mem if int(e["args"]["Bytes"]) > 0),
            "peak_bytes_over_start": peak, "held_at_peak_by_op": [{"op": k, "bytes": v} for k, v in top],
            "held_at_end_bytes": held, "allocated_bytes_total": sum(max(int(e["args"]["Bytes"]), 0) for e in mem)}


def rekey_cache(src: Path, dst: Path, cfg: Any) -> None:
    """Copy a text cache of the same prompts and encoder under this run's model key."""
    from safetensors import safe_open

    from flowdppo_video.models.text_cache import TextCache, run_key

    with safe_open(str(src), "pt") as f:
        old = f.metadata()["key"]
    cache = TextCache(old)
    if cache.load(src) == 0:
        raise SystemExit(f"update_memory.py: --cache {src} holds no rows")
    cache.key = run_key(cfg, None)
    cache.save(dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=REPO / "configs" / "wan2.1_t2v_1.3b.yaml")
    p.add_argument("--shapes", type=Path, default=REPO / "configs" / "model_shapes" / "wan2.1_t2v_1.3b")
    p.add_argument("--layers", type=int, default=None, help="the transformer's num_layers (default: the shapes')")
    p.add_argument("--cache", type=Path, default=None, help="text_cache.safetensors of the run's prompts")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="the family's tiny shapes (seconds)")
    p.add_argument("--no-profile", action="store_true", help="the resident set only (torch's profiler adds its own)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    import torch

    from flowdppo_video.commands.planner import plan_memory
    from flowdppo_video.models.text_cache import CACHE_FILE
    from flowdppo_video.runs.config import load_config
    from flowdppo_video.trainer import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))))
    tree = width_run_config(a.recipe, None if a.tiny else a.shapes, a.tiny, None)
    if a.layers is not None:
        tree["model"]["init"]["transformer"]["num_layers"] = a.layers
    if a.work.exists() and any(a.work.iterdir()):
        raise SystemExit(f"update_memory.py: --work {a.work} exists and is not empty: give a new folder")
    if a.cache is not None and not a.cache.is_file():
        raise SystemExit(f"update_memory.py: --cache {a.cache} is not a file")
    run_dir = a.work / "run"
    run_dir.mkdir(parents=True)
    tree["run"]["output_dir"] = str(run_dir)
    tree["run"]["allow_foreign_files"] = True          # the text cache placed there first
    (a.work / "run.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    cfg = load_config(a.work / "run.yaml", a.overrides)
    if a.cache is not None:
        rekey_cache(a.cache, run_dir / CACHE_FILE, cfg)
    plan = plan_memory(copy.deepcopy(cfg), 1)

    result: dict[str, Any] = {"shapes": str(a.shapes), "layers": a.layers, "tiny": a.tiny, "overrides": a.overrides,
                              "threads": torch.get_num_threads(), "prompts": WIDTH_PROMPTS,
                              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD"))}}
    with RssTimeline() as tl:
        tl.phase = "build"
        trainer = Trainer(cfg)
        try:
            result["text_stats"] = trainer.text_stats
            tl.phase, t0 = "rollout", time.perf_counter()
            batch = trainer.collect(0)                       # rollout, decode, rewards, advantages
            tl.phase, t1 = "update", time.perf_counter()
            if a.no_profile:
                upd = trainer.update(batch.traj, batch.advantages, 0)
                tl.phase, t2 = "after update", time.perf_counter()
            else:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=False) as prof:
                    upd = trainer.update(batch.traj, batch.advantages, 0)
                tl.phase, t2 = "after update", time.perf_counter()
                trace = a.work / "update_trace.json"
                prof.export_chrome_trace(str(trace))
                result["torch_update"] = torch_allocations(trace)
                trace.unlink()
        finally:
            trainer.close()
    result["metrics"] = {"loss": upd["loss"], "grad_norm": upd["grad_norm"], "time/rollout_s": t1 - t0,
                         "time/update_s": t2 - t1}
    result["rss_by_phase"] = tl.by_phase()
    result["rss_timeline"] = [(round(t, 2), ph, r) for t, ph, r in tl.samples[::5]]
    result["planner"] = {"stages": plan.stages, "rows": {r.name: r.device for r in plan.rows}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    ph, g = result["rss_by_phase"], lambda b: f"{b / GiB:.2f}"
    print(f"resident set (GiB): after build {g(ph['rollout']['first'])}, rollout peak {g(ph['rollout']['peak'])}, "
          f"update peak {g(ph['update']['peak'])}, after update {g(ph['update']['last'])}; "
          f"planner training {g(plan.stages['train'])}")
    if "torch_update" in result:
        tu = result["torch_update"]
        print(f"torch in the update: peak {g(tu['peak_bytes_over_start'])} GiB over its start, "
              f"{g(tu['held_at_end_bytes'])} GiB still held at its end; held at the peak by:")
        for row in tu["held_at_peak_by_op"]:
            print(f"  {row['bytes'] / 2 ** 20:9.1f} MiB  {row['op']}")


if __name__ == "__main__":
    main()
