"""ZeRO-3 and Ulysses at real width (issue 33, item 4): Wan 2.1 1.3B's real architecture (random
weights), one training iteration on 2 gloo processes against the same iteration in one process, the
text embeddings from the run's cache (no rank builds the text encoder).

    .venv/bin/python tools/bench/parallel_width.py --out runs/parallel_width/result.json \\
        --section docs/benchmarks.md          # real width (default: configs/model_shapes/wan2.1_t2v_1.3b)
    .venv/bin/python tools/bench/parallel_width.py --tiny --out /tmp/pw.json    # the tiny Wan, seconds (CI)

Steps, each its own process (``os.wait4`` gives each one's peak resident set, ``ru_maxrss``):

1. ``cache``: the run's text cache, once. The text encoder is built alone in the recipe's dtype
   (``training.run_builder.encode_stage``, the trainer's own staged start), encodes the prompts and
   their CFG negative, is released; ``WORK/cache/<dtype>/text_cache.safetensors`` holds its rows cast
   to each pass's dtype under that pass's model key (UMT5-XXL built in float32 would be 23 GB; every
   layout of a pass reads the same rows, which is all the comparison needs). Every run below starts
   from a copy, so its staged start finds every row cached and builds no encoder.
2. per training mode (``--modes``: LoRA rank 32, as the recipe; ``full`` fine-tuning where the
   planner says the machine holds it), per layout (``--layouts``): one ``Trainer`` iteration through
   ``tools/bench/parallel_width.py --stage run`` (``torchrun --nproc_per_node=2`` for 2 ranks, gloo):
   ``one`` (one process, the reference), ``zero3`` (``parallel.zero_stage=3``: 2 data-parallel ranks,
   each half of the videos), ``sp2`` (``parallel.sequence_parallel=2``: both ranks hold every video,
   half of its tokens each), ``zero3_sp2`` (both: world 2 = 1 data-parallel x 2 sequence-parallel
   ranks; ZeRO shards over the world, ``parallel/zero.py``'s engine is built on the default group, so
   the 2 ranks of the one SP group hold half of the weights each). Every rank wraps the constructor
   of the text encoder's class (from the model folder's ``model_index.json``): building one with
   weights ends the run (a skeleton on the meta device holds none and is allowed).

Per run: the iteration's ``loss`` and ``grad_norm`` (``metrics.jsonl``), the trained weights of its
checkpoint against the one-process run's (max |diff|, and the norm of the difference over the norm of
the one-process update, the reference run writing the initial weights before it trains), wall time,
peak RSS of each rank, and the memory planner's per-rank figure for the same config and layout
(``flowdppo_video.commands.planner.plan_memory``, world 1 or 2: its training stage; the encoders'
stage never happens here).

Tolerances (:data:`TOLERANCES`, by ``model.dtype``): the loss and the gradient norm relative to the
one-process value (the loss: or absolute, for a loss near 0), and the updated weights as
``||W - W_one|| / ||W_one - W_0||``. The rollouts agree bit for bit across data-parallel layouts
(one video per transformer call, CFG as two calls: the same shapes everywhere); sequence
parallelism computes the same numbers in another order.

The size is (h)'s (``tools/bench/real_size.py``): 9 frames at 128x128, 10 sampler steps of which 2
SDE, the recipe's CFG, ``base_below``, beta and LoRA, but 2 prompts of G = 2 (2 data-parallel ranks
need an even prompt count) and one optimizer step of all 4 videos (``optim.minibatch_size=4``).
``--tiny``: the family's tiny shapes at 5 frames 32x32, 4 steps, every ZeRO-3 weight sharded
(``parallel.zero_persistence_threshold=0``; at real width the default keeps the LoRA adapters whole).

``--section FILE`` writes the table into FILE as its section ``parallel_width`` (refused for
``--tiny``: its numbers say nothing about real width); ``--from-json`` rewrites it from a result.
``--resume`` continues in ``--work``: each finished launch left ``launch_<layouts>.json`` (and the cache
``cache/launch.json``) and is read back, an interrupted one starts over.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch; see _common.py

import argparse
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from flowdppo_video.commands.benchmarking import WIDTH_PROMPTS as PROMPTS
from flowdppo_video.commands.benchmarking import width_run_config as run_config

REPO = Path(__file__).resolve().parents[2]
SECTION = "parallel_width"
GiB = 2 ** 30
LAYOUTS: dict[str, tuple[int, list[str]]] = {       # name -> (processes, overrides)
    "one": (1, []),
    "zero3": (2, ["parallel.zero_stage=3"]),
    "sp2": (2, ["parallel.sequence_parallel=2"]),
    "zero3_sp2": (2, ["parallel.zero_stage=3", "parallel.sequence_parallel=2"]),
}
MODES: dict[str, list[str]] = {"lora": [], "full": ["model.lora.rank=0"]}
# By model.dtype: loss (relative, or absolute: the first iteration's loss is about 0, the ratio being 1
# and the group-relative advantages summing to 0), gradient norm (relative), updated weights
# (||W - W_one|| / ||W_one - W_0||). float32 is the exactness check: the layouts compute the same sums
# in another order. bfloat16 (the recipe's) bounds the layout only loosely: Adam's first step is about
# lr x sign(gradient), so a gradient that bfloat16 rounding moves across 0 flips a whole step (the tiny
# model: 0.2-0.26 of the update at every layout, SP 2 included, where float32 gives 1e-4-5e-4); a layout
# bug (a missing or doubled reduction, a wrong shard) moves the gradient norm by O(1) and the weights by
# about the update itself.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"loss_rel": 1e-3, "loss_abs": 1e-6, "grad_norm_rel": 1e-3, "weights_rel": 1e-2},
    "bfloat16": {"loss_rel": 2e-2, "loss_abs": 1e-4, "grad_norm_rel": 2e-2, "weights_rel": 0.5},
}
RUNTIME_BYTES = 0.5 * GiB          # Python, torch, DeepSpeed per process: not in the planner




def encoder_classes(width_config: Path) -> list[str]:
    """The text encoders' class names in the model folder's ``model_index.json``."""
    index = json.loads((width_config / "model_index.json").read_text())
    return [v[1] for k, v in index.items() if k.startswith("text_encoder") and isinstance(v, list) and v[1]]


class EncoderGuard:
    """Wraps the constructors of ``classes`` (transformers models): every construction is counted,
    those with weights (not a meta-device skeleton) separately; ``refuse``: such a construction raises."""

    def __init__(self, classes: list[str], refuse: bool) -> None:
        import transformers

        from flowdppo_video.models.common import is_skeleton

        self.built = self.skeletons = 0
        for name in classes:
            cls = getattr(transformers, name)
            cls.__init__ = self._wrap(cls.__init__, name, refuse, is_skeleton)

    def _wrap(self, init: Any, name: str, refuse: bool, is_skeleton: Any) -> Any:
        def wrapped(module: Any, *args: Any, **kwargs: Any) -> None:
            init(module, *args, **kwargs)
            if is_skeleton(module):
                self.skeletons += 1
                return
            self.built += 1
            if refuse:
                raise RuntimeError(f"rank {os.environ.get('RANK', '0')}: a {name} with weights was built; the run's "
                                   "text cache should have covered every prompt")
        return wrapped


# ---------------------------------------------------------------- stages (each its own process)
def _rusage(extra: dict[str, Any]) -> dict[str, Any]:
    import resource

    return {**extra, "rank": int(os.environ.get("RANK", "0")), "pid": os.getpid(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def stage_cache(config: Path, cache_dir: Path, classes: list[str], out: Path, passes: list[Path]) -> None:
    """Encode the run's prompts and CFG negative once, with the encoder built alone in ``config``'s
    dtype, and write a cache for each pass config of ``passes`` (``cache_dir/<dtype>/``): the same
    rows, cast to that pass's dtype, under its model key (UMT5-XXL in float32 would be 23 GB; the
    comparisons only need every layout of a pass to read the same conditioning)."""
    import torch

    from flowdppo_video.models.base import TextBatch
    from flowdppo_video.models.text_cache import CACHE_FILE, TextCache, run_key
    from flowdppo_video.runs.config import load_config
    from flowdppo_video.runs.data import load_prompts
    from flowdppo_video.training.run_builder import encode_stage

    guard = EncoderGuard(classes, refuse=False)
    cfg = load_config(config, [])
    t0 = time.perf_counter()
    cache, stats = encode_stage(cfg, torch.device("cpu"), load_prompts(cfg.data.prompts), None, cache_dir,
                                progress=True)
    for other in passes:
        pcfg = load_config(other, [])
        dtype = getattr(torch, pcfg.model.dtype)
        cast = TextCache(run_key(pcfg, None))

        def to(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if t.is_floating_point() else t
        cast.entries = {k: (to(v) if isinstance(v, torch.Tensor) else TextBatch(**{n: to(x) for n, x in v.parts.items()}))
                        for k, v in cache.entries.items()}
        (cache_dir / pcfg.model.dtype).mkdir(exist_ok=True)
        cast.save(cache_dir / pcfg.model.dtype / CACHE_FILE)
    out.write_text(json.dumps(_rusage({"stats": stats, "encoders_built": guard.built, "rows": len(cache.entries),
                                       "encoded_in": cfg.model.dtype, "seconds": time.perf_counter() - t0})))


def stage_run(jobs_file: Path, classes: list[str]) -> None:
    """One training iteration per job of ``jobs_file`` (``[{"config", "overrides", "result", "initial"}]``),
    this process one rank of the launcher's layout; no text encoder may be built. Several jobs share
    the launch's process group (``--one-launch``): each trainer then builds its groups inside it."""
    import torch
    import torch.distributed as dist

    from flowdppo_video.runs.config import load_config
    from flowdppo_video.trainer import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    guard = EncoderGuard(classes, refuse=True)
    jobs = json.loads(jobs_file.read_text())
    if len(jobs) > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")          # the trainers join it; none destroys it
    for job in jobs:
        built = guard.built
        t0 = time.perf_counter()
        trainer = Trainer(load_config(Path(job["config"]), job["overrides"]))
        build_s = time.perf_counter() - t0
        try:
            if job.get("initial") and trainer.par.world == 1:
                trainer.adapter.save_trainable(Path(job["initial"]))      # W_0, before the update
            trainer.run()
        finally:
            trainer.close()
        rank = os.environ.get("RANK", "0")
        Path(f"{job['result']}.rank{rank}.json").write_text(json.dumps(_rusage({
            "encoders_built": guard.built - built, "encoder_skeletons": guard.skeletons,
            "text_stats": trainer.text_stats, "build_s": build_s, "seconds": time.perf_counter() - t0,
            "shared_process": len(jobs) > 1})))
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- the parent
def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def launch(argv: list[str], env: dict[str, str], log: Path, max_rss_bytes: float | None) -> dict[str, Any]:
    """Run ``argv`` to its end (its output to ``log`` and this terminal); wall time, the peak of the
    whole process tree's summed RSS (sampled every 0.5 s), killed past ``max_rss_bytes``."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        peak = [0]
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                rss = _tree_rss(proc.pid)
                peak[0] = max(peak[0], rss)
                if max_rss_bytes is not None and rss > max_rss_bytes:
                    print(f"== resident set {rss / GiB:.1f} GiB > --max-rss-gib: killed", flush=True)
                    os.killpg(proc.pid, 9)
                done.wait(0.5)

        threading.Thread(target=poll, daemon=True).start()
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            print(line, end="", flush=True)
        rc = proc.wait()
        done.set()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(argv[:6])} ... failed (rc {rc}); its output: {log}")
    return {"wall_s": wall, "tree_peak_rss_bytes": peak[0]}


def planner_per_rank(config: Path, overrides: list[str], world: int) -> dict[str, float]:
    """The planner's per-rank bytes for this config and layout: the training stage (this run's only
    one: the cache covers the prompts) and its total (the larger of the encoders' stage and training)."""
    from flowdppo_video.commands.planner import plan_memory
    from flowdppo_video.runs.config import load_config

    plan = plan_memory(load_config(config, overrides), world)
    host = plan.row("total").host
    return {"train": plan.stages["train"] + host, "total": (plan.row("total").device or 0.0) + host}


def _weights(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from flowdppo_video.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise SystemExit(f"{run_dir}: no checkpoint")
    return _load_dir(ckpt / "model", load_file)


def _load_dir(d: Path, load_file: Any) -> dict[str, Any]:
    out = {}
    for f in sorted(d.rglob("*.safetensors")):
        rel = f.relative_to(d).parent.as_posix()
        out.update({f"{rel}:{k}": v for k, v in load_file(f).items()})
    return out


def compare_weights(w: dict[str, Any], ref: dict[str, Any], w0: dict[str, Any]) -> dict[str, Any]:
    """``w`` against the one-process ``ref`` (both after the step from ``w0``): max |diff|,
    ||diff|| / ||ref - w0||, the elements that differ, those whose step went the other way (Adam's
    first step is about lr x sign(gradient): a gradient near 0 can flip it), and dtype mismatches."""
    if w.keys() != ref.keys():
        raise SystemExit(f"the checkpoints hold different tensors: {sorted(set(w) ^ set(ref))[:4]}")
    diff_sq = upd_sq = worst = 0.0
    differ = flipped = total = 0
    dtypes: list[str] = []
    for k, r in ref.items():
        a, b = w[k].double(), r.double()
        d = a - b
        worst = max(worst, float(d.abs().max()))
        diff_sq += float(d.square().sum())
        if k in w0:
            start = w0[k].double()
            upd_sq += float((b - start).square().sum())
            flipped += int(((a - start) * (b - start) < 0).sum())
        differ += int((d != 0).sum())
        total += d.numel()
        if w[k].dtype != r.dtype:
            dtypes.append(f"{k}: {str(w[k].dtype).replace('torch.', '')} vs {str(r.dtype).replace('torch.', '')}")
    return {"max_abs_diff": worst, "diff_norm": math.sqrt(diff_sq), "update_norm": math.sqrt(upd_sq),
            "rel_to_update": math.sqrt(diff_sq) / math.sqrt(upd_sq) if upd_sq > 0 else float("inf"),
            "elements_differ": differ, "steps_flipped": flipped, "elements": total,
            "dtype_mismatches": dtypes[:4], "dtype_mismatch_count": len(dtypes)}


def _metrics(run_dir: Path) -> dict[str, Any]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    keep = ("loss", "grad_norm", "kl/mean", "reward/mean", "time/rollout_s", "time/update_s", "ratio/first_max_abs_log")
    return {k: rows[-1][k] for k in keep if k in rows[-1]}


def _mem_available() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    return float("inf")


def bench(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from flowdppo_video.commands import benchmarking as B

    work = a.work
    if work.exists() and any(work.iterdir()) and not a.resume:
        raise SystemExit(f"--work {work} exists and is not empty (--resume reads the launches that finished there)")
    work.mkdir(parents=True, exist_ok=True)
    classes = encoder_classes(a.width_config)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu",
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    machine = B.machine_info(torch.device("cpu"))
    available = _mem_available()
    groups: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    files: dict[str, Path] = {}
    for dtype in a.dtypes:
        cfg = run_config(a.recipe, a.width_config, a.tiny, dtype)
        configs[dtype] = {k: cfg[k] for k in ("model", "data", "video", "sampler", "objective", "optim") if k in cfg}
        (work / dtype).mkdir(exist_ok=a.resume)
        files[dtype] = work / dtype / "run.yaml"
        files[dtype].write_text(yaml.safe_dump(cfg, sort_keys=False))
    recipe_cfg = run_config(a.recipe, a.width_config, a.tiny, None)      # the encoder in the recipe's dtype
    (work / "cache").mkdir(exist_ok=a.resume)
    (work / "cache" / "run.yaml").write_text(yaml.safe_dump(recipe_cfg, sort_keys=False))
    caches = {"all": write_cache(work / "cache" / "run.yaml", work / "cache", list(files.values()), classes, env, a)}
    for dtype in a.dtypes:
        groups.update({f"{mode}/{dtype}": run_group(files[dtype], work / dtype / mode, mode, dtype, classes, env,
                                                    available, a) for mode in a.modes})
    from flowdppo_video.commands.benchmarking import git_commit

    return {"name": SECTION, "tiny": a.tiny, "dtypes": a.dtypes, "tolerances": {d: TOLERANCES[d] for d in a.dtypes},
            "machine": machine, "mem_available_at_start_bytes": available, "commit": git_commit(REPO),
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "one_launch": a.one_launch,
            "command": " ".join([".venv/bin/python", "tools/bench/parallel_width.py", *sys.argv[1:]]),
            "width_config": None if a.tiny else str(a.width_config), "recipe": str(a.recipe), "configs": configs,
            "encoder_classes": classes, "caches": caches, "groups": groups}


def _here() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve())]


def write_cache(config: Path, cache_dir: Path, passes: list[Path], classes: list[str], env: dict[str, str],
                a: argparse.Namespace) -> dict[str, Any]:
    """Step 1: the run's text cache, written once by the encoder built alone in its own process."""
    if a.resume and (cache_dir / "launch.json").is_file():
        return {**json.loads((cache_dir / "cache.json").read_text()),
                **json.loads((cache_dir / "launch.json").read_text())}
    print(f"== cache: the text encoder alone, {len(PROMPTS)} prompts and their CFG negative", flush=True)
    r = launch([*_here(), "--stage", "cache", "--config", str(config), "--dir", str(cache_dir), "--classes",
                ",".join(classes), "--result", str(cache_dir / "cache.json"), "--passes", *map(str, passes)],
               {**env, "OMP_NUM_THREADS": str(a.threads)}, cache_dir / "cache.log", _max_rss(a))
    (cache_dir / "launch.json").write_text(json.dumps(r))
    return {**json.loads((cache_dir / "cache.json").read_text()), **r}


def _max_rss(a: argparse.Namespace) -> float | None:
    return a.max_rss_gib * GiB if a.max_rss_gib else None


def run_group(config: Path, root: Path, mode: str, dtype: str, classes: list[str], env: dict[str, str],
              available: float, a: argparse.Namespace) -> dict[str, Any]:
    """Step 2 for one training mode: the one-process run, then each 2-rank layout; compared."""
    from safetensors.torch import load_file

    from flowdppo_video.models.text_cache import CACHE_FILE, checksum_path
    from flowdppo_video.parallel.groups import free_port
    from flowdppo_video.runs.run_dir import mark_owned

    over = MODES[mode] + (["parallel.zero_persistence_threshold=0"] if a.tiny else [])
    plans = {lay: planner_per_rank(config, over + LAYOUTS[lay][1], LAYOUTS[lay][0]) for lay in a.layouts}
    skipped: dict[str, str] = {}
    for lay in a.layouts:
        n = LAYOUTS[lay][0]
        need = n * (plans[lay]["train"] + RUNTIME_BYTES)
        if not a.tiny and not a.force and need > available - GiB:
            skipped[lay] = (f"does not fit: the planner's {n} x {plans[lay]['train'] / GiB:.2f} GiB per rank "
                            f"(+{RUNTIME_BYTES / GiB:.1f} GiB runtime each) > the {available / GiB:.1f} GiB available "
                            "less 1 GiB")
    todo = [lay for lay in a.layouts if lay not in skipped]
    if "one" not in todo or todo == ["one"]:
        why = "no two-rank layout fits" if "one" in todo else "the one-process reference does not fit"
        for lay in todo:
            skipped[lay] = why
        print(f"== {mode}/{dtype}: skipped ({why})", flush=True)
        return {"runs": {}, "skipped": skipped, "planner": plans, "overrides": over}
    cache = config.parent.parent / "cache" / dtype / CACHE_FILE
    root.mkdir(exist_ok=a.resume)

    def job(lay: str) -> dict[str, Any]:
        run_dir = root / lay
        shutil.rmtree(run_dir, ignore_errors=True)    # an interrupted launch's layout starts over
        run_dir.mkdir()
        mark_owned(run_dir)                      # a run's folder holding only its text cache
        for f in (cache, checksum_path(cache)):
            shutil.copy2(f, run_dir / f.name)
        return {"config": str(config), "overrides": [f"run.output_dir={run_dir}", *over, *LAYOUTS[lay][1]],
                "result": str(run_dir / "rank"), "initial": str(root / "initial") if lay == "one" else None}

    launches = [["one"]] + ([[x for x in todo if x != "one"]] if a.one_launch else [[x] for x in todo if x != "one"])
    runs: dict[str, Any] = {}
    for batch in launches:
        n = LAYOUTS[batch[0]][0]
        done = root / f"launch_{'_'.join(batch)}.json"
        if a.resume and done.is_file():            # this launch finished before: read back, not rerun
            print(f"== {mode}/{dtype}: {', '.join(batch)}: finished before, read back", flush=True)
            lost = [lay for lay in batch if not (root / lay / "checkpoints").is_dir()]
            if lost:
                raise SystemExit(f"--resume: {root / lost[0]} has no checkpoints to compare (a finished run keeps "
                                 "them only with --keep-checkpoints)")
        else:
            jobs_file = root / f"jobs_{'_'.join(batch)}.json"
            jobs_file.write_text(json.dumps([job(lay) for lay in batch], indent=1))
            args = ["--stage", "run", "--jobs", str(jobs_file), "--classes", ",".join(classes)]
            if n == 1:
                argv, threads = [*_here(), *args], a.threads
            else:
                argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
                        f"--master_port={free_port()}", str(Path(__file__).resolve()), *args]
                threads = max(1, a.threads // n)
            print(f"\n== {mode}/{dtype}: {', '.join(batch)}: {n} process(es) x {threads} thread(s)", flush=True)
            r = launch(argv, {**env, "OMP_NUM_THREADS": str(threads)}, root / f"{'_'.join(batch)}.log", _max_rss(a))
            done.write_text(json.dumps({**r, "threads": threads}))
        r = json.loads(done.read_text())
        for lay in batch:
            ranks = [json.loads((root / lay / f"rank.rank{i}.json").read_text()) for i in range(n)]
            runs[lay] = {**r, "launch": batch, "processes": n, "overrides": over + LAYOUTS[lay][1], "ranks": ranks,
                         "metrics": _metrics(root / lay), "planner": plans[lay]}
    w0 = _load_dir(root / "initial", load_file)
    ref = _weights(root / "one")
    base = runs["one"]["metrics"]
    for lay, r in runs.items():
        m = r["metrics"]
        r["vs_one"] = {"loss_diff": abs(m["loss"] - base["loss"]),
                       "grad_norm_rel": abs(m["grad_norm"] - base["grad_norm"]) / max(abs(base["grad_norm"]), 1e-30),
                       "weights": compare_weights(_weights(root / lay), ref, w0)}
        r["within"] = within(r["vs_one"], base, TOLERANCES[dtype])
        if not a.keep_checkpoints and lay != "one":
            shutil.rmtree(root / lay / "checkpoints", ignore_errors=True)
    return {"runs": runs, "skipped": skipped, "planner": plans, "overrides": over}


def within(v: dict[str, Any], base: dict[str, Any], tol: dict[str, float]) -> dict[str, bool]:
    """Each comparison against the one-process run within :data:`TOLERANCES`."""
    return {"loss": v["loss_diff"] <= max(tol["loss_abs"], tol["loss_rel"] * abs(base["loss"])),
            "grad_norm": v["grad_norm_rel"] <= tol["grad_norm_rel"],
            "weights": v["weights"]["rel_to_update"] <= tol["weights_rel"]}


# ---------------------------------------------------------------- the report
LABELS = {"one": "1 process", "zero3": "ZeRO-3, 2 ranks (DP 2)", "sp2": "SP 2 (DP 1)",
          "zero3_sp2": "ZeRO-3 + SP 2 (DP 1)"}


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def _bytes(b: float) -> str:
    from flowdppo_video.commands.planner import fmt_bytes

    return fmt_bytes(b)


def section(r: dict[str, Any]) -> str:
    """The markdown section of ``docs/benchmarks.md`` for a result of :func:`bench`."""
    m = r["machine"]
    c = next(iter(r["configs"].values()))
    model = Path(r["width_config"]).name if r["width_config"] else "the tiny Wan (--tiny)"
    ranks = [k for g in r["groups"].values() for run in g["runs"].values() for k in run["ranks"]]
    lines = [f"## ZeRO-3 and sequence parallelism at real width: {model}, one iteration on 2 gloo processes", "",
             "```", r["command"], "```", "",
             f"- Model: `{r['width_config'] or 'tiny shapes'}` with random weights; recipe `{Path(r['recipe']).name}` at "
             f"(h)'s video size: {c['data']['prompts_per_iteration']} prompts, G = {c['data']['group_size']}, "
             f"{c['video']['num_frames']} frames at {c['video']['height']}x{c['video']['width']}, "
             f"{c['sampler']['num_steps']} steps ({c['sampler']['sde_steps']} SDE), CFG "
             f"{c['sampler'].get('guidance_scale')} as two calls of one video, one optimizer step of "
             f"{c['optim']['minibatch_size']} videos, lr {c['optim']['lr']:g}, gradient checkpointing "
             f"{'on' if c['model'].get('gradient_checkpointing') else 'off'}, `base_below` "
             f"{c['model'].get('base_below')}, beta {c['objective'].get('beta')}.",
             "- Text: one cache written by the encoder built alone in the recipe's dtype ("
             + ", ".join(f"{x['rows']} rows, {x['wall_s']:.0f} s, peak RSS {_gib(x['peak_rss_bytes'])} GiB"
                         for x in r["caches"].values())
             + "), its rows cast to each pass's dtype; every rank of every run started from a copy with the constructor of "
             f"{', '.join(r['encoder_classes'])} wrapped to fail: "
             + (f"no rank built an encoder ({len(ranks)} rank runs)." if not any(k["encoders_built"] for k in ranks)
                else "**a rank built one**."),
             f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {r['mem_available_at_start_bytes'] / GiB:.1f} GiB "
             f"available at the start; torch {m['torch']}; commit {r['commit'][:10]}, finished {r['finished']}. The one "
             "process runs on all threads, each of 2 ranks on half."
             + (" The 2-rank layouts shared one launch (`--one-launch`): their peak RSS is the process's high-water "
                "mark so far." if r.get("one_launch") else ""),
             "- Tolerances, against the one process: the loss (relative, or absolute near 0: the first iteration's "
             "loss is about 0), the gradient norm (relative), the updated weights as ||W - W_one|| / ||W_one - W_0|| "
             "(the difference against the one-process update). " + "; ".join(
                 f"{d}: {t['loss_rel']:g} (or {t['loss_abs']:g}), {t['grad_norm_rel']:g}, {t['weights_rel']:g}"
                 for d, t in r["tolerances"].items())
             + ". float32 is the exactness check; bfloat16 only bounds a layout loosely (Adam's first step is about "
             "lr x sign(gradient): a gradient rounding moves across 0 flips a whole step, column *flipped*).",
             "- Peak RSS: each rank's `ru_maxrss`. Planner: `plan_memory` for the same config and layout, per rank, "
             "its training stage (the encoders' stage never runs here); it leaves out the Python/torch/DeepSpeed "
             "runtime (~0.3-0.5 GiB a process).", ""]
    for key, g in r["groups"].items():
        mode, dtype = key.split("/")
        rank = r["configs"][dtype]["model"]["lora"]["rank"]
        lines += [f"### {'LoRA rank ' + str(rank) if mode == 'lora' else 'Full fine-tuning'}, {dtype}", "",
                  "| layout | loss | grad norm | grad norm rel. diff | max abs diff W | diff / update | flipped | within "
                  "| wall s | rollout + update s | peak RSS per rank | planner per rank |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        for lay, run in g["runs"].items():
            mt, v = run["metrics"], run["vs_one"]
            w, ok = v["weights"], run["within"]
            rss = " / ".join(_bytes(k["peak_rss_bytes"]) for k in sorted(run["ranks"], key=lambda k: k["rank"]))
            verdict = "reference" if lay == "one" else ("yes" if all(ok.values()) else
                                                        "**no**: " + ", ".join(k for k, x in ok.items() if not x))
            lines.append(
                f"| {LABELS[lay]} | {mt['loss']:.4g} | {mt['grad_norm']:.6g} | {v['grad_norm_rel']:.1e} | "
                f"{w['max_abs_diff']:.1e} | {w['rel_to_update']:.1e} | {w['steps_flipped']} | {verdict} | "
                f"{run['wall_s']:.0f} | {mt.get('time/rollout_s', float('nan')):.0f} + "
                f"{mt.get('time/update_s', float('nan')):.0f} | {rss} | {_bytes(run['planner']['train'])} |")
        for lay, why in g["skipped"].items():
            lines.append(f"| {LABELS[lay]} | skipped: {why} | | | | | | | | | | {_bytes(g['planner'][lay]['train'])} |")
        one = g["runs"].get("one")
        if one:
            w = one["vs_one"]["weights"]
            lines += ["", f"The one-process update: ||W_one - W_0|| = {w['update_norm']:.3g} over {w['elements']:,} "
                          "trained weights."]
            odd = {lay: run["vs_one"]["weights"] for lay, run in g["runs"].items()
                   if run["vs_one"]["weights"]["dtype_mismatch_count"]}
            for lay, w in odd.items():
                lines.append(f"{LABELS[lay]}: {w['dtype_mismatch_count']} checkpoint tensors in another dtype than the "
                             f"one process's, e.g. `{w['dtype_mismatches'][0]}`.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width-config", type=Path, default=REPO / "configs" / "model_shapes" / "wan2.1_t2v_1.3b",
                   help="a folder of <part>/config.json files and model_index.json (the architecture)")
    p.add_argument("--recipe", type=Path, default=REPO / "configs" / "wan2.1_t2v_1.3b.yaml")
    p.add_argument("--tiny", action="store_true", help="the family's tiny shapes: seconds (the test)")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="model.dtype of each pass: float32 (the exactness check), bfloat16 (the recipe's)")
    p.add_argument("--modes", default="lora,full", help="lora, full (full where the planner says it fits)")
    p.add_argument("--layouts", default="one,zero3,sp2,zero3_sp2")
    p.add_argument("--work", type=Path, default=None, help="new folder for the runs (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="result JSON")
    p.add_argument("--section", type=Path, default=None, help="markdown file whose section 'parallel_width' this writes")
    p.add_argument("--threads", type=int, default=2, help="threads of the one process (each of 2 ranks: half)")
    p.add_argument("--max-rss-gib", type=float, default=20.0, help="kill a run whose processes together pass this")
    p.add_argument("--force", action="store_true", help="run a layout the planner says does not fit")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--one-launch", action="store_true",
                   help="the 2-rank layouts in one torchrun launch (faster; their peak RSS is then cumulative)")
    p.add_argument("--from-json", type=Path, default=None, help="rewrite --section from a stored result; no run")
    p.add_argument("--resume", action="store_true",
                   help="continue in --work: the launches that finished there are read back (with their "
                        "checkpoints: --keep-checkpoints for a run that finished), the rest run")
    # a stage of the benchmark, in its own process
    p.add_argument("--stage", choices=["cache", "run"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--classes", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--passes", type=Path, nargs="*", default=[], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    classes = [c for c in a.classes.split(",") if c]
    if a.stage == "cache":
        stage_cache(a.config, a.dir, classes, a.result, a.passes)
        return None
    if a.stage == "run":
        stage_run(a.jobs, classes)
        return None
    if a.section is not None and a.tiny:
        p.error("--section with --tiny: the tiny numbers say nothing about real width (use --out)")
    from flowdppo_video.commands.benchmarking import write_json, write_section

    if a.from_json is not None:
        r = json.loads(a.from_json.read_text())
    else:
        a.modes = [m for m in a.modes.split(",") if m]
        a.dtypes = [d for d in a.dtypes.split(",") if d]
        a.layouts = [lay for lay in a.layouts.split(",") if lay]
        bad = ([x for x in a.modes if x not in MODES] + [x for x in a.layouts if x not in LAYOUTS]
               + [x for x in a.dtypes if x not in TOLERANCES])
        if bad:
            p.error(f"unknown mode, layout or dtype {bad[0]!r} (modes: {', '.join(MODES)}; layouts: "
                    f"{', '.join(LAYOUTS)}; dtypes: {', '.join(TOLERANCES)})")
        if a.layouts[0] != "one":
            a.layouts = ["one", *[x for x in a.layouts if x != "one"]]
        if a.work is None:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="parallel_width_") as d:
                a.work = Path(d) / "work"
                r = bench(a)
        else:
            r = bench(a)
        write_json(a.out, r)
    text = section(r)
    print("\n" + text, flush=True)
    if a.section is not None:
        write_section(a.section, SECTION, text)
        print(f"wrote section {SECTION!r} of {a.section}")
    return r


if __name__ == "__main__":
    main()
