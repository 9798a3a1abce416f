"""Real-architecture dry run on the CPU (issue 19, item 1): a real-size model with random weights
through the normal CLI, phase by phase, each phase's wall time and peak resident memory beside the
memory planner's prediction for the same configuration.

    .venv/bin/python tools/bench/real_size.py                 # Wan 2.1 T2V 1.3B (~17 min on 2 cores, 13.4 GiB peak RSS)
    .venv/bin/python tools/bench/real_size.py --smoke --work /tmp/rs --out /tmp/rs.json   # tiny, seconds (CI)

The model is ``--model-config``'s ``<part>/config.json`` files (default
``configs/model_shapes/wan2.1_t2v_1.3b``) built with random weights in ``model.dtype`` (bf16),
trained with ``--recipe``'s settings (default ``configs/wan2.1_t2v_1.3b.yaml``) at a small size:
one prompt, G = 2, 9 frames at 128x128, 10 sampler steps of which 2 SDE, one update pass.

Phases, each one ``flowdppo-video`` process (``os.wait4`` gives its own peak RSS, ``ru_maxrss``):
``train`` (build, encode the prompts, release the text encoder, 1 iteration, checkpoint), ``resume``
(one more iteration from the checkpoint, text rows read from the cache), ``sample`` (one video, ODE),
``export`` (a diffusers directory, LoRA merged; a random model's encoder drawn and saved alone first)
and ``load`` (``diffusers.WanPipeline.from_pretrained`` of the export, its text encoder and a routed
model's second expert each read alone). The resident set of ``train`` is sampled every 0.2 s to show the
drop when the text encoder is released. The LoRA modules are counted from the checkpoint's adapter.
Each finished phase is kept in ``WORK/phases.json``: ``--resume`` continues at the first unfinished one.

``--section FILE`` writes the table with its generated reading into FILE as the model's section:
``real_size`` for Wan 2.1 1.3B (the default) and the smoke, ``real_size_<shape folder>`` for another model
(between ``<!-- section: NAME -->`` markers; ``--section docs/benchmarks.md`` replaces the committed one).
What people wrote about the numbers lives in the section ``real_size_notes``, which no run rewrites.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from flowdppo_video.commands.benchmarking import write_section

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SHAPES = "wan2.1_t2v_1.3b"            # configs/model_shapes/<this>: the model run when none is named

GiB = 2 ** 30
PROMPT = "a red ball rolls to the left across a wooden table"
# The dry run's size (the recipe keeps everything else: dtype, LoRA, CFG, eta, shift, objective).
SIZE: dict[str, Any] = {
    "data": {"prompts_per_iteration": 1, "group_size": 2},
    "video": {"num_frames": 9, "height": 128, "width": 128},
    "sampler": {"num_steps": 10, "sde_steps": 2, "batch_size": 0},
    "optim": {"inner_epochs": 1, "minibatch_size": 2},
}
SMOKE_SIZE: dict[str, Any] = {"video": {"num_frames": 5, "height": 32, "width": 32},
                              "sampler": {"num_steps": 4, "sde_steps": 2}}


def dry_run_config(recipe: Path, model_config: Path | None, run_dir: Path, smoke: bool) -> dict[str, Any]:
    """The recipe at the dry run's size, ``model.init`` read from ``model_config`` (the family's
    own reader) or, with ``smoke``, the family's tiny shapes."""
    from flowdppo_video.runs.config import load_yaml, merge_trees
    from flowdppo_video.models import family

    cfg = load_yaml(recipe)                   # the recipe with its `base:` chain merged
    fam = family(cfg["model"].get("family", "wan"))
    if smoke:
        init = copy.deepcopy(fam.tiny_init)
    else:
        init, missing = fam.init_from_folder(model_config)
        if missing:
            raise SystemExit(f"{model_config}: no config.json for {missing}")
    cfg = merge_trees(cfg, copy.deepcopy(SIZE))          # copies: the constants stay as they are
    if smoke:
        cfg = merge_trees(cfg, copy.deepcopy(SMOKE_SIZE))
    cfg["model"].pop("path", None)
    cfg["model"]["init"] = init
    cfg = merge_trees(cfg, {"run": {"output_dir": str(run_dir), "iterations": 1, "checkpoint_every": 1,
                                    "sample_every": 1, "num_sample_videos": 2, "device": "cpu",
                                    "tensorboard": False, "report_every": 0},
                            "data": {"prompts": [PROMPT]}})
    cfg.pop("eval", None)                     # no held-out evaluation: the phases are the CLI's own
    return cfg


