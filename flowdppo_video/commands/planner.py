"""``flowdppo-video plan``: the expected per-GPU memory of a training config, before any GPU.

Parameters are counted exactly from the model built on the meta device (no weights allocated:
from ``model.init``, from ``model.path``'s ``config.json`` files, or from ``--model-config DIR``,
a folder of them, e.g. ``configs/model_shapes/wan2.1_t2v_14b``), set up as training sets it up
(LoRA of ``model.lora.rank`` on ``model.lora.targets`` in float32, or full fine-tuning; the
frozen reference copy when ``objective.beta > 0`` or the evaluation measures KL to the base).

Layout (``parallel``): world = data-parallel x ``sequence_parallel``. ZeRO stage 1 shards the
optimizer state over the world, 2 also the gradients, 3 also the parameters of the training
experts (their frozen LoRA base weights included); ``offload_optimizer`` / ``offload_params``
move those to host memory (printed in their own column). Without ZeRO the optimizer is torch's
AdamW (two moments in the parameter's dtype and a float32 step per tensor); with ZeRO two float32
moments, plus float32 master weights for 16-bit trained parameters. Gradients are in the
parameter's dtype.

Activations: what one update minibatch keeps for backward through the transformer, for
``optim.minibatch_size`` videos per data-parallel rank, doubled under classifier-free guidance
(the conditional and unconditional forwards both feed the loss, whether they run as one joint
batch or two), at the config's token count; with and without ``model.gradient_checkpointing``
(with it: each block's input, plus one block re-run during backward). Sequence parallelism
divides the video tokens over its ranks (attention: all tokens, a shard of the heads). The
per-token formulas live beside the model families, in ``flowdppo_video.models.memory``. The
rollout's peak is the no-grad live set of one block for ``sampler.batch_size`` videos per call
(0: the rank's whole ``P x G`` batch), doubled by joint CFG.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from flowdppo_video import sde
from flowdppo_video.models.memory import activation_profile, parameter_parts, plan_adapter, text_tokens
from flowdppo_video.runs.config import Config, ConfigError, load_config
from flowdppo_video.training.run_builder import keeps_reference

GiB, MiB = 2 ** 30, 2 ** 20


@dataclasses.dataclass
class Row:
    """One line of the plan: ``device`` and ``host`` in bytes per GPU (per process); None = unknown."""

    name: str
    params: int | None
    dtype: str
    device: float | None
    host: float = 0.0
    note: str = ""


@dataclasses.dataclass
class Plan:
    header: list[str]
    rows: list[Row]
    notes: list[str]
    # Per GPU, the stages of a run one after the other (the start is staged, training/run_builder.py):
    # "encode" (the conditioning encoders alone, while the prompts are encoded; absent when
    # model.keep_text_encoder keeps them with the rest) and "train"; the total is their maximum.
    stages: dict[str, float] = dataclasses.field(default_factory=dict)

    def row(self, prefix: str) -> Row:
        """The first row whose name starts with ``prefix``."""
        for r in self.rows:
            if r.name.startswith(prefix):
                return r
        raise KeyError(prefix)


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    if b == 0:
        return "0"
    if b >= GiB:
        return f"{b / GiB:.2f} GiB"
    if b >= MiB:
        return f"{b / MiB:.1f} MiB"
    return f"{b / 1024:.1f} KiB"


def plan_memory(cfg: Config, world: int, model_config: str | Path | None = None) -> Plan:
    """The plan for ``cfg`` on ``world`` GPUs (see the module docstring)."""
    par = cfg.parallel
    sp = par.sequence_parallel
    if world < 1:
        raise ConfigError(f"--world must be >= 1, got {world}")
    if world % sp:
        raise ConfigError(f"--world {world} is not divisible by parallel.sequence_parallel={sp}")
    dp = world // sp
    adapter, missing = plan_adapter(cfg.model, model_config, keeps_reference(cfg))
    parts = parameter_parts(adapter, missing)
    trained_idx = list(adapter.trained)
    profiles = [activation_profile(adapter, i) for i in trained_idx]
    heads = profiles[0].heads
    if heads % sp:
        raise ConfigError(f"parallel.sequence_parallel={sp} does not divide the {heads} attention heads")

    z = par.zero_stage
    rows: list[Row] = []
    # ---- parameters
    trained = [t for p in parts if p.role == "trained" for t in p.tensors]
    for p in parts:
        if not p.counted:
            rows.append(Row(p.name, None, "-", None, 0.0, "no config.json for this part: not counted"))
            continue
        b = float(p.nbytes)
        engine = p.role in ("trained", "base")          # what the ZeRO engine holds
        if engine and z == 3:
            b /= world
        host = b if (engine and par.offload_params) else 0.0
        note = "sharded over the world (ZeRO-3)" if engine and z == 3 else ""
        if p.name in adapter.TEXT_ENCODERS and not cfg.model.keep_text_encoder:
            # Built alone at the start, released before the transformers are built (a staged start).
            b, note = 0.0, (f"built alone at the start to encode the prompts ({fmt_bytes(p.nbytes)}), released "
                            "before the transformers are built; model.keep_text_encoder keeps it")
        rows.append(Row(("trained: " if p.role == "trained" else "frozen: ") + p.name, p.numel,
                        p.dtypes, b - host, host, note))
    # ---- gradients
    g = float(sum(t.numel() * t.element_size() for t in trained))
    if z >= 2:
        g /= world
    rows.append(Row("gradients", sum(t.numel() for t in trained), _dtypes(trained), g, 0.0,
                    "sharded over the world (ZeRO-2/3)" if z >= 2 else ""))
    # ---- optimizer state
    if z == 0:
        opt = float(sum(2 * t.numel() * t.element_size() + 4 for t in trained))
        what = "AdamW: 2 moments in the parameter dtype + step"
    else:
        master = sum(t.numel() for t in trained if t.element_size() < 4)
        opt = (8.0 * sum(t.numel() for t in trained) + 4.0 * master) / world
        what = "2 float32 moments" + (" + float32 master weights" if master else "") + ", sharded over the world"
    host = opt if par.offload_optimizer else 0.0
    rows.append(Row("optimizer state", sum(t.numel() for t in trained), "float32" if z else _dtypes(trained),
                    opt - host, host, what))
    # ---- activations
    v = cfg.video
    adapter.frame_rate = v.fps                      # a family that conditions on it sizes its audio by it
    shape = adapter.latent_shape(v.num_frames, v.height, v.width)
    grid = token_streams(adapter, shape)
    pt, ph, pw = adapter.patch_size
    (_, tokens, d_video), rest = grid[0], grid[1:]
    # A second token stream (LTX-2's audio): replicated on every sequence-parallel rank (not divided).
    tokens_2 = sum(n for _, n, _ in rest)
    n_local = tokens / sp
    text = text_tokens(adapter)
    g2 = cfg.sampler.guidance_scale_2
    cfg_on = cfg.sampler.guidance_scale != 1.0 or (adapter.num_experts > 1 and g2 not in (None, 1.0))
    mult = 2 if cfg_on else 1
    mb = cfg.optim.minibatch_size * mult

    def act(ckpt: bool) -> tuple[float, float]:
        kept, rerun = 0.0, 0.0
        for pr in profiles:                              # the largest training expert
            base = (pr.block_inputs if ckpt else pr.blocks) + pr.outside
            k = mb * base.bytes(n_local, text, tokens_2)
            r = mb * pr.one_block.bytes(n_local, text, tokens_2) if ckpt else 0.0
            if k + r > kept + rerun:
                kept, rerun = k, r
        return kept, rerun

    off_k, _ = act(False)
    on_k, on_r = act(True)
    ck = cfg.model.gradient_checkpointing
    vids = f"{cfg.optim.minibatch_size} video(s){' x2 (CFG)' if mult == 2 else ''}"
    rows.append(Row("activations, update, no checkpointing" + (" *" if not ck else ""), None, "", off_k, 0.0,
                    f"{vids}, kept for backward"))
    rows.append(Row("activations, update, checkpointing" + (" *" if ck else ""), None, "", on_k + on_r, 0.0,
                    f"{fmt_bytes(on_k)} block inputs etc. + {fmt_bytes(on_r)} one block re-run"))
    per_rank = math.ceil(cfg.data.prompts_per_iteration * cfg.data.group_size / dp)
    roll_videos = min(cfg.sampler.batch_size, per_rank) if cfg.sampler.batch_size else per_rank
    joint = cfg.sampler.cfg_batch != "split"
    roll_b = roll_videos * (2 if (cfg_on and joint) else 1)
    roll = max(roll_b * pr.rollout_peak.bytes(n_local, text, tokens_2) for pr in profiles)
    rows.append(Row("activations, rollout peak (no grad)", None, "", roll, 0.0,
                    f"{roll_videos} video(s) per call{' x2 (joint CFG)' if roll_b > roll_videos else ''}"))
    # ---- totals
    static = sum(r.device or 0.0 for r in rows if not r.name.startswith("activations"))
    update = on_k + on_r if ck else off_k
    total = static + max(update, roll)
    # A staged start: the encoders alone (with the VAE for image-to-video, which encodes each prompt's
    # image), released before the transformers and the VAE are built; then training.
    stages = {"train": total}
    if not cfg.model.keep_text_encoder:
        stages = {"encode": encode_stage_bytes(adapter, parts), "train": total}
        rows.append(Row("start: the encoders alone, encoding the prompts", None, "", stages["encode"], 0.0,
                        "stage 1: no transformer is built yet; none at all when the run's text cache covers "
                        "the prompts"))
    peak = max(stages.values())
    rows.append(Row("total per GPU (config checkpointing; max of update, rollout)", None, "", peak,
                    sum(r.host for r in rows), f"the start is the peak: {fmt_bytes(stages['encode'])} while the "
                    "prompts are encoded" if stages.get("encode", 0.0) > total else "max of the stages, not their sum"
                    if "encode" in stages else ""))
    src = str(model_config) if model_config is not None else (cfg.model.path or "model.init")
    header = [
        f"model: {cfg.model.family} from {src}; dtype {cfg.model.dtype}; "
        + (f"LoRA rank {cfg.model.lora.rank} on {cfg.model.lora.targets}" if cfg.model.lora.rank else "full fine-tuning"),
        f"layout: world {world} = {dp} data-parallel x {sp} sequence-parallel; ZeRO stage {z}"
        + (", optimizer offloaded" if par.offload_optimizer else "") + (", parameters offloaded" if par.offload_params else ""),
        f"tokens: video {v.num_frames}x{v.height}x{v.width} -> latent {tuple(shape)} / patch {(pt, ph, pw)} = "
        f"{tokens} tokens per video of {d_video} elements ({n_local:g} per GPU), {text} text tokens"
        + "".join(f", {n} {name} tokens of {d} elements (not divided)" for name, n, d in rest),
    ]
    notes = [
        "* = the config's model.gradient_checkpointing; activations are per GPU for the update minibatch "
        "(optim.minibatch_size per data-parallel rank)",
        f"sequence parallel {sp}: activations divided over the sequence (attention: all tokens, a shard of "
        f"{heads // sp} of {heads} heads per GPU); text conditioning is not divided"
        + ("" if sp > 1 else " (off here)"),
        "not included: CUDA context and allocator fragmentation (~1-3 GiB), NCCL / all-to-all buffers, "
        "the VAE decode's peak, the trajectory buffers",
    ]
    if not cfg.model.keep_text_encoder:
        notes.append("text encoders: built alone at the start, released before the transformers and the VAE are "
                     "built (a run whose text cache covers its prompts builds none); the cached embeddings stay "
                     "on the host")
    if missing:
        notes.append(f"no config.json for {', '.join(missing)}: those rows are not counted")
    return Plan(header, rows, notes, stages)


def encode_stage_bytes(adapter: object, parts: list) -> float:
    """The first stage of a staged start: the conditioning encoders' parameters, and the VAE's for an
    image-to-video family (it encodes each prompt's image into its row); the transformers are not built."""
    names = set(getattr(adapter, "TEXT_ENCODERS", ())) | ({"vae"} if getattr(adapter, "takes_images", False) else set())
    return float(sum(p.nbytes for p in parts if p.counted and p.name in names))


def token_streams(adapter: Any, shape: tuple[int, ...]) -> list[tuple[str, int, int]]:
    """``(name, tokens, D)`` of each token stream of a latent (one: the video)."""
    tokens = adapter.token_map(shape)
    if isinstance(tokens, sde.TokenStreams):
        return [(s.name, s.tokens, s.elements) for s in tokens.streams]
    n, d = sde.patch_count((1, *shape), tokens)
    return [("video", n, d)]


def _dtypes(tensors: list[torch.Tensor]) -> str:
    names = sorted({str(t.dtype).replace("torch.", "") for t in tensors})
    return "/".join(names) if names else "-"


def format_plan(plan: Plan) -> str:
    width = max(len(r.name) for r in plan.rows)
    lines = list(plan.header) + [""]
    lines.append(f"{'':<{width}}  {'params':>14}  {'dtype':<16}  {'per GPU':>11}  {'host':>11}  note")
    for r in plan.rows:
        if r.name.startswith("total"):
            lines.append("-" * (width + 60))
        params = f"{r.params:,}" if r.params is not None else ""
        lines.append(f"{r.name:<{width}}  {params:>14}  {r.dtype:<16}  {fmt_bytes(r.device):>11}  "
                     f"{fmt_bytes(r.host) if r.host else '':>11}  {r.note}")
    lines.append("")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _plan_cmd(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    print(format_plan(plan_memory(cfg, args.world, args.model_config)))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="expected per-GPU memory of a config (no GPU, no weights needed)")
    p.add_argument("--config", required=True, help="YAML recipe")
    p.add_argument("--world", type=int, required=True, help="number of GPUs (processes)")
    p.add_argument("--model-config", metavar="DIR",
                   help="folder of <part>/config.json files standing in for model.path "
                        "(e.g. configs/model_shapes/wan2.1_t2v_14b)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.zero_stage=3")
    p.set_defaults(func=_plan_cmd)
