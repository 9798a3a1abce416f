"""The ten-minute GPU check (issue 19, item 5); run it through ``tools/gpu_check.sh``.

Wan 2.1 T2V 1.3B's architecture with random weights (``configs/model_shapes/wan2.1_t2v_1.3b``) in
bf16 at the Flow-GRPO Wan setting of ``configs/wan2.1_t2v_1.3b.yaml`` (33 frames at 240x416, CFG 4.5,
LoRA rank 32, 20 steps of which 4 SDE), 4 videos (one prompt, G = 4), two iterations of rollout and
one update pass, each variant one ``flowdppo-video train`` process: native SDPA and flash attention
(where ``flash_attn`` imports and the device is CUDA), each plain and with ``model.compile``;
``native+snapshot`` with the report's KL-map snapshot at every iteration (``run.report_every: 1``, the
path a default run takes at iteration 0); ``native+2gpu``: two processes under torchrun, NCCL,
sequence parallelism 2 and ZeRO-3 (skipped with one line where fewer than 2 GPUs are present). Prints
per variant the videos/s, rollout and update seconds of the second (warm) iteration, the first
iteration's seconds (compilation included), peak GPU memory (``perf/peak_memory_gib``) beside the
planner's total (``flowdppo-video plan``), MFU (``perf/mfu``), whether ``model.compile`` compiled
(``perf/compiled_graphs``: Dynamo's graph count) and the KL-map snapshots written; writes
``OUT/gpu_check.json`` and ``OUT/gpu_check.md``.

``--size tiny`` (or ``GPU_CHECK_SIZE=tiny``): the family's tiny shapes at 9 frames of 32x32 on
whatever device there is, in seconds on a CPU (``tests/test_gpu_check.py`` runs it so this never
rots); on the CPU the peak memory column is the process's peak RSS. ``GPU_CHECK_VARIANTS`` picks
variants (comma-separated, of :data:`VARIANTS`).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

GiB = 2 ** 30
RECIPE = REPO / "configs" / "wan2.1_t2v_1.3b.yaml"
SHAPES = REPO / "configs" / "model_shapes" / "wan2.1_t2v_1.3b"
PROMPT = "a red ball rolls to the left across a wooden table"
VARIANTS = ["native", "native+compile", "flash", "flash+compile", "native+snapshot", "native+2gpu"]
# The 2-GPU variant's layout: both GPUs in one SP group, ZeRO-3 over them, NCCL.
TWO_GPU: dict[str, Any] = {"parallel": {"sequence_parallel": 2, "zero_stage": 3, "backend": "nccl"}}
# Over the recipe: one prompt of G = 4, one update pass, two iterations (the second is warm).
COMMON: dict[str, Any] = {
    "data": {"prompts": [PROMPT], "prompts_per_iteration": 1, "group_size": 4},
    "optim": {"inner_epochs": 1},
    "run": {"iterations": 2, "checkpoint_every": 100, "sample_every": 100, "num_sample_videos": 1,
            "report_every": 0, "tensorboard": False, "device": "auto"},
}
TINY: dict[str, Any] = {"video": {"num_frames": 9, "height": 32, "width": 32},
                        "sampler": {"num_steps": 4, "sde_steps": 2},
                        "data": {"group_size": 2}, "optim": {"minibatch_size": 2}}


def check_config(size: str, variant: str, run_dir: Path) -> dict[str, Any]:
    """The recipe with the check's overrides, ``model.init`` from the shapes folder (``full``) or
    the family's tiny shapes (``tiny``), and the variant's attention backend and compilation."""
    from flowdppo_video.runs.config import load_yaml, merge_trees
    from flowdppo_video.models import family

    cfg = load_yaml(RECIPE)
    fam = family(cfg["model"]["family"])
    init = copy.deepcopy(fam.tiny_init) if size == "tiny" else fam.init_from_folder(SHAPES)[0]
    cfg = merge_trees(cfg, copy.deepcopy(COMMON))        # copies: the constants stay as they are
    if size == "tiny":
        cfg = merge_trees(cfg, copy.deepcopy(TINY))
    cfg.pop("eval", None)
    cfg["model"].pop("path", None)
    backend, *flags = variant.split("+")
    cfg["model"].update(init=init, attention_backend=backend, compile="compile" in flags)
    if "snapshot" in flags or "2gpu" in flags:         # the KL-map snapshot at every iteration
        cfg["run"]["report_every"] = 1
    if "2gpu" in flags:
        cfg = merge_trees(cfg, copy.deepcopy(TWO_GPU))
    cfg["run"]["output_dir"] = str(run_dir)
    return cfg


def world(variant: str) -> int:
    """Processes (GPUs) a variant runs on."""
    return 2 if "2gpu" in variant.split("+") else 1


def available(variant: str) -> str | None:
    """Why ``variant`` cannot run here, or None."""
    import torch

    if variant.startswith("flash"):
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn is not importable"
        if not torch.cuda.is_available():
            return "no CUDA device"
    if world(variant) > 1:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < world(variant):
            return f"{n} GPU(s) here; needs {world(variant)} (torchrun, NCCL, SP 2, ZeRO-3)"
    return None


def run_variant(cfg: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    """One ``flowdppo-video train`` process: its last metrics row, first iteration, wall, peak RSS."""
    from flowdppo_video.runs.config import config_from_dict
    from flowdppo_video.commands.planner import plan_memory

    work.mkdir(parents=True, exist_ok=True)
    cfg_file = work / f"{name.replace('+', '_')}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    n = world(name)
    planned = plan_memory(config_from_dict(copy.deepcopy(cfg)), n).row("total").device
    argv = [sys.executable, "-m", "flowdppo_video", "train", "--config", str(cfg_file), "run.progress=false"]
    if n > 1:
        from flowdppo_video.parallel.groups import free_port

        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={free_port()}",
                "-m", "flowdppo_video.commands.train", "--config", str(cfg_file), "run.progress=false"]
    t0 = time.perf_counter()
    with open(work / f"{cfg_file.stem}.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (work / f"{cfg_file.stem}.log").read_text().strip().splitlines()[-3:]
        return {"error": " | ".join(tail), "wall_s": wall}
    run_dir = Path(cfg["run"]["output_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    last = rows[-1]
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2 ** 20, "planner_gib": planned / GiB,
            "first_iteration_s": rows[0].get("time/iteration_s", sum(rows[0].get(k, 0.0) for k in (
                "time/rollout_s", "time/reward_s", "time/update_s"))),
            "videos_per_s": last["perf/videos_per_s"], "rollout_s": last["time/rollout_s"],
            "update_s": last["time/update_s"], "peak_memory_gib": last.get("perf/peak_memory_gib"),
            "mfu": last.get("perf/mfu"), "tflops_per_gpu": last.get("perf/tflops_per_gpu"),
            "ratio_first_max_abs_log": last.get("ratio/first_max_abs_log"),
            "compile": bool(cfg["model"]["compile"]), "compiled_graphs": last.get("perf/compiled_graphs"),
            "klmaps": len(list((run_dir / "klmaps").glob("iter_*.npz")))}


def _gpu_name() -> str:
    """The first GPU's name from nvidia-smi: this process never creates a CUDA context (it would hold
    GPU memory beside the variants' processes)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    return out[0] if out else "unknown GPU"


