"""The benchmarks' shared setup in ``tools/bench``: the model size, the smoke size, the trainer and
its trajectory, the command lines of the update benchmarks and of the two-process ones.

The measuring itself (timing, memory, the machine, results, sections of ``docs/benchmarks.md``) is
the library's :mod:`flowdppo_video.commands.benchmarking`. The scripts next to this file import it as a
sibling module (``python tools/bench/x.py`` puts this folder first on ``sys.path``).
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle worker threads sleep instead of spinning. On a shared machine
# where another process holds a core, spinning threads make every parallel region wait for a
# descheduled peer (measured here: 2.7 s instead of 0.86 s per forward). Override by setting it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from flowdppo_video.commands import benchmarking as B
from flowdppo_video.runs.seeding import resolve_device

REPO = Path(__file__).resolve().parents[2]
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


def torch_device(name: str) -> torch.device:
    """``--device``: the library's rule (``auto`` is this process's GPU by ``LOCAL_RANK``, else the CPU)."""
    return resolve_device(name, int(os.environ.get("LOCAL_RANK", 0)))


def command_line() -> list[str]:
    """How this script was started, relative to the repository root: ``.venv/bin/python tools/bench/...``."""
    return B.command_line(REPO)


def git_commit() -> str:
    """The commit of this checkout (``+dirty`` with changes): the code a result measured."""
    return B.git_commit(REPO)


def probe_in_subprocess(script: Path, variant: str, extra: list[str] | None = None) -> dict[str, Any]:
    """:func:`flowdppo_video.commands.benchmarking.probe_in_subprocess`, passing ``--smoke`` on in a smoke run."""
    return B.probe_in_subprocess(script, variant, [*(extra or []), *smoke_args()])


def time_and_probe(script: Path, variants: dict[str, Callable[[], Any]], repeats: int, dev: torch.device,
                   device: str, traj: Any, workdir: Path, memory: bool
                   ) -> tuple[tuple[dict[str, list[float]], dict[str, Any]], dict[str, dict[str, Any]]]:
    """Time ``variants`` interleaved, then (with ``memory``) each variant's peak memory once in a
    fresh process of ``script`` replaying the same trajectory (saved under ``workdir``)."""
    print(f" timing (1 warm-up each, then {repeats} interleaved repeats)", flush=True)
    timed = B.time_interleaved(variants, repeats, dev)
    traj_file = workdir / "traj.pt"
    torch.save(traj, traj_file)
    mem: dict[str, dict[str, Any]] = {}
    if memory:
        print(" peak memory, each variant once in a fresh process", flush=True)
        for n in variants:
            mem[n] = probe_in_subprocess(script, n, ["--device", device, "--trajectory", str(traj_file)])
    return timed, mem


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
    from flowdppo_video.runs.config import config_from_dict
    from flowdppo_video.trainer import Trainer

    return Trainer(config_from_dict(trainer_config(output_dir, device, objective)))


def trajectory_for(trainer: Any, seed: int = 0) -> Any:
    """One rollout (no decoding) with the trainer's model and sampler."""
    from flowdppo_video.training.rollout import rollout

    cfg = trainer.cfg
    return rollout(trainer.adapter, [PROMPT], cfg.data.group_size, trainer.latent_shape, cfg.sampler,
                   torch.Generator().manual_seed(seed), negative_prompt=cfg.data.negative_prompt,
                   progress=False, decode=False)


def advantages_for(batch: int) -> torch.Tensor:
    """Alternating +1 / -1 advantages (a group with both signs)."""
    return torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(batch)])


# ---------------------------------------------------------------- the update benchmarks' entry point
VariantsFor = Callable[[Any, Any, torch.Tensor], dict[str, Callable[[], Any]]]


def trajectory_probe(variants_for: VariantsFor, variant: str, device: str, out: Path | None,
                     traj_file: Path) -> None:
    """Peak memory of one variant, in this (fresh) process, on a saved trajectory."""
    setup_torch()
    dev = torch_device(device)
    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(d, dev)
        traj = torch.load(traj_file, weights_only=False)
        variants = variants_for(trainer, traj, advantages_for(traj.batch_size))
        B.write_json(out, B.peak_memory_of(variants[variant], dev))


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


def build_bench_wan(seed: int = 0) -> Any:
    """The benchmarks' Wan (:data:`WAN_INIT`) on the CPU, set up for full fine-tuning."""
    from flowdppo_video.models.wan import WanAdapter

    a = WanAdapter.from_config(WAN_INIT, device=torch.device("cpu"), max_sequence_length=MAX_SEQUENCE_LENGTH,
                               seed=seed)
    a.enable_full_finetune(keep_reference=False)
    return a


# ---------------------------------------------------------------- the two-process benchmarks' entry point
DOCS_BENCHMARKS = REPO / "docs" / "benchmarks.md"


def two_process_main(doc: str, script: str | Path, worker: Callable[[argparse.Namespace], None],
                     report: Callable[[dict[str, Any], argparse.Namespace], None], argv: list[str] | None,
                     repeats: int, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                     check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None) -> int:
    """Command line of the ZeRO-3 and sequence-parallel benchmarks: ``script`` starts itself under
    torchrun (2 CPU ranks, gloo) as ``--worker``, which runs ``worker(args)``; ``--render JSON`` only
    rewrites the section from a saved result (``report(result, args)``). ``add_arguments`` adds a
    script's own options, ``check`` vets them (``parser.error``)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repeats", type=int, default=repeats, help="timed runs per variant (after one warm-up)")
    p.add_argument("--out", type=Path, default=None, help="write the result dict as JSON here")
    p.add_argument("--section", type=Path, default=DOCS_BENCHMARKS,
                   help="the markdown file whose section this benchmark writes (between its markers; "
                        "default docs/benchmarks.md; a new file holds the section alone)")
    if add_arguments is not None:
        add_arguments(p)
    p.add_argument("--device", default="cpu", help="cpu only (gloo)")
    p.add_argument("--smoke", action="store_true", help="smoke size (seconds; its numbers mean nothing): does it run?")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--render", type=Path, default=None, help="only rewrite the section from a saved --out JSON")
    args = p.parse_args(argv)
    if args.render is not None:
        report(json.loads(args.render.read_text()), argparse.Namespace(**{**vars(args), "out": None}))
        return 0
    if args.device != "cpu":
        p.error("this benchmark runs on the CPU (gloo, 2 processes)")
    if check is not None:
        check(p, args)
    if args.worker:
        if args.smoke:
            use_smoke_size()
            args.repeats = 1         # two processes start slowly: one repeat is enough to run every path
        worker(args)
        return 0
    return B.launch_two_ranks(script, list(argv if argv is not None else sys.argv[1:]), cwd=REPO)