# ---------------------------------------------------------------- the planner
def planner_figures(config_file: Path) -> dict[str, Any]:
    """The planner's rows for this configuration on one device, and what they add up to when every
    part lives in one memory (the CPU: nothing is offloaded). The start is staged: the encoders alone
    while the prompts are encoded, then the transformers, the VAE and training; the start's peak is
    the larger of the two, not their sum."""
    from flowdppo_video.runs.config import load_config
    from flowdppo_video.models.memory import parameter_parts, plan_adapter
    from flowdppo_video.commands.planner import format_plan, plan_memory

    cfg = load_config(config_file, [])
    plan = plan_memory(cfg, 1)
    adapter, missing = plan_adapter(cfg.model, None, cfg.objective.beta > 0)
    parts = {p.name: float(p.nbytes) for p in parameter_parts(adapter, missing) if p.counted}
    encoders = sum(b for n, b in parts.items() if n in adapter.TEXT_ENCODERS)
    update = plan.row("activations, update, checkpointing" if cfg.model.gradient_checkpointing
                      else "activations, update, no checkpointing").device or 0.0
    rollout = plan.row("activations, rollout peak").device or 0.0
    static = sum((r.device or 0.0) for r in plan.rows if not r.name.startswith(("activations", "total", "start")))
    all_params = sum(parts.values())
    encode = plan.stages.get("encode", 0.0)
    # The export merges every LoRA-wrapped layer in a copy of its own (the rest is shared); a model routed
    # by noise level also exports the base of expert 0 as a second expert, which the load check reads alone.
    from peft.tuners.tuners_utils import BaseTunerLayer

    def nbytes(params) -> float:
        return float(sum(p.numel() * p.element_size() for p in params))

    wrapped = [m for i in adapter.trained for m in adapter.experts[i].modules() if isinstance(m, BaseTunerLayer)]
    merged = nbytes(p for m in wrapped for p in m.get_base_layer().parameters())
    base = nbytes(p for n, p in adapter.experts[0].named_parameters() if "lora_" not in n)
    train = static + max(update, rollout)
    return {"text": format_plan(plan), "parts_bytes": parts, "encoder_bytes": encoders,
           "total_per_gpu": plan.row("total").device, "static_bytes": static, "update_bytes": update,
           "rollout_bytes": rollout,
           # One memory, a staged start: the encoders alone (encoding), then training without them.
           "cpu_encode": encode, "cpu_train": train, "cpu_start": max(encode, train),
           "cpu_all_parts": all_params, "cpu_inference": all_params - encoders + rollout,
           # The export and the load check are staged too: the encoders alone, then the rest.
           "cpu_export": max(encode, all_params - encoders + merged), "merged_bytes": merged,
           "cpu_load": max(encoders, all_params - encoders, base if cfg.model.base_below is not None else 0.0)}


