"""Typed run configuration: YAML files, dotted command-line overrides, checks on load.

Every field is documented where it is declared. An unknown key is an error that names the
key and the closest known one; nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowdppo_video.objectives import check_section as check_objective_section
from flowdppo_video.sde import TAIL_SOLVERS, sde_candidates
from rewards.artifacts import DEFAULT_MONITORS
from rewards.registry import RewardError, parse_reward_specs


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the key."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"      # run directory: config, metrics, samples, checkpoints
    seed: int = 0                         # seeds init, prompt order, rollout noise, shuffles
    iterations: int = 10                  # outer iterations (rollout -> rewards -> update)
    checkpoint_every: int = 1             # iterations between checkpoints (the last is always saved)
    keep_checkpoints: int = 2             # newest checkpoints kept on disk
    sample_every: int = 5                 # iterations between sample videos (first and last always)
    num_sample_videos: int = 4            # videos written per sample point
    max_nonfinite_in_row: int = 3         # stop after this many skipped non-finite steps in a row
    progress: bool = True                 # tqdm progress bars
    tensorboard: bool = True              # TensorBoard scalars under RUN_DIR/tensorboard
    device: str = "auto"                  # "auto" (cuda if present), "cpu", "cuda", "cuda:1", ...
    report_every: int = 20                # iterations between refreshes of RUN_DIR/report (HTML) and token-KL
                                          # snapshots (also the first and last iteration); 0 = no report
    wandb: bool = False                   # also log to Weights & Biases (optional package; offline unless
                                          # WANDB_MODE says otherwise)
    peak_tflops: float | None = None      # the GPU's dense peak for perf/mfu (null: flowdppo_video/training/perf.py's
                                          # table of H100/H200/A100/H20/L40S by the device's name)
    allow_foreign_files: bool = False     # start a new run in a folder holding files no run wrote (they stay;
                                          # a config.yaml there is replaced); false: such a folder is refused
    release_host_memory: bool = False     # glibc returns freed blocks of >= 128 KiB to the system at once, so a
                                          # CPU run's resident set follows its live tensors (the 1.3B update: 4.2
                                          # GiB, not 7.3), at 1.5x the time (ZeRO-3: 2.4x); runs/host_memory.py
    keep_best: str | None = None          # a held-out reward's name (eval.rewards, else rewards): the model
                                          # that scored it highest so far kept as checkpoints/best, with
                                          # best.json (training/best.py); null: off

    def validate(self) -> None:
        """The ``run`` section's own rules (one-line :class:`ConfigError` naming the key)."""
        _at_least_one(("run.iterations", self.iterations), ("run.checkpoint_every", self.checkpoint_every),
                      ("run.keep_checkpoints", self.keep_checkpoints),
                      ("run.max_nonfinite_in_row", self.max_nonfinite_in_row))
        _check_seed("run.seed", self.seed)
        _positive(("run.sample_every", self.sample_every))
        _non_negative(("run.num_sample_videos", self.num_sample_videos), ("run.report_every", self.report_every))


@dataclass
class LoraConfig:
    rank: int = 0                         # 0 = full fine-tuning; > 0 = peft LoRA of this rank
    alpha: float | None = None            # LoRA alpha (default: rank)
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init_seed: int = 0                    # seed for the adapters' initial weights

    def validate(self) -> None:
        """The ``model.lora`` section's own rules."""
        _check_seed("model.lora.init_seed", self.init_seed)
        if self.rank < 0:
            raise ConfigError(f"model.lora.rank must be >= 0, got {self.rank}")


