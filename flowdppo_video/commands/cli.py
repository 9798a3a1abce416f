"""``flowdppo-video``: train, sample, export, score, serve-rewards, report, eval, plan."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from flowdppo_video.exceptions import ModelError, TrainingError
from flowdppo_video.parallel.groups import CollectiveTimeout
from flowdppo_video.reporting import eval_checkpoints, report
from flowdppo_video.reporting.run_summary import summary_lines
from flowdppo_video.runs.config import ConfigError, load_config
from flowdppo_video.runs.data import DataError
from flowdppo_video.runs.fsio import check_new_output, os_error_line
from flowdppo_video.runs.run_dir import check_resume_dir, require_run_dir
from flowdppo_video.trainer import Trainer
from flowdppo_video.training.checkpoint import latest_checkpoint, load_checkpoint
from flowdppo_video.training.metrics import read_metrics
from flowdppo_video.training.run_builder import build_export_model, open_run
from rewards import RewardError

from . import planner, scoring, serve
from .sample import run_sample

DEFAULT_RECIPE = Path(__file__).parents[1] / "recipes" / "default.yaml"
# The errors a user can cause: the CLI prints each as one line (exit status 2).
USER_ERRORS = (ConfigError, DataError, ModelError, RewardError, TrainingError, CollectiveTimeout)


def _train(args: argparse.Namespace) -> None:
    if args.resume:
        run_dir = Path(args.resume)
        if args.config:
            raise ConfigError("give --config or --resume, not both: a resumed run uses its own config.yaml "
                              "(change it with dotted overrides)")
        cfg = load_config(require_run_dir(run_dir, "--resume"), args.overrides,
                          extra={"run": {"output_dir": str(run_dir)}})
        check_resume_dir(run_dir, cfg.run.output_dir)      # run.output_dir=B would mix two runs
    else:
        cfg = load_config(args.config or DEFAULT_RECIPE, args.overrides)
    trainer = Trainer(cfg, resume=bool(args.resume))
    try:
        rows = trainer.run()
    finally:
        trainer.close()
    if not trainer.is_main:                 # rank 0 reports
        return
    run_dir = Path(cfg.run.output_dir)
    print("\n".join(summary_lines(run_dir, rows, read_metrics(run_dir, "eval"))))


def _sample(args: argparse.Namespace) -> None:
    run_sample(args)


def _export(args: argparse.Namespace) -> None:
    """A run's checkpoint as a diffusers directory (LoRA merged) or as its LoRA adapter alone."""

    run_dir = Path(args.run)
    cfg = open_run(run_dir, args.overrides)
    ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run_dir)
    if ckpt is None or not (ckpt / "model").is_dir():
        raise ConfigError(f"--checkpoint: no checkpoint at {ckpt or run_dir / 'checkpoints'}")
    out = Path(args.out)
    check_new_output(out, "--out")
    if args.lora:
        if cfg.model.lora.rank == 0:
            raise ConfigError(f"--lora: the run in {run_dir} fine-tuned the whole transformer (model.lora.rank=0)")
        if cfg.model.base_below is not None:
            print(f"note: the run routes by noise level (model.base_below={cfg.model.base_below}): apply the adapter "
                  "only at sigma >= that boundary, or export without --lora for a two-expert pipeline that does")
        shutil.copytree(ckpt / "model", out, dirs_exist_ok=True)   # peft adapter files per expert
        print(f"wrote the LoRA adapter of {ckpt} to {out}")
        return
    # The weights only, the encoders never beside the transformers: a model.path model's encoder
    # folders are copied from it unchanged; a model.init one's are drawn alone and staged in OUT.
    staging = out / ".encoders"
    adapter = build_export_model(cfg, staging)
    load_checkpoint(ckpt, adapter, None)
    adapter.save_pretrained(out)
    shutil.rmtree(staging, ignore_errors=True)
    how = "LoRA merged" if cfg.model.lora.rank else "full weights"
    if cfg.model.base_below is not None:       # routing by noise level travels as Wan 2.2's two-expert layout
        how += (f"; routed by noise level: transformer above sigma {cfg.model.base_below}, the base model as "
                "transformer_2 below (boundary_ratio)")
    print(f"wrote {ckpt} as a diffusers directory to {out} ({how})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowdppo-video", description="Online RL for text-to-video flow models.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (no --config: the embedded default run)")
    t.add_argument("--config", help="YAML recipe (default: the packaged default run)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 run.iterations=20")
    t.set_defaults(func=_train)
    s = sub.add_parser("sample", help="generate videos from a run's checkpoint (writes NNN.mp4 and index.json)")
    s.add_argument("--run", required=True, help="run directory")
    s.add_argument("--checkpoint", help="checkpoint directory (default: the run's latest; 'base': no weights)")
    s.add_argument("--prompts", metavar="SPEC", help="train (default) or heldout: the run's prompts, either with "
                   ":INDICES for a subset (heldout:0-3,7); bare INDICES of the training prompts; or a prompt file")
    s.add_argument("--out", required=True, help="output folder for mp4 files and index.json")
    s.add_argument("--num", type=scoring.bounded_int("--num", 1, 1024), default=1, metavar="N",
                   help="videos per prompt (default 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sde", action="store_true", help="sample with the training SDE steps (default: ODE)")
    s.add_argument("overrides", nargs="*", help="dotted overrides of the run's config")
    s.set_defaults(func=_sample)
    x = sub.add_parser("export", help="write a run's checkpoint as a diffusers directory (or its LoRA adapter)")
    x.add_argument("--run", required=True, help="run directory")
    x.add_argument("--checkpoint", help="checkpoint directory (default: the run's latest)")
    x.add_argument("--out", required=True, help="new folder for the export")
    x.add_argument("--lora", action="store_true", help="only the LoRA adapter (peft safetensors), not a merged model")
    x.add_argument("overrides", nargs="*", help="dotted overrides of the run's config")
    x.set_defaults(func=_export)
    serve.add_parser(sub)
    scoring.add_parser(sub)
    report.add_parser(sub)
    eval_checkpoints.add_parser(sub)
    planner.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"flowdppo-video: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # disk full, read-only, permissions, missing: expected, one line naming the path
        # An error that names no file (av, a write() on a full disk) names the command's output.
        print(f"flowdppo-video: error: {os_error_line(e, getattr(args, 'out', None))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowdppo-video: interrupted; metrics and checkpoints written so far are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
