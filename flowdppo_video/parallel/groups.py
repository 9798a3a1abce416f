"""Process groups: world = data-parallel (DP) x sequence-parallel (SP) ranks.

Ranks ``[d * sp, (d + 1) * sp)`` form SP group ``d``: they hold the same videos, each a shard of
their tokens. Ranks with the same position inside their SP group form a DP group: they hold
different videos. Launchers (torchrun, deepspeed, accelerate launch) set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; a single process needs none of them.

A collective that waits longer than ``parallel.timeout_s`` (another rank died or hangs) raises
:class:`CollectiveTimeout` instead of blocking the job forever, on gloo. On NCCL the collectives are
asynchronous and the timeout is NCCL's watchdog thread's: it aborts the communicators and ends the
process (:data:`NCCL_WATCHDOG`), with its own log line naming the collective and the timeout, and the
launcher stops the other ranks. The one-line error would need ``TORCH_NCCL_BLOCKING_WAIT=1``: the CPU
waiting on every collective, which ZeRO-3's gathers cannot afford; it is left to the user.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from flowdppo_video.runs.config import ConfigError, ParallelConfig

T = TypeVar("T")

# Set before NCCL starts, unless the environment says otherwise: on a timeout or a failed collective
# the watchdog aborts the communicators and ends the process (1: tear down). torchrun sets the same,
# deepspeed and accelerate launchers need not, so every launcher behaves alike.
NCCL_WATCHDOG = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``parallel.timeout_s``: another rank failed or hangs."""


@dataclass
class ParallelState:
    """Where this process sits in the layout, and the groups it talks through."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sp: int = 1
    timeout_s: float = 600.0
    sp_group: Any = None                  # this rank's SP group (None when sp == 1)
    dp_group: Any = None                  # this rank's DP group (None when dp == 1)
    owns_process_group: bool = False
    _sp_ranks: list[int] = field(default_factory=list)

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def world_group(self) -> Any:
        """The default group of all ranks (None for one process)."""
        return dist.group.WORLD if self.distributed else None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files (metrics, videos, checkpoints' weights, the report)."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def guard(self, what: str, fn: Callable[[], T]) -> T:
        """Run a collective; turn a timeout or a vanished peer into one line naming the rank."""
        try:
            return fn()
        except (RuntimeError, dist.DistBackendError) as e:      # gloo/nccl timeouts and closed peers
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CollectiveTimeout(
                f"rank {self.rank}/{self.world}: {what} did not complete within parallel.timeout_s="
                f"{self.timeout_s:g} s or a peer left ({msg}); another rank failed or hangs, stopping") from None

    def all_gather_objects(self, obj: T, group: Any, what: str) -> list[T]:
        """``obj`` of every rank of ``group`` (a DP group: in DP rank order)."""
        if group is None:
            return [obj]
        out: list[Any] = [None] * dist.get_world_size(group)
        self.guard(what, lambda: dist.all_gather_object(out, obj, group=group))
        return out

    def all_reduce_(self, t: torch.Tensor, op: Any = None, what: str = "all-reduce") -> torch.Tensor:
        """In place over the whole world (SUM unless ``op``)."""
        if self.distributed:
            self.guard(what, lambda: dist.all_reduce(t, op=op or dist.ReduceOp.SUM))
        return t

    def all_true(self, flag: bool, what: str) -> bool:
        """Whether ``flag`` holds on every rank (so all ranks take the same branch)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._comm_device())
        self.all_reduce_(t, dist.ReduceOp.MIN, what)
        return bool(t.item())

    def barrier(self, what: str = "barrier") -> None:
        if self.distributed:
            self.guard(what, lambda: dist.barrier())

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Mean of every gradient over the world, as one flat buffer per dtype (few collectives).

        Each rank's loss is its share of the global minibatch mean times the SP degree, so the
        world mean is the sum over an SP group (each rank held a token shard) averaged over DP.
        """
        if not self.distributed:
            return
        # A parameter no step reached (a Wan 2.2 expert that took none of this minibatch's SDE steps)
        # has no gradient on any rank (the steps are drawn identically): it stays None, so AdamW
        # skips it as one process would.
        used = [p for p in params if p.grad is not None]
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in used:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            for bucket in _buckets(group, self.BUCKET_ELEMENTS):
                flat = torch.cat([p.grad.reshape(-1) for p in bucket])
                self.all_reduce_(flat, what="gradient all-reduce")
                flat /= self.world
                offset = 0
                for p in bucket:
                    n = p.grad.numel()
                    p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                    offset += n

    # Gradients go through the all-reduce in flat buffers of at most this many elements (one
    # collective per bucket, and never a second copy of all gradients at once).
    BUCKET_ELEMENTS = 64 * 2 ** 20

    def broadcast_object(self, obj: T, what: str) -> T:
        """Rank 0's ``obj`` on every rank (decisions that rank 0 makes from files it writes)."""
        if not self.distributed:
            return obj
        box = [obj]
        self.guard(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def _comm_device(self) -> torch.device:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by the launcher)") from None