@dataclass
class ModelConfig:
    family: str = "wan"                   # adapter family (see flowdppo_video.models)
    path: str | None = None               # local diffusers-format directory (model_index.json)
    init: dict[str, Any] | None = None    # or: build randomly from these sub-configs (tests, demos)
    init_seed: int = 0                    # seed for `init` weights
    dtype: str = "float32"                # transformer compute dtype: float32, bfloat16, float16
    max_sequence_length: int = 512        # text tokens per prompt (Wan: 512)
    gradient_checkpointing: bool = False  # recompute transformer blocks in the backward pass
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Wan 2.2 A14B: which experts train, of "high" (`transformer`, sigma >= boundary_ratio) and
    # "low" (`transformer_2`); null = all the model has. SDE steps are drawn only where one trains.
    train_experts: list[str] | None = None
    # Routing by noise level: the tuned weights denoise only where sigma >= base_below, the frozen
    # base model below it (rollouts, evaluation, `sample`, and the export as a two-expert Wan
    # pipeline with this boundary_ratio). SDE steps are drawn only above it. null = the tuned model
    # at every step. Full fine-tuning keeps a frozen copy of the transformer for it (LoRA: free).
    # The demo's window [0, 0.3] of 10 steps is sigma 1.0-0.8: base_below 0.75 tunes exactly those.
    base_below: float | None = None
    # HunyuanVideo: the embedded (distilled) guidance scale fed to the transformer, part of the
    # policy; null = the family's default (HunyuanVideo 6.0).
    embedded_guidance: float | None = None
    # Keep the text encoder(s) after the run's prompts are encoded (at its start, cached in
    # RUN_DIR/text_cache.safetensors): needed only when prompts change during a run.
    keep_text_encoder: bool = False
    # diffusers' attention dispatcher backend of the transformer(s): "native" (PyTorch SDPA), or
    # "flash", "sage", "_native_cudnn", ... where installed (see flowdppo_video/models/speed.py).
    attention_backend: str = "native"
    compile: bool = False                 # torch.compile each repeated transformer block (regional)
    # Families of several token streams (LTX-2: "video" and "audio"): streams sampled with the policy
    # but kept out of the objective (their tokens' log-probabilities and KL are not trained; the
    # KL share of each stream is still logged). [] = every stream trains.
    frozen_streams: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """The ``model`` section's own rules (its ``lora`` included)."""
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_seed("model.init_seed", self.init_seed)
        if self.path is None and self.init is None:
            raise ConfigError("model.path is not set: give a local diffusers-format directory "
                              "(or model.init to build a random model)")
        if self.path is not None and self.init is not None:
            raise ConfigError("set only one of model.path and model.init")
        te = self.train_experts
        if te is not None:
            if not te or len(set(te)) != len(te) or not set(te) <= {"high", "low"}:
                raise ConfigError(f"model.train_experts must be a non-empty list of distinct 'high' and 'low', got {te}")
        bb = self.base_below
        if bb is not None and not 0.0 < bb < 1.0:        # the typed loader has refused a non-number
            raise ConfigError(f"model.base_below must be a sigma in (0, 1) or null, got {bb!r}")
        if self.embedded_guidance is not None and not self.embedded_guidance > 0:
            raise ConfigError(f"model.embedded_guidance must be > 0, got {self.embedded_guidance}")
        self.lora.validate()


@dataclass
class DataConfig:
    prompts: str | list[str] = "configs/prompts/demo.txt"  # a text file (one prompt a line) or a list
    negative_prompt: str = ""             # unconditional prompt for classifier-free guidance
    prompts_per_iteration: int = 2        # P prompts per iteration
    group_size: int = 4                   # G samples per prompt (the advantage group)
    # Image-to-video models: one conditioning image per prompt: a file of image paths (one a line, in
    # prompt order, relative to the file), a folder of images named by prompt index (0.png, 1.png, ...)
    # or a list of paths (see flowdppo_video/runs/images.py).
    images: str | list[str] | None = None

    def validate(self) -> None:
        """The ``data`` section's own rules."""
        _at_least_one(("data.prompts_per_iteration", self.prompts_per_iteration))
        if self.group_size < 2:     # advantages are relative to the group: one video has nothing to compare
            raise ConfigError(f"data.group_size must be >= 2 (a group needs two videos to compare; with one, every "
                              f"advantage is zero and nothing trains), got {self.group_size}")


@dataclass
class VideoConfig:
    num_frames: int = 9                   # pixel frames (Wan VAE: 4k+1)
    height: int = 64                      # pixels
    width: int = 64                       # pixels
    fps: float = 8.0                      # frame rate: of written videos, of the rewards' time axis, and the
                                          # family's when it conditions on one (adapter.frame_rate)

    def validate(self) -> None:
        """The ``video`` section's own rules."""
        _at_least_one(("video.num_frames", self.num_frames), ("video.height", self.height), ("video.width", self.width))
        _positive(("video.fps", self.fps))