# ---------------------------------------------------------------- one phase
def _rss_kb(pid: int) -> int | None:
    try:
        m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _run_phase(name: str, argv: list[str], log_dir: Path, every_s: float = 0.2,
              max_rss_gib: float | None = None) -> dict[str, Any]:
    """Run ``argv`` to its end; its wall time, own peak RSS (``ru_maxrss``), its RSS sampled every
    ``every_s`` and its output lines with their times (``log_dir/<name>.log``). A phase whose RSS
    passes ``max_rss_gib`` is killed (the machine must not run out of memory)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    print(f"\n== {name}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int]] = []
    done, killed = threading.Event(), []

    def poll() -> None:
        while not done.is_set():
            kb = _rss_kb(proc.pid)
            if kb is not None:
                samples.append((time.perf_counter() - t0, kb))
                if max_rss_gib is not None and kb * 1024 > max_rss_gib * GiB and not killed:
                    print(f"== {name}: resident set {kb / 2 ** 20:.1f} GiB > --max-rss-gib {max_rss_gib}: killed",
                          flush=True)
                    killed.append(kb * 1024)
                    proc.kill()
            done.wait(every_s)

    threading.Thread(target=poll, daemon=True).start()
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        for line in raw.rstrip("\n").split("\r"):
            if line.strip():
                lines.append((time.perf_counter() - t0, line))
        print(raw, end="", flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{name}.log").write_text("".join(f"{t:8.2f}  {s}\n" for t, s in lines))
    if proc.returncode != 0:
        # Where it stopped, kept: the peak, the resident set over time and the last lines (a model that does
        # not fit this machine is reported with the point it reached, not only the planner's figure).
        (log_dir / f"{name}.failed.json").write_text(json.dumps({
            "argv": argv, "rc": proc.returncode, "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024,
            "killed_above_bytes": killed[0] if killed else None, "max_rss_gib": max_rss_gib,
            "rss_samples": samples, "last_lines": lines[-40:]}))
        why = (f"killed at {killed[0] / GiB:.1f} GiB resident (--max-rss-gib {max_rss_gib})" if killed
               else f"rc {proc.returncode}")
        raise SystemExit(f"phase {name} failed ({why}, peak {usage.ru_maxrss / 2 ** 20:.2f} GiB); its output: "
                         f"{log_dir / (name + '.log')}, where it stopped: {log_dir / (name + '.failed.json')}")
    print(f"== {name}: {wall:.1f} s, peak RSS {usage.ru_maxrss / 2 ** 20:.2f} GiB", flush=True)
    return {"argv": argv, "wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "rss_samples": samples,
            "lines": lines}


def encoder_release(phase: dict[str, Any], window_s: float = 10.0) -> dict[str, Any] | None:
    """The resident set around the trainer's 'text encoder released' line (printed just after the
    release): within ``window_s`` before it, the highest sample (encoding) and the lowest one after
    that highest, up to a second past the line (released, before the rollout grows)."""
    return release_from(phase["lines"], phase["rss_samples"], window_s)


def release_from(lines: list[tuple[float, str]], samples: list[tuple[float, int]],
                 window_s: float = 10.0) -> dict[str, Any] | None:
    """:func:`encoder_release` on ``(seconds, line)`` and ``(seconds, RSS kB)`` lists."""
    hit = next(((t, s) for t, s in lines if "text encoder released" in s), None)
    if hit is None:
        return None
    at, line = hit
    near = [(t, kb) for t, kb in samples if at - window_s <= t <= at + 1.0]
    if not near:
        return None
    top = max(range(len(near)), key=lambda i: near[i][1])
    low = min(near[top:], key=lambda x: x[1])
    m = re.search(r"released \(([\d.]+) GiB\)", line)
    return {"at_s": at, "before_bytes": near[top][1] * 1024, "after_bytes": low[1] * 1024,
            "peak_before_bytes": max(kb for t, kb in samples if t <= at) * 1024,
            "reported_released_gib": float(m.group(1)) if m else None, "line": line.strip()}


def lora_modules(checkpoint: Path) -> dict[str, Any]:
    """The modules the checkpoint's LoRA adapter wraps (from its ``lora_A`` weights)."""
    from safetensors import safe_open

    names: list[str] = []
    for f in sorted((checkpoint / "model").rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names += [k.split(".lora_A")[0] for k in st.keys() if ".lora_A" in k]
    kinds: dict[str, int] = {}
    for n in names:
        kind = re.sub(r"^.*?blocks\.\d+\.", "", n)
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"count": len(names), "by_name": kinds, "first": sorted(names)[:4]}


LOAD_CHECK = """
import gc, importlib, json, sys, torch
from diffusers import WanPipeline
dtype = getattr(torch, sys.argv[2])
# The sum reads every weight: from_pretrained maps the files, and untouched pages are not resident.
def check(m):
    return {"class": type(m).__name__, "params": sum(p.numel() for p in m.parameters()),
            "dtypes": sorted({str(p.dtype).replace("torch.", "") for p in m.parameters()}),
            "finite": all(bool(p.sum(dtype=torch.float32).isfinite()) for p in m.parameters())}
# In steps, as the trainer's start: the pipeline without its text encoder (and without the second
# expert of a model routed by noise level: the base, as large as the first), then each of those alone.
index = json.load(open(sys.argv[1] + "/model_index.json"))
alone = [k for k in ("text_encoder", "transformer_2") if (index.get(k) or [None])[0] is not None]
pipe = WanPipeline.from_pretrained(sys.argv[1], torch_dtype=dtype, **{k: None for k in alone})
out = {k: check(m) for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
del pipe
for k in alone:
    gc.collect()
    lib, cls = index[k]
    kw = {"dtype": dtype} if lib == "transformers" else {"torch_dtype": dtype}
    m = getattr(importlib.import_module(lib), cls).from_pretrained(sys.argv[1] + "/" + k, **kw)
    out[k] = check(m)
    del m
print("LOADED " + json.dumps(out))
"""