def adopt_launcher_settings(cfg: ParallelConfig) -> ParallelConfig:
    """``accelerate launch`` with a DeepSpeed config passes its ZeRO stage and offload devices in
    ``ACCELERATE_DEEPSPEED_*`` variables: take them, unless the config says otherwise (an error)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return cfg
    raw = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if raw is None:
        return cfg
    try:
        stage = int(raw)
    except ValueError:
        raise ConfigError(f"ACCELERATE_DEEPSPEED_ZERO_STAGE={raw!r} (from accelerate launch) is not 0-3") from None
    if cfg.zero_stage not in (0, stage):
        raise ConfigError(f"parallel.zero_stage={cfg.zero_stage} but the accelerate DeepSpeed config says "
                          f"zero_stage {stage}: make them agree (or leave parallel.zero_stage at 0)")
    opt = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") == "cpu"
    par = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") == "cpu"
    return dataclasses.replace(cfg, zero_stage=stage, offload_optimizer=cfg.offload_optimizer or opt,
                               offload_params=cfg.offload_params or (par and stage == 3))


def init_parallel(cfg: ParallelConfig, device_type: str = "cpu") -> ParallelState:
    """Join the launcher's process group (or none for a single process) and build the DP and SP
    groups. ``device_type``: where the model runs (nccl needs CUDA; gloo works everywhere)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    sp = cfg.sequence_parallel
    if world % sp:
        raise ConfigError(f"parallel.sequence_parallel={sp} does not divide the world size {world}")
    if cfg.zero_stage and world == 1 and not dist.is_initialized():
        # DeepSpeed wants a process group even for one rank: make a private one.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    state = ParallelState(rank=rank, world=world, local_rank=local_rank, sp=sp, timeout_s=cfg.timeout_s)
    if world == 1 and not cfg.zero_stage:
        return state
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)      # collectives and object gathers use this rank's GPU
    if not dist.is_initialized():
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl" and device_type != "cuda":
            raise ConfigError("parallel.backend=nccl needs CUDA devices (run.device); use gloo on the CPU")
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError(f"WORLD_SIZE={world} but no MASTER_ADDR: start multi-process runs with torchrun, "
                              "deepspeed or accelerate launch")
        if backend == "nccl":
            for k, v in NCCL_WATCHDOG.items():
                os.environ.setdefault(k, v)
        try:
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=cfg.timeout_s))
        except Exception as e:  # the rendezvous failed: say where it tried
            raise CollectiveTimeout(
                f"rank {rank}/{world}: could not join the process group at {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')} within parallel.timeout_s={cfg.timeout_s:g} s "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        state.owns_process_group = True
    elif dist.get_world_size() != world:
        raise ConfigError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}")
    dp = world // sp
    timeout = datetime.timedelta(seconds=cfg.timeout_s)   # subgroups do not inherit it from the world
    # Every rank creates every group, in the same order (new_group is collective).
    for d in range(dp):
        ranks = list(range(d * sp, (d + 1) * sp))
        g = dist.new_group(ranks, timeout=timeout) if sp > 1 else None
        if rank in ranks:
            state.sp_group, state._sp_ranks = g, ranks
    for s in range(sp):
        ranks = list(range(s, world, sp))
        g = dist.new_group(ranks, timeout=timeout) if dp > 1 else None
        if rank in ranks:
            state.dp_group = g
    return state


def check_layout(par: ParallelState, data: Any, optim: Any, objective: Any) -> None:
    """Data-parallel ranks split prompts and minibatches evenly: a one-line :class:`ConfigError`
    naming the key if the ``data``, ``optim`` and ``objective`` sections do not allow it."""
    dp = par.dp
    if dp == 1:
        return
    if objective.normalize == "kept":
        # Each rank would divide by the kept count of its own part of the minibatch.
        raise ConfigError("objective.normalize=kept is per minibatch and would change with data-parallel "
                          f"ranks ({dp} here); use objective.normalize=all")
    b = data.prompts_per_iteration * data.group_size
    m = optim.minibatch_size
    if data.prompts_per_iteration % dp:
        raise ConfigError(f"data.prompts_per_iteration={data.prompts_per_iteration} must be divisible by "
                          f"the {dp} data-parallel ranks (world {par.world} / parallel.sequence_parallel {par.sp})")
    if m % dp or b % m:
        raise ConfigError(f"optim.minibatch_size={m} must be divisible by the {dp} data-parallel ranks and "
                          f"divide the batch of {b} videos")


def _buckets(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    out: list[list[torch.nn.Parameter]] = [[]]
    size = 0
    for p in params:
        if out[-1] and size + p.numel() > limit:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel()
    return [b for b in out if b]


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for ``bind(0)`` and outgoing connections (Linux's default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free TCP port on the loopback interface (for a local rendezvous), outside the kernel's
    ephemeral range: a port from ``bind(0)`` can be handed to another process's ``bind(0)`` or
    outgoing connection in the seconds before a launcher's store listens on it (seen in CI: a reward
    server took the port a DeepSpeed rendezvous had been given)."""
    low, high = ephemeral_port_range()
    candidates = [p for p in range(10000, 65536) if not low <= p <= high]
    rng = random.Random()                  # the system's entropy: processes started together differ
    for port in rng.sample(candidates, 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:             # everything tried is taken: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