@dataclass
class SamplerConfig:
    kind: str = "flow_sde"                # "flow_sde" or "cps"
    eta: float = 0.7                      # noise level of SDE steps
    num_steps: int = 10                   # denoising steps K
    shift: float = 3.0                    # schedule shift (Wan: 3 at 480p, 5 at 720p)
    guidance_scale: float = 1.0           # classifier-free guidance w (1 = off); part of the policy
    guidance_scale_2: float | None = None  # Wan 2.2 A14B: w of the low-noise expert's steps (null = guidance_scale)
    sde_steps: int = 3                    # how many steps are SDE (policy) steps per rollout
    window: list[float] = field(default_factory=lambda: [0.0, 0.5])  # schedule fraction they come from
    batch_size: int = 0                   # videos per transformer call in the rollout (0 = all)
    cfg_batch: str = "auto"               # CFG rows: "joint" (one 2B call), "split" (two B calls), "auto"
    # Cheaper rollouts (docs/benchmarks.md, section rollout_cost). After the last SDE step the rest of the
    # schedule is a deterministic ODE whose only use is the video for the reward: finish it in tail_steps
    # steps of tail_solver ("euler"; "heun": 2 evaluations a step; "dpm2m": DPM-Solver++(2M), 1 a step).
    # null or 0 = the schedule's own steps (Euler). Evaluation keeps the full schedule (eval.sampler_tail).
    # The SDE steps, and so replay and the ratio, are unchanged.
    tail_steps: int | None = None
    tail_solver: str = "dpm2m"
    # A group's G videos start from one noise; the deterministic steps before the first SDE step run once
    # per group and the group branches into G at the first SDE step (children: same state and mean, own
    # noise). Training only; evaluation and `sample` draw independent noise.
    shared_noise: bool = False
    # With shared_noise: children per SDE step, one factor per step, product data.group_size (a tree:
    # [2, 2, 2] for G = 8; null = [G, 1, ...]). A leaf's log-probability holds its ancestors' steps.
    branching: list[int] | None = None

    def validate(self) -> None:
        """The ``sampler`` section's own rules, the SDE steps against the window's candidates included."""
        _check_choice("sampler.kind", self.kind, ("flow_sde", "cps"))
        _check_choice("sampler.cfg_batch", self.cfg_batch, ("auto", "joint", "split"))
        _at_least_one(("sampler.num_steps", self.num_steps), ("sampler.sde_steps", self.sde_steps))
        if len(self.window) != 2:
            raise ConfigError(f"sampler.window must be [start, end], got {self.window}")
        if self.eta <= 0:
            raise ConfigError(f"sampler.eta must be > 0 (SDE steps need noise), got {self.eta}")
        _positive(("sampler.shift", self.shift))
        _non_negative(("sampler.batch_size", self.batch_size))
        if self.kind == "cps" and self.eta > 1:
            raise ConfigError(f"sampler.eta={self.eta} > 1 is meaningless for cps (std = sigma' sin(eta pi/2))")
        try:
            n = len(sde_candidates(self.num_steps, tuple(self.window), self.kind))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.sde_steps > n:
            raise ConfigError(f"sampler.sde_steps={self.sde_steps} exceeds the {n} candidate steps in "
                              f"sampler.window {self.window} of {self.num_steps} steps")


@dataclass
class ObjectiveConfig:
    kind: str = "flow_dppo"               # a registered objective (flowdppo_video.objectives.OBJECTIVES):
                                          # "flow_dppo", "grpo_clip" or one of your own
    delta: float = 1e-5                   # Flow-DPPO KL threshold in nats per latent element, for every
                                          # granularity (SPEC section 3); 1e-5 with "sample" (the paper's rule
                                          # and value) is the knee of the shapes-world frontier at 4 inner
                                          # epochs (docs/trust_regions.md)
    granularity: str = "sample"           # "sample" (a (video, step) row's per-element mean KL decides, one
                                          # mean ratio per row), "row" (the same decision, each token's push
                                          # tested with its own ratio: fewer artifacts, more forgetting),
                                          # "token" (each token's own KL_n / D decides) or "row_gated" (the
                                          # token rule, only inside rows whose mean is past delta)
    normalize: str = "all"                # "all" terms or "kept" terms (kept: per SDE step and minibatch)
    clip_range: float = 1e-3              # grpo_clip epsilon
    beta: float = 0.0                     # weight of KL to the reference (base) model
    options: dict[str, Any] = field(default_factory=dict)  # keys of a registered objective of your own

    def validate(self) -> None:
        """The objective's registry checks its section: the kind, then the kind's own keys."""
        try:
            check_objective_section(self)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _positive(("objective.clip_range", self.clip_range))
        _non_negative(("objective.beta", self.beta), ("objective.delta", self.delta))


