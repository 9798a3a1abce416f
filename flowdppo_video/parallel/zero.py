"""DeepSpeed ZeRO (stages 1-3) for the update, behind the trainer's updater interface.

The trained experts go into one DeepSpeed engine (a ``ModuleList`` holding them), but nothing
ever calls ``engine(...)``: the adapter calls its transformers directly (``adapter.velocity``),
in the rollout, the replay and the reference. That works because ZeRO-3 puts its gather and
release hooks on *every* submodule, so each layer's weights are gathered as the layer runs,
wherever the call comes from. What ``engine.forward`` would otherwise do for the backward, this
module does itself (:meth:`ZeroUpdater.backward`). ZeRO-3's prefetch trace is never recorded
(the rollout, the replay and the reference call the layers in different orders): each layer is
gathered when it runs, not ahead.

Gradient accumulation belongs to the caller: DeepSpeed runs with
``managed_gradient_accumulation: false``, so ``backward`` only accumulates (never divides by the
accumulation steps, ``scale_wrt_gas=False``) and ``step`` is the boundary: average over ranks,
clip, and one optimizer step (skipped when the global gradient norm is not finite, as DeepSpeed
does). Frozen weights (a frozen expert, the base weights under LoRA) hold no optimizer state: a
frozen expert is not in the engine at all; under LoRA the trained expert's base weights are
partitioned with it (ZeRO-3) but only the adapters are optimized.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from flowdppo_video.runs.config import ConfigError, OptimConfig, ParallelConfig

from ..models.base import ModelError, VideoFlowAdapter

_TAG = "zero"                 # the engine checkpoint's folder inside the updater's directory
_PIN = -1                     # a module id no module has: keeps a ZeRO-3 parameter gathered ("full" rollouts)
# ZeRO-3 keeps parameters smaller than this gathered on every rank (DeepSpeed's default): they
# are too small to be worth a collective each. Tests and small benchmarks pass 0 to shard all.
DEFAULT_PERSISTENCE_THRESHOLD = 100_000


class _TrainedExperts(torch.nn.Module):
    """The experts that train, as one module for DeepSpeed. Never called: the adapter calls the
    experts themselves, and ZeRO-3's per-submodule hooks gather their weights as they run."""

    def __init__(self, experts: Iterable[torch.nn.Module]) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(experts)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the trained experts are called through the adapter, not the DeepSpeed engine")


def _storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the distinct storages behind ``tensors`` not yet in ``seen`` (views count once)."""
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def plain_memory(modules: Iterable[torch.nn.Module], params: list[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes one rank holds without ZeRO (``parallel.zero_stage=0``): every weight of ``modules``
    (the trained experts, frozen LoRA base included), a full gradient for each of ``params``
    (counted whether or not it exists right now: the update holds it between backward and step),
    and ``optimizer``'s state (AdamW: two moments per trained weight, after its first step).
    The same keys as :meth:`ZeroUpdater.memory`."""
    seen: set[int] = set()
    weights = _storage_bytes((p.data for m in modules for p in m.parameters()), seen)
    grads = sum(p.numel() * p.element_size() for p in params)
    state = _storage_bytes(_optimizer_tensors(optimizer), seen)
    return {"parameters": weights, "gradients": grads, "optimizer_state": state, "buffers": 0,
            "total": weights + grads + state}