# ---------------------------------------------------------------- the whole run
def dry_run(recipe: Path, model_config: Path | None, work: Path, smoke: bool, threads: int,
            max_rss_gib: float | None = None, resume: bool = False) -> dict[str, Any]:
    """The five phases in ``work``; each finished phase is kept in ``work/phases.json``, so ``resume``
    continues an interrupted dry run at its first unfinished phase (whose outputs start over)."""
    import torch

    run_dir, state = work / "run", work / "phases.json"
    phases: dict[str, Any] = {}
    if work.exists() and any(work.iterdir()):
        if not (resume and state.is_file()):
            raise SystemExit(f"--work {work} exists and is not empty"
                             + ("" if resume else " (--resume continues the dry run there)"))
        phases = json.loads(state.read_text())
    work.mkdir(parents=True, exist_ok=True)
    cfg = dry_run_config(recipe, model_config, run_dir, smoke)
    config_file = work / "dry_run.yaml"
    config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    plan = planner_figures(config_file)
    print(plan["text"], flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli = [sys.executable, "-m", "flowdppo_video"]
    logs = work / "logs"
    outputs = {"train": run_dir, "sample": work / "samples", "export": work / "export"}

    def run_phase(name: str, argv: list[str]) -> None:
        if name in phases:
            print(f"== {name}: finished before ({phases[name]['wall_s']:.1f} s), kept", flush=True)
            return
        if name in outputs:                   # an interrupted phase's outputs start over
            shutil.rmtree(outputs[name], ignore_errors=True)
        phases[name] = _run_phase(name, argv, logs, max_rss_gib=max_rss_gib)
        state.write_text(json.dumps(phases))

    run_phase("train", [*cli, "train", "--config", str(config_file)])
    first = sorted((run_dir / "checkpoints").iterdir())[-1]
    lora = lora_modules(first)
    print(f"LoRA: {lora['count']} modules wrapped {lora['by_name']}, e.g. {lora['first']}", flush=True)
    run_phase("resume", [*cli, "train", "--resume", str(run_dir), "run.iterations=2"])
    run_phase("sample", [*cli, "sample", "--run", str(run_dir), "--out", str(work / "samples"), "--num", "1"])
    run_phase("export", [*cli, "export", "--run", str(run_dir), "--out", str(work / "export")])
    run_phase("load", [sys.executable, "-c", LOAD_CHECK, str(work / "export"), cfg["model"]["dtype"]])
    loaded = json.loads(next(s for _, s in phases["load"]["lines"] if s.startswith("LOADED "))[len("LOADED "):])
    metrics = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r.strip()]
    # resume and sample read the run's text cache (no encoder); the export of a model.init run draws
    # the encoders alone (they exist nowhere else) and saves them, then the denoiser.
    predicted = {"train": plan["cpu_start"], "resume": plan["cpu_train"], "sample": plan["cpu_inference"],
                 "export": plan["cpu_export"], "load": plan["cpu_load"]}
    export_bytes = sum(f.stat().st_size for f in (work / "export").rglob("*") if f.is_file())
    return {
        "name": "real_size", "smoke": smoke, "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([".venv/bin/python", "tools/bench/real_size.py", *sys.argv[1:]]),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),
        "machine": {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "omp_threads": os.environ["OMP_NUM_THREADS"],
                    "torch": torch.__version__, "loadavg_at_end": list(os.getloadavg())},
        "model_config": None if smoke else str(model_config), "recipe": str(recipe),
        "config": {k: cfg[k] for k in ("model", "data", "video", "sampler", "objective", "optim") if k in cfg},
        "phases": {n: {"wall_s": p["wall_s"], "peak_rss_bytes": p["peak_rss_bytes"],
                       "planner_bytes": predicted[n], "argv": p["argv"]} for n, p in phases.items()},
        "encoder_release": encoder_release(phases["train"]),
        "rss_timeline_train": phases["train"]["rss_samples"][::5],
        "iterations": [{k: v for k, v in r.items() if k.startswith(("time/", "perf/", "reward/mean", "kl/mean",
                                                                        "ratio/first", "iteration", "loss"))}
                       for r in metrics],
        "lora": lora, "export": {"bytes": export_bytes, "loaded": loaded},
        "planner": {k: v for k, v in plan.items() if k != "text"}, "planner_text": plan["text"],
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _rel(p: str) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return p


def _gib(b: float | None) -> str:
    from flowdppo_video.commands.planner import fmt_bytes

    return fmt_bytes(b)


WHAT = {"train": "build, encode prompts, release encoder, 1 iteration, checkpoint",
        "resume": "build, read the text cache, 1 more iteration, checkpoint",
        "sample": "`sample`: build, 1 video (10 ODE steps, CFG), decode",
        "export": "`export`: the encoder alone (drawn, saved, released), then the rest, merge LoRA, write",
        "load": "`WanPipeline.from_pretrained`, the encoder and a second expert each alone, every weight read"}
PLANNER_WHAT = {"train": "the larger stage of the start (the encoders alone, or training)",
                "resume": "training (the text cache covers the prompts: no encoder)",
                "sample": "every part but the encoders + rollout activations",
                "export": "the larger stage: the encoders alone, or every other part + the merged LoRA layers",
                "load": "the largest step: the encoders, every other part, or a routed model's base expert"}


def section_name(r: dict[str, Any]) -> str:
    """The document section a result of :func:`dry_run` is written to: one per model, so a run of one
    model never replaces another's table (nor the hand-written ``real_size_notes``)."""
    folder = Path(r["model_config"]).name if r["model_config"] else ""
    return "real_size" if folder in ("", DEFAULT_SHAPES) else f"real_size_{folder}"


def section(r: dict[str, Any]) -> str:
    """The markdown section of ``docs/benchmarks.md`` for a result of :func:`dry_run`."""
    p, rel, pl = r["phases"], r["encoder_release"], r["planner"]
    model = _rel(r["model_config"]) if r["model_config"] else "the family's tiny shapes (smoke)"
    name = Path(r["model_config"]).name if r["model_config"] else "tiny shapes (smoke)"
    lines = [f"## (h) Real architecture on the CPU: {name}, one iteration through the CLI", "",
             "```", r["command"], "```", "",
             f"- Model: `{model}` with random weights, transformer and UMT5 in "
             f"{r['config']['model']['dtype']}, VAE float32; recipe `{_rel(r['recipe'])}` at a small size: "
             f"1 prompt, G = {r['config']['data']['group_size']}, {r['config']['video']['num_frames']} frames at "
             f"{r['config']['video']['height']}x{r['config']['video']['width']}, "
             f"{r['config']['sampler']['num_steps']} steps ({r['config']['sampler']['sde_steps']} SDE), "
             f"CFG {r['config']['sampler'].get('guidance_scale')}, LoRA rank {r['config']['model']['lora']['rank']}, "
             f"{r['config']['model']['max_sequence_length']} text tokens, {r['config']['optim']['inner_epochs']} "
             "update pass.",
             f"- Machine: {r['machine']['cpu']}, {r['machine']['logical_cpus']} logical CPUs (shared with other "
             f"benchmarks; load average {', '.join(f'{x:.1f}' for x in r['machine']['loadavg_at_end'])} at the end), "
             f"OMP_NUM_THREADS={r['machine']['omp_threads']}, torch {r['machine']['torch']}; commit "
             f"{r['commit']}, finished {r['finished']}.",
             f"- LoRA wrapped **{r['lora']['count']} modules** ({', '.join(f'{k} x{v}' for k, v in r['lora']['by_name'].items())}), "
             f"e.g. `{r['lora']['first'][0]}`.",
             "- Peak RSS: each phase's own `ru_maxrss` (`os.wait4`). Planner: `flowdppo-video plan` for the same "
             "config (`--world 1`), its parts added up as one memory holds them on the CPU: "
             + "; ".join(f"{n}: {PLANNER_WHAT[n]}" for n in p) + ". It leaves out the Python/torch runtime "
             "(~0.3 GiB here), allocator slack and transients.", "",
             "| phase | what | wall s | peak RSS | planner |", "|---|---|---:|---:|---:|"]
    for n, v in p.items():
        lines.append(f"| {n} | {WHAT[n]} | {v['wall_s']:.0f} | {_gib(v['peak_rss_bytes'])} | {_gib(v['planner_bytes'])} |")
    lines.append("")
    its = r["iterations"]
    if its:
        lines.append("Inside the training phases (`metrics.jsonl`): " + "; ".join(
            f"iteration {i + 1}: rollout {it.get('time/rollout_s', float('nan')):.0f} s, update "
            f"{it.get('time/update_s', float('nan')):.0f} s, ratio/first_max_abs_log "
            f"{it.get('ratio/first_max_abs_log', float('nan')):.1e}" for i, it in enumerate(its)) + ".")
    if rel:
        lines.append(f"Text encoder released after encoding, {rel['at_s']:.0f} s into `train` (the encoder "
                     f"built alone with random weights, then encoding): resident set {_gib(rel['before_bytes'])} while encoding, "
                     f"{_gib(rel['after_bytes'])} after the release, a drop of "
                     f"{_gib(rel['before_bytes'] - rel['after_bytes'])} (phase peak before it "
                     f"{_gib(rel['peak_before_bytes'])}, while building); the trainer reports "
                     f"{rel['reported_released_gib']} GiB of parameters released (planner: {_gib(pl['encoder_bytes'])}).")
    lines.append(f"The export ({_gib(r['export']['bytes'])} on disk) loads with `WanPipeline.from_pretrained`: "
                 + ", ".join(f"{k} {v['class']} ({v['params'] / 1e9:.2f}B, {'/'.join(v['dtypes'])})"
                             for k, v in r["export"]["loaded"].items()) + ".")
    if "cpu_encode" in pl:
        lines.append(f"Planner: per-GPU total {_gib(pl['total_per_gpu'])}; the start is staged: the encoders alone "
                     f"{_gib(pl['cpu_encode'])}, then training {_gib(pl['cpu_train'])}, a peak of "
                     f"{_gib(pl['cpu_start'])} (every part together would be {_gib(pl['cpu_all_parts'])}).")
    else:                                       # a result from before the staged start
        lines.append(f"Planner: per-GPU total {_gib(pl['total_per_gpu'])} (training {_gib(pl['cpu_train'])} without the "
                     f"encoder; the start, every part, {_gib(pl['cpu_start'])}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=REPO / "configs" / "wan2.1_t2v_1.3b.yaml")
    p.add_argument("--model-config", type=Path, default=REPO / "configs" / "model_shapes" / DEFAULT_SHAPES)
    p.add_argument("--work", type=Path, default=None,
                   help="new folder for the run, samples, export and logs (default: runs/real_size/<shape folder>)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: WORK/result.json)")
    p.add_argument("--section", type=Path, default=None,
                   help="the markdown file whose section for this model this writes (e.g. docs/benchmarks.md)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the phases (unless set)")
    p.add_argument("--max-rss-gib", type=float, default=18.0, help="kill a phase whose resident set passes this")
    p.add_argument("--smoke", action="store_true", help="the family's tiny shapes: seconds (CI)")
    p.add_argument("--from-json", type=Path, default=None, help="rewrite --section from a stored result; no run")
    p.add_argument("--resume", action="store_true", help="continue the dry run in --work at its first unfinished phase")
    a = p.parse_args(argv)
    if a.from_json:
        r = json.loads(a.from_json.read_text())
        if a.section:
            write_section(a.section, section_name(r), section(r))
        return r
    a.work = a.work or REPO / "runs" / "real_size" / a.model_config.name
    r = dry_run(a.recipe, a.model_config, a.work, a.smoke, a.threads, a.max_rss_gib, a.resume)
    text = section(r)
    print("\n" + text)
    out = a.out or a.work / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))
    if a.section:
        write_section(a.section, section_name(r), text)
    return r


if __name__ == "__main__":
    main()