def _f(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def compiled(r: dict[str, Any]) -> str:
    """The compiled column: ``off`` (not asked), or whether Dynamo compiled graphs (``NO``: it ran eagerly)."""
    if not r.get("compile"):
        return "off"
    graphs = r.get("compiled_graphs")
    return "n/a" if graphs is None else (f"yes ({graphs} graphs)" if graphs > 0 else "NO (0 graphs)")


def table(result: dict[str, Any]) -> str:
    mem = "peak GPU GiB" if result["device"].startswith("cuda") else "peak RSS GiB"
    lines = [f"| variant | videos/s | rollout s | update s | first iteration s | {mem} | planner GiB | MFU | "
             "compiled | KL maps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, r in result["variants"].items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {name} | {r.get('skipped') or 'failed: ' + r['error']} | | | | | | | | |")
            continue
        peak = r["peak_memory_gib"] if r["peak_memory_gib"] is not None else r["peak_rss_gib"]
        lines.append(f"| {name} | {r['videos_per_s']:.3f} | {r['rollout_s']:.1f} | {r['update_s']:.1f} | "
                     f"{r['first_iteration_s']:.1f} | {peak:.3g} | {r['planner_gib']:.3g} | {_f(r['mfu'], '.1%')} | "
                     f"{compiled(r)} | {r['klmaps']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["full", "tiny"], default=os.environ.get("GPU_CHECK_SIZE", "full"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get(
        "GPU_CHECK_OUT", REPO / "runs" / f"gpu_check-{datetime.now():%Y%m%d-%H%M%S}")))
    p.add_argument("--variants", default=os.environ.get("GPU_CHECK_VARIANTS", ",".join(VARIANTS)))
    a = p.parse_args(argv)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"GPU_CHECK_VARIANTS: unknown {unknown}; known: {VARIANTS}")
    if a.out.exists() and any(a.out.iterdir()):
        raise SystemExit(f"--out {a.out} exists and is not empty")
    device = f"cuda:0 ({_gpu_name()})" if torch.cuda.is_available() else "cpu"
    print(f"gpu_check: size {a.size}, device {device}, variants {names}, out {a.out}", flush=True)
    result: dict[str, Any] = {"size": a.size, "device": device, "torch": torch.__version__,
                              "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "variants": {}}
    t0 = time.perf_counter()
    for name in names:
        why = available(name)
        if why:
            print(f"  {name}: skipped ({why})", flush=True)
            result["variants"][name] = {"skipped": f"skipped: {why}"}
            continue
        cfg = check_config(a.size, name, a.out / name.replace("+", "_"))
        r = run_variant(cfg, a.out / "configs", name)
        result["variants"][name] = r
        print(f"  {name}: " + (f"failed ({r['error']})" if "error" in r else
                               f"{r['videos_per_s']:.3f} videos/s, update {r['update_s']:.1f} s, "
                               f"compiled {compiled(r)}, {r['klmaps']} KL maps, process {r['wall_s']:.0f} s"),
              flush=True)
    result["wall_s"] = time.perf_counter() - t0
    v = check_config(a.size, "native", a.out)
    result["setting"] = (f"{v['video']['num_frames']} frames at {v['video']['height']}x{v['video']['width']}, "
                         f"CFG {v['sampler']['guidance_scale']}, LoRA rank {v['model']['lora']['rank']}, "
                         f"{v['sampler']['num_steps']} steps ({v['sampler']['sde_steps']} SDE), "
                         f"{v['data']['group_size']} videos per iteration, {v['optim']['inner_epochs']} update pass")
    text = table(result)
    print(f"\n{result['setting']}; device {device}; {result['wall_s']:.0f} s in all\n{text}", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (a.out / "gpu_check.md").write_text(f"{result['setting']}; device {device}\n\n{text}\n")
    if not any("videos_per_s" in r for r in result["variants"].values()):
        raise SystemExit("gpu_check: no variant ran")
    return result


if __name__ == "__main__":
    main()