@dataclass
class AdvantageConfig:
    aggregation: str = "sum"              # "sum" (weighted sum, then group norm) or "gdpo"
    std: str = "group"                    # normalise by the group's std or the batch's
    clip: float = 5.0                     # advantages clipped to [-clip, clip]

    def validate(self) -> None:
        """The ``advantages`` section's own rules."""
        _check_choice("advantages.aggregation", self.aggregation, ("sum", "gdpo"))
        _check_choice("advantages.std", self.std, ("group", "batch"))
        _positive(("advantages.clip", self.clip))


@dataclass
class OptimConfig:
    lr: float = 1e-4                      # AdamW learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    grad_clip: float = 1.0                # max gradient norm (0 = off)
    inner_epochs: int = 1                 # passes over each rollout batch
    minibatch_size: int = 4               # videos per optimizer step

    def validate(self) -> None:
        """The ``optim`` section's own rules."""
        _at_least_one(("optim.minibatch_size", self.minibatch_size), ("optim.inner_epochs", self.inner_epochs))
        _positive(("optim.lr", self.lr))
        _non_negative(("optim.grad_clip", self.grad_clip))
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class EvalConfig:
    prompts: str | list[str] | None = None  # held-out prompts (file or list); None = no evaluation
    every: int = 5                        # iterations between evaluations (first and last always)
    samples_per_prompt: int = 1           # videos per prompt, fixed seeds (paired across iterations)
    seed: int = 1234                      # the evaluation noise seed
    rewards: dict[str, Any] = field(default_factory=dict)  # logged as eval/<name>/mean; {} = training rewards
    kl_to_base: bool = True               # measure KL(pi_theta || pi_base) on the evaluation rollouts
    num_videos: int = 8                   # videos kept per evaluation (before/after comparisons)
    images: str | list[str] | None = None  # image-to-video: one image per held-out prompt (as data.images)
    # Artifact monitors (rewards.artifacts, pixels only, ~0.1-0.3 s a 480p video) logged at every evaluation
    # as monitor/<name>/mean and /std: None = all of rewards.artifacts.DEFAULT_MONITORS, [] = none.
    monitors: list[str] | None = None
    monitor_period: int | None = None     # patch_grid's period in px; None = the model's VAE stride x patch
    sampler_tail: bool = False            # also finish evaluation rollouts with sampler.tail_steps (false: the
                                          # full schedule, so held-out numbers stay comparable across recipes)

    def validate(self) -> None:
        """The ``eval`` section's own rules (its rewards parsed, its monitors known)."""
        _at_least_one(("eval.every", self.every), ("eval.samples_per_prompt", self.samples_per_prompt))
        _check_seed("eval.seed", self.seed)
        _non_negative(("eval.num_videos", self.num_videos))
        if self.images is not None and self.prompts is None:
            raise ConfigError("eval.images is set but eval.prompts is not (one image per held-out prompt)")
        try:
            parse_reward_specs(self.rewards, "eval.rewards")
        except RewardError as e:
            raise ConfigError(str(e)) from None
        _check_monitors(self.monitors, self.monitor_period)