def _skip_shm_comm_build() -> None:
    """On the CPU, DeepSpeed's communication wrapper compiles its shared-memory all-reduce (C++,
    minutes on a small machine, at first use) although only its inference path uses it; training
    talks through torch.distributed. Without it DeepSpeed falls back to torch.distributed."""
    # (`import deepspeed.comm.torch as m` would give the `torch` name deepspeed.comm re-exports.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _share_fp32_masters(opt: Any) -> None:
    """Let ZeRO-3 float32 parameter shards be their own master weights.

    DeepSpeed means to (``stage3.py``, ``_create_fp32_partitions``: "we don't need another copy of
    the weights") but compares a ``torch.device`` with a device-name string, which is never equal,
    so a float32 run keeps a second float32 copy of its shard: 1.25x the memory of parameters,
    gradients and moments. Point the masters at the shards, before the first step (the optimizer
    holds no state yet). bf16 shards keep their float32 masters.
    """
    lows = getattr(opt, "fp16_partitioned_groups_flat", None)
    highs = getattr(opt, "fp32_partitioned_groups_flat", None)
    if not lows or not highs or getattr(opt, "offload_optimizer", False) or opt.optimizer.state:
        return
    for i, (lo, hi) in enumerate(zip(lows, highs)):
        if lo is None or lo is hi or lo.dtype != hi.dtype or lo.device != hi.device or lo.shape != hi.shape:
            continue
        lo.ds_id = hi.ds_id
        lo.requires_grad = True              # as DeepSpeed sets its masters (its optimizer steps them)
        highs[i] = lo


def _check(adapter: VideoFlowAdapter, optim: OptimConfig, parallel: ParallelConfig, accumulation_steps: int) -> None:
    """Everything that can be said before importing DeepSpeed, one line each."""
    stage = parallel.zero_stage
    if stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={stage}: the DeepSpeed updater runs stages 1, 2 and 3 "
                          "(stage 0 is plain torch AdamW)")
    if accumulation_steps < 1:
        raise ConfigError(f"accumulation steps (sampler.sde_steps) must be >= 1, got {accumulation_steps}")
    dtype = adapter.dtype
    if dtype == torch.float16:
        # fp16 needs dynamic loss scaling, whose routine overflow skips would count as non-finite steps.
        raise ConfigError("parallel.zero_stage > 0 with model.dtype=float16 is not supported; use bfloat16 or float32")
    if (parallel.offload_optimizer or parallel.offload_params) and adapter.device.type != "cuda":
        which = "parallel.offload_optimizer" if parallel.offload_optimizer else "parallel.offload_params"
        raise ConfigError(f"{which} moves state from the GPU to the CPU, but the model runs on "
                          f"{adapter.device}; set it to false")
    if parallel.offload_params and stage != 3:
        raise ConfigError("parallel.offload_params needs parallel.zero_stage=3")
    if parallel.rollout_gather not in ("layer", "full"):
        raise ConfigError(f"parallel.rollout_gather={parallel.rollout_gather!r} is not one of layer, full")
    if not adapter.trainable_parameters():
        raise ModelError("nothing trains: the model has no trainable parameters for DeepSpeed")
    if not (dist.is_available() and dist.is_initialized()):
        raise ModelError(f"parallel.zero_stage={stage} needs an initialised process group (start with torchrun, "
                         "deepspeed or accelerate launch, or call parallel.groups.init_parallel first)")