@dataclass
class ParallelConfig:
    """Multi-process layout. World = data-parallel x sequence-parallel ranks (from the launcher:
    torchrun, deepspeed or accelerate set RANK / WORLD_SIZE / LOCAL_RANK)."""

    sequence_parallel: int = 1            # Ulysses degree: ranks sharing one video's tokens (divides the
                                          # world size and the attention heads)
    zero_stage: int = 0                   # 0: torch AdamW, gradients averaged over ranks; 1-3: DeepSpeed ZeRO
    offload_optimizer: bool = False       # ZeRO: optimizer state (and its step) on the CPU
    offload_params: bool = False          # ZeRO-3: parameters on the CPU between uses
    rollout_gather: str = "layer"         # ZeRO-3 rollout: "layer" (each layer gathered as it runs) or "full"
                                          # (the whole trained model gathered once per rollout)
    zero_persistence_threshold: int = 100000  # ZeRO-3 keeps parameters smaller than this whole on every rank
                                          # (DeepSpeed's default; 0 shards everything)
    backend: str = "auto"                 # process-group backend: auto (nccl on CUDA, gloo on CPU), nccl, gloo
    timeout_s: float = 600.0              # a collective waiting longer than this ends the job with an error

    def validate(self) -> None:
        """The ``parallel`` section's own rules."""
        _check_choice("parallel.rollout_gather", self.rollout_gather, ("layer", "full"))
        _check_choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))
        if self.sequence_parallel < 1:
            raise ConfigError(f"parallel.sequence_parallel must be >= 1, got {self.sequence_parallel}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("parallel.offload_params needs parallel.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("parallel.offload_optimizer needs parallel.zero_stage 1, 2 or 3")
        if self.zero_persistence_threshold < 0:
            raise ConfigError(f"parallel.zero_persistence_threshold must be >= 0, got {self.zero_persistence_threshold}")
        if not self.timeout_s > 0:
            raise ConfigError(f"parallel.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rewards: dict[str, Any] = field(default_factory=lambda: {"frame_change": 1.0})  # name -> weight or {weight, ...}
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "Config":
        """Every section's own rules (each section's ``validate``), then the rules across sections.
        The first broken rule is a one-line :class:`ConfigError` naming its key."""
        # Before any range check: NaN compares false both ways, so `nan > 0` style checks would
        # name the wrong rule (or none), and an inf passes every `> 0`.
        _check_finite("", dataclasses.asdict(self))
        for section in (self.sampler, self.objective, self.advantages, self.model, self.parallel, self.run,
                        self.data, self.optim, self.eval, self.video):
            section.validate()
        if not self.rewards:
            raise ConfigError("rewards is empty: name at least one reward, e.g. rewards: {frame_change: 1.0}")
        try:
            parse_reward_specs(self.rewards, "rewards")
        except RewardError as e:
            raise ConfigError(str(e)) from None
        _check_rollout_options(self.sampler, self.data.group_size)   # the tree's factors against the group
        _check_keep_best(self.run.keep_best, self.eval, self.rewards)
        return self


def _check_keep_best(name: str | None, ev: EvalConfig, rewards: dict[str, Any]) -> None:
    """``run.keep_best`` names a reward the held-out evaluation scores (it needs one to pick by)."""
    if name is None:
        return
    if ev.prompts is None:
        raise ConfigError(f"run.keep_best={name}: needs a held-out evaluation to pick by (eval.prompts is not set)")
    scored = ev.rewards or rewards
    if name not in scored:
        raise ConfigError(f"run.keep_best={name}: not a reward the evaluation scores "
                          f"({'eval.rewards' if ev.rewards else 'rewards'}: {', '.join(map(str, scored))})")


def _name(key: Any) -> str:
    """A key as it goes into a message: as written, or quoted if it would break the line."""
    k = str(key)
    return k if k.isprintable() else repr(k)


MAX_SEED = 2 ** 32 - 1   # numpy's limit; prompt shuffles and generators derived from a seed stay in int64

# Keys where +inf means "off": objective.delta=.inf (no trust region), objective.clip_range=.inf (no clipping).
INF_ALLOWED = ("objective.delta", "objective.clip_range")


def _check_finite(key: str, value: Any) -> None:
    """A one-line error naming the first NaN or infinite number anywhere under ``value``
    (sections, lists, reward options, ``model.init`` sub-configs)."""
    if isinstance(value, float) and not math.isfinite(value) and not (value == math.inf and key in INF_ALLOWED):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(f"{key}.{_name(k)}" if key else _name(k), v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(f"{key}[{i}]", v)


def _check_rollout_options(s: SamplerConfig, group_size: int) -> None:
    """``sampler.tail_steps``, ``tail_solver``, ``shared_noise`` and ``branching`` (issue 34)."""
    _check_choice("sampler.tail_solver", s.tail_solver, TAIL_SOLVERS)
    if s.tail_steps is not None and s.tail_steps < 0:
        raise ConfigError(f"sampler.tail_steps must be >= 1 (or 0 / null for the full schedule), got {s.tail_steps}")
    if s.branching is None:
        return
    if not s.shared_noise:
        raise ConfigError("sampler.branching needs sampler.shared_noise=true (a tree starts from one noise)")
    if len(s.branching) != s.sde_steps or any(f < 1 for f in s.branching) or math.prod(s.branching) != group_size:
        raise ConfigError(f"sampler.branching must be {s.sde_steps} factors >= 1 (one per SDE step) whose product is "
                          f"data.group_size={group_size}, got {s.branching}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


def _check_seed(key: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:   # numpy takes 32-bit seeds; torch's and ours derive from them
        raise ConfigError(f"{key} must be an integer in [0, {MAX_SEED}], got {value}")


def _at_least_one(*pairs: tuple[str, Any]) -> None:
    for key, value in pairs:
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")


def _positive(*pairs: tuple[str, Any]) -> None:
    for key, value in pairs:
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")


def _non_negative(*pairs: tuple[str, Any]) -> None:
    for key, value in pairs:
        if not value >= 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; build nested dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key} has a bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _coerce(f"{key}.{_name(k)}", v, vt) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            near = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {prefix}{_name(k)}{hint}")
        kwargs[k] = _coerce(prefix + k, v, hints[k])
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=[x, y]"`` -> ``("a.b", ["x", "y"])``: the dotted key and its value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key.sub=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), (yaml.safe_load(raw) if raw.strip() else "")
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_error_line(e)})") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> nested dict; values are parsed as YAML."""
    return apply_overrides({}, items)


def _check_monitors(monitors: Any, period: Any) -> None:
    """``eval.monitors``: a list of known monitor names (or null); ``eval.monitor_period``: an integer >= 2."""
    if monitors is not None:
        if not isinstance(monitors, list) or not all(isinstance(m, str) for m in monitors):
            raise ConfigError(f"eval.monitors must be a list of monitor names (or null for all), got {monitors!r}")
        unknown = [m for m in monitors if m not in DEFAULT_MONITORS]
        if unknown:
            raise ConfigError(f"eval.monitors: unknown monitor {unknown[0]!r}; the monitors are "
                              f"{', '.join(DEFAULT_MONITORS)}")
    if period is not None and (isinstance(period, bool) or not isinstance(period, int) or period < 2):
        raise ConfigError(f"eval.monitor_period must be an integer >= 2 (pixels) or null, got {period!r}")


# Mappings that a layer above replaces whole instead of merging into: merging reward weights would
# keep rewards the user meant to drop (training `rewards` and `eval.rewards`).
REPLACED_WHOLE = ("rewards",)


def merge_trees(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``, as a recipe's ``base:`` chain and its overrides are: mappings merge
    key by key, anything else (and a ``rewards`` mapping) is replaced. Shallow: the result shares the
    inputs' values."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in REPLACED_WHOLE:
            out[k] = merge_trees(out[k], v)
        else:
            out[k] = v
    return out


def yaml_error_line(e: yaml.YAMLError) -> str:
    """A YAML error as one line that keeps where it is: ``line L, column C: problem``."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys of a mapping: a recipe's repeated block would drop the
    first silently. Here a repeated key is an error naming it and where it is."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                m = key_node.start_mark
                raise ConfigError(f"line {m.line + 1}, column {m.column + 1}: key {_name(key)!r} appears twice in "
                                  "one mapping (the second would replace the first)")
            if isinstance(key, (str, int, float, bool)):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        if _including:
            raise ConfigError(f"config file {_including[-1]}: base {p} does not exist")
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"config file {p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {yaml_error_line(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is unreadable: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    # `base: other.yaml` derives a recipe from a documented base.
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"config file {p}: base must be a file name, got {base!r}")
        chain = (*_including, p.resolve())
        target = (p.parent / base).resolve()
        if target in chain:   # a recipe that includes itself, directly or through others
            cycle = " -> ".join(str(c) for c in chain[chain.index(target):] + (target,))
            raise ConfigError(f"config file {p}: base includes form a cycle: {cycle}")
        data = merge_trees(load_yaml(target, chain), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or defaults), apply ``extra`` then dotted ``overrides``, validate."""
    data = load_yaml(path) if path is not None else {}
    if extra:
        data = merge_trees(data, extra)
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data)


def apply_overrides(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Dotted ``key=value`` overrides laid over ``data``, in order; ``data`` is not modified.

    An override sets the leaf it names and leaves its siblings alone, so ``rewards.world_colour=0.5``
    changes one weight of the recipe's rewards. A mapping given whole merges key by key
    (``model={path: x}``), except a ``rewards`` mapping, which replaces the old one
    (``rewards={a: 1.0}``: the rewards the user wrote, none of the recipe's)."""
    data = dict(data)
    for item in items:
        key, value = _parse_override(item)
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is not None and not isinstance(child, dict):
                raise ConfigError(f"override {_name(key)}: {_name(p)} is not a section")
            node[p] = dict(child or {})             # copied along the path: the caller's tree stays
            node = node[p]
        leaf = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(leaf), dict) and leaf not in REPLACED_WHOLE:
            node[leaf] = merge_trees(node[leaf], value)
        else:
            node[leaf] = value
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    return _from_dict(Config, data).validate()


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