class ZeroUpdater:
    """AdamW through a DeepSpeed ZeRO engine over the trained experts (``parallel.zero_stage`` 1-3).

    Per minibatch: :meth:`zero_grad`, :meth:`backward` once per SDE step (the caller scales the
    loss: ``/ S``, ``x SP degree``), then :meth:`step`. Every method that talks to other ranks must
    be called on all of them. ``persistence_threshold``: ZeRO-3 keeps parameters with fewer
    elements than this gathered on every rank (0: shard everything).
    """

    restores_weights = True       # load() restores the trained weights too (from the engine checkpoint)

    def __init__(self, adapter: VideoFlowAdapter, optim: OptimConfig, parallel: ParallelConfig,
                 accumulation_steps: int, persistence_threshold: int = DEFAULT_PERSISTENCE_THRESHOLD) -> None:
        _check(adapter, optim, parallel, accumulation_steps)
        try:
            import deepspeed
        except ImportError as e:
            raise ModelError(f"parallel.zero_stage={parallel.zero_stage} needs DeepSpeed ({e}); "
                             "pip install deepspeed") from None
        from deepspeed.runtime.engine import DeepSpeedEngine

        if not hasattr(DeepSpeedEngine, "managed_gradient_accumulation"):
            # Older engines always own the accumulation boundary and would step every S backward calls.
            raise ModelError(f"DeepSpeed {deepspeed.__version__} has no managed_gradient_accumulation=false, "
                             "which parallel.zero_stage > 0 needs (tested with 0.19.8); upgrade DeepSpeed")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)    # its INFO dumps the whole config per rank
        self._ds = deepspeed
        self.adapter = adapter
        self.stage = parallel.zero_stage
        self.rollout_gather = parallel.rollout_gather
        self.world = dist.get_world_size()
        self._experts = [adapter.experts[i] for i in adapter.trained]
        self.module = _TrainedExperts(self._experts)
        # One parameter group per trained expert, so an expert that got no gradient in a minibatch
        # (Wan 2.2 A14B: all its SDE steps went to the other one) can sit out the step.
        groups = [[p for p in e.parameters() if p.requires_grad] for e in self._experts]
        self.params: list[torch.nn.Parameter] = [p for g in groups for p in g]
        param_groups = [{"params": g} for g in groups if g]
        self._group_of_expert = {}
        for k, g in enumerate(groups):
            if g:
                self._group_of_expert[k] = len(self._group_of_expert)
        opt_kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
        if parallel.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(param_groups, adamw_mode=True, **opt_kwargs)
        else:
            optimizer = torch.optim.AdamW(param_groups, **opt_kwargs)
        largest = max(p.numel() for p in self.params)
        zero: dict[str, Any] = {
            "stage": self.stage,
            # The caller owns the accumulation boundary (managed_gradient_accumulation: false),
            # which DeepSpeed allows with overlap_comm only at stage 2; on the CPU there is no
            # stream to overlap with anyway.
            "overlap_comm": False,
            "contiguous_gradients": True,
            # Communication buckets: a few of the largest trained tensors, not DeepSpeed's 5e8
            # elements (2 GB in float32 per bucket for a LoRA run that trains a few MB).
            "reduce_bucket_size": int(min(5e8, max(4 * largest, 2**18))),
            "allgather_bucket_size": int(min(5e8, max(4 * largest, 2**18))),
        }
        if self.stage == 3:
            zero.update({"stage3_param_persistence_threshold": int(persistence_threshold),
                         "stage3_prefetch_bucket_size": int(min(5e8, max(4 * largest, 2**18)))})
        if parallel.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if parallel.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        # DeepSpeed's bf16 mode casts every parameter to bf16, LoRA's float32 adapters included (a
        # bf16 model keeps them float32, as one process does): it is on only when what trains is bf16.
        bf16 = any(p.dtype == torch.bfloat16 for p in self.params)
        config: dict[str, Any] = {
            # Bookkeeping only: one "micro batch" per backward call, S of them per step.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": int(accumulation_steps),
            "train_batch_size": int(accumulation_steps) * self.world,
            "managed_gradient_accumulation": False,
            "gradient_clipping": float(optim.grad_clip),          # 0 = off, as optim.grad_clip
            "zero_optimization": zero,
            # bf16: DeepSpeed keeps float32 master weights and optimizer state and skips a step
            # whose gradients are not finite (check_grad_overflow).
            "bf16": {"enabled": bf16, "check_grad_overflow": True},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": parallel.offload_optimizer,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        if adapter.device.type == "cpu":
            _skip_shm_comm_build()
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.module, optimizer=optimizer, config=config, dist_init_required=False)
        except (AssertionError, ValueError) as e:   # DeepSpeed's config checks
            raise ConfigError(f"DeepSpeed ZeRO stage {self.stage}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        if self.stage == 3:
            _share_fp32_masters(self.engine.optimizer)
        self._finite = True
        self._used = [False] * len(self._experts)
        # Which trained experts took part in a graph this minibatch (a forward with grad enabled).
        for k, e in enumerate(self._experts):
            e.register_forward_pre_hook(self._mark_used(k))

    # ------------------------------------------------------------------ helpers
    def _mark_used(self, k: int) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if torch.is_grad_enabled():
                self._used[k] = True
        return hook

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def _all(self, flags: list[bool], op: Any) -> list[bool]:
        """``flags`` combined over all ranks (``MIN``: all true; ``MAX``: any true)."""
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(t, op=op)
        return [bool(v) for v in t.tolist()]

    # ------------------------------------------------------------------ the update
    def zero_grad(self) -> None:
        """Start a minibatch: no gradients, no non-finite flag."""
        self.engine.optimizer.zero_grad(set_to_none=True)
        if self.stage == 3:
            # Accumulation partitions of parameters that get no gradient this minibatch would
            # otherwise keep the previous minibatch's values into the step.
            buf = getattr(self.engine.optimizer, "grad_partitions_flat_buffer", None)
            if buf is not None:
                buf.zero_()
        self._finite = True
        self._used = [False] * len(self._experts)

    def backward(self, loss: torch.Tensor) -> bool:
        """Accumulate the gradient of ``loss`` (already scaled by the caller; no hidden division).

        Collective: all ranks first agree that every rank's loss is finite. If one is not, no rank
        runs this backward, the minibatch is marked non-finite (``step`` then skips it) and this
        returns ``False`` on every rank: the caller should stop the minibatch's backward calls
        (all ranks get the same answer, so they stay in step). Otherwise returns ``True``.
        """
        finite = self._all([self._finite and bool(torch.isfinite(loss.detach()).all())], dist.ReduceOp.MIN)[0]
        if not finite:
            self._finite = False
            return False
        opt = self.engine.optimizer
        # What engine.forward and the hook on its output would do: start a new micro step
        # (ZeRO then adds to the accumulated partitions instead of overwriting them) and open
        # the backward (hook bookkeeping, the accumulation boundary flag).
        if hasattr(opt, "clear_backward_seen_flag"):
            opt.clear_backward_seen_flag()
        self.engine._backward_prologue()
        self.engine.backward(loss, scale_wrt_gas=False)
        return True

    def step(self) -> tuple[bool, float]:
        """Average over ranks, clip to ``optim.grad_clip``, step if the global gradient norm is
        finite. Returns ``(stepped, global grad norm before clipping)``, the same on every rank."""
        if not self._finite:                      # every rank knows: backward agreed on it
            self.zero_grad()
            return False, float("nan")
        used = self._all(self._used, dist.ReduceOp.MAX)
        inner = self.engine.optimizer.optimizer
        saved: list[tuple[dict[str, Any], float, float]] = []
        for k, u in enumerate(used):
            g = self._group_of_expert.get(k)
            if not u and g is not None:
                # An expert no graph reached sits the step out (torch AdamW skips parameters
                # without a gradient): no learning rate, no decay. Its moments still decay.
                group = inner.param_groups[g]
                saved.append((group, group["lr"], group["weight_decay"]))
                group["lr"], group["weight_decay"] = 0.0, 0.0
        try:
            self.engine.step()
        finally:
            for group, lr, wd in saved:
                group["lr"], group["weight_decay"] = lr, wd
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        stepped = bool(self.engine.was_step_applied()) and math.isfinite(norm)
        self._used = [False] * len(self._experts)
        return stepped, norm

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: Path) -> None:
        """Collective: every rank writes its shard of the optimizer state (and, stage 3, of the
        weights) under ``directory/zero``; frozen weights are not written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory), tag=_TAG, save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: Path) -> None:
        """Collective: restore the trained weights and optimizer state :meth:`save` wrote."""
        d = Path(directory) / _TAG
        if not d.is_dir():
            raise ModelError(f"{d} not found: the checkpoint holds no DeepSpeed ZeRO state "
                             f"(was it written with parallel.zero_stage={self.stage}?)")
        try:
            path, _ = self.engine.load_checkpoint(str(directory), tag=_TAG, load_module_strict=False,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        except (AssertionError, RuntimeError, KeyError, ValueError) as e:
            raise ModelError(f"{d}: could not load the DeepSpeed checkpoint ({str(e).splitlines()[0] if str(e) else e!r}); "
                             f"was it written with the same parallel.zero_stage and number of ranks?") from None
        if path is None:
            raise ModelError(f"{d}: could not load the DeepSpeed checkpoint")
        self.zero_grad()

    # ------------------------------------------------------------------ whole weights
    def _all_params(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters())

    def gathered(self, whole: bool = False) -> contextlib.AbstractContextManager[None]:
        """Collective: the trained parameters whole inside (ZeRO-3 gathers them; stages 1-2 hold them
        whole anyway), what ``adapter.save_trainable`` on rank 0 writes: every weight of a fully
        fine-tuned expert, only the adapters under LoRA, whose frozen base stays sharded (gathering
        it was ~28 GB per rank for a 14B LoRA run). ``whole``: every weight of the trained experts
        (``save_pretrained``). Changes made inside are not kept."""
        if self.stage != 3:
            return contextlib.nullcontext()
        return self._ds.zero.GatheredParameters(self.to_gather(whole), modifier_rank=None)

    def to_gather(self, whole: bool = False) -> list[torch.nn.Parameter]:
        """What :meth:`gathered` asks ZeRO-3 to gather: the trained parameters (under LoRA only the
        adapters, the frozen base stays sharded), or with ``whole`` every parameter of the model."""
        return self._all_params() if whole else list(self.params)

    @contextlib.contextmanager
    def rollout(self) -> Iterator[None]:
        """Collective: the rollout under ``parallel.rollout_gather``. ``layer``: nothing to do, each
        layer is gathered as it runs and released after. ``full``: the whole trained model is
        gathered once and kept until the end (memory of an unsharded model, one gather)."""
        if self.stage != 3 or self.rollout_gather == "layer":
            yield
            return
        params = self._all_params()
        with self._ds.zero.GatheredParameters(params, modifier_rank=None):
            # The per-layer hooks release a weight when no running module holds it; pin them all.
            for p in params:
                p.ds_active_sub_modules.add(_PIN)
            try:
                yield
            finally:
                for p in params:
                    p.ds_active_sub_modules.discard(_PIN)

    # ------------------------------------------------------------------ accounting
    def memory(self) -> dict[str, int]:
        """This rank's bytes of ``parameters`` (the trained experts' weights it holds: its shards
        under ZeRO-3, frozen LoRA base included), ``gradients`` (its accumulation buffer: a shard
        at stages 2-3), ``optimizer_state`` (moments, and float32 master weights where they are
        not the parameters themselves), ``buffers`` (communication buckets) and ``total`` (the
        first three). Wherever they live (offloaded state counts)."""
        opt = self.engine.optimizer
        seen: set[int] = set()
        if self.stage == 3:
            weights = _storage_bytes((getattr(p, "ds_tensor", p.data) for p in self._all_params()), seen)
        else:
            weights = _storage_bytes((p.data for p in self._all_params()), seen)
        inner = opt.optimizer
        masters = [p for g in inner.param_groups for p in g["params"]]
        if self.stage == 3:
            masters += list(getattr(opt, "fp32_partitioned_groups_flat", []))
        else:
            masters += list(getattr(opt, "single_partition_of_fp32_groups", []))
        state = _storage_bytes([*masters, *_optimizer_tensors(inner)], seen)
        if self.stage == 3:
            grads = _storage_bytes([getattr(opt, "grad_partitions_flat_buffer", None)], seen)
            buffers = _storage_bytes([b.buffer for b in getattr(opt, "ipg_buckets", {}).values()], seen)
        else:
            # Stages 1-2 keep no persistent gradient buffer of their own between steps: count what
            # the step holds (stage 2: this rank's partition; stage 1: a full gradient).
            part = sum(t.numel() * t.element_size() for t in getattr(opt, "single_partition_of_fp32_groups", []))
            full = sum(p.numel() * p.element_size() for p in self.params)
            grads = part if self.stage == 2 else full
            buffers = 0
        return {"parameters": weights, "gradients": grads, "optimizer_state": state, "buffers": buffers,
                "total": weights + grads + state}
