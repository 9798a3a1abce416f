"""Ulysses sequence parallelism, applied to a built transformer from outside.

The ``degree`` ranks of a sequence-parallel (SP) group hold the same videos; each keeps ``1/degree``
of their tokens from the first transformer block to the output projection. Attention is the only
place where tokens meet: there an all-to-all turns ``(B, N/sp, H, d)`` token shards into
``(B, N, H/sp, d)`` head shards, each rank attends over the whole sequence with its own heads, and
the inverse all-to-all brings the tokens back (DeepSpeed-Ulysses). Text conditioning is replicated
on every rank: cross-attention to it needs no communication, and in joint attention (video tokens
followed by text tokens in one sequence) each rank takes its heads of the text, whose outputs are
gathered over heads afterwards.

A sequence length the degree does not divide is padded to a multiple; the padded keys are masked
out of every attention and the padding is stripped after the final gather, so results are exact.

Gradient convention. Every rank computes the same loss from the gathered output. The gather's
backward keeps the rank's slice of the incoming gradient and the first shard scatters it back into
zeros, so each rank's parameter gradients are the contributions of its own tokens (replicated
tensors carry partial gradients); the caller sums gradients over the SP group (the trainer scales
the loss by the degree and averages over the world).

This module knows no model family: each family gives a :class:`~flowdppo_video.models.base.SequenceParallelPlan`
(plain data: where its model flattens tokens and projects them out, its rotary module, which
attention goes through the all-to-all and which stays replicated), and :func:`apply_sequence_parallel`
installs it from outside with :class:`SequenceParallel`'s hooks and :class:`UlyssesAttnProcessor`.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import math
import types
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..exceptions import ModelError
from ..models.base import SequenceParallelPlan, VideoFlowAdapter
from ..models.speed import mask_alternative


# ---------------------------------------------------------------------------- collectives with autograd
def _group_size(group: Any) -> int:
    return dist.get_world_size(group)


def _all_to_all(x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Chunk ``j`` of ``x`` along ``scatter_dim`` goes to rank ``j``; the received chunks are
    concatenated along ``gather_dim`` in rank order."""
    n = _group_size(group)
    send = torch.stack(x.tensor_split(n, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def _all_gather(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(_group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _AllToAll(torch.autograd.Function):
    """Forward: all-to-all ``scatter_dim`` -> ``gather_dim``; backward: the inverse all-to-all."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.group, gather_dim, scatter_dim), None, None, None


class _GatherKeepSlice(torch.autograd.Function):
    """Forward: all-gather along ``dim``; backward: this rank's slice of the gradient.

    For outputs every rank turns into the same loss: each rank's gradient of the gathered tensor is
    already the whole gradient, and the slice is what its own shard contributed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        rank, n = dist.get_rank(ctx.group), _group_size(ctx.group)
        return grad.tensor_split(n, dim=ctx.dim)[rank].contiguous(), None, None


class _GatherReduceSlice(_GatherKeepSlice):
    """Forward: all-gather along ``dim``; backward: the gradient summed over the group, sliced.

    For a replicated result (the text stream) whose gradient on each rank is partial: the rank's
    slice needs every rank's part of it."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank, n = dist.get_rank(ctx.group), _group_size(ctx.group)
        return grad.tensor_split(n, dim=ctx.dim)[rank].contiguous(), None, None


class _Shard(torch.autograd.Function):
    """Forward: this rank's slice along ``dim`` (length divisible by the degree); backward: the
    gradient scattered into zeros of the full length (the other ranks hold the other slices')."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
        rank, n = dist.get_rank(group), _group_size(group)
        ctx.shape, ctx.dim, ctx.rank = x.shape, dim, rank
        return x.tensor_split(n, dim=dim)[rank].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        full = grad.new_zeros(ctx.shape)
        k = grad.shape[ctx.dim]
        full.narrow(ctx.dim, ctx.rank * k, k).copy_(grad)
        return full, None, None


# ---------------------------------------------------------------------------- checks
def check_heads(heads: int, degree: int) -> None:
    """Ulysses gives each rank ``heads / degree`` heads: refuse a degree that does not divide them."""
    if degree > 1 and heads % degree:
        raise ModelError(f"sequence parallel degree {degree} does not divide the {heads} attention heads "
                         f"(parallel.sequence_parallel must divide the model's head count)")


def group_degree(group: Any) -> int:
    """Ranks in ``group`` (1 for ``None`` or when torch.distributed is not initialised)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


# ---------------------------------------------------------------------------- the per-model state
class SequenceParallel:
    """The token layout of one transformer under Ulysses SP over ``group``.

    :meth:`begin` (called by a forward pre-hook of the model, with the token count) fixes the
    padded and local lengths of the current forward; shards, attention and the gather read them.
    A backward recompute (gradient checkpointing) uses the layout of the latest forward, so
    forwards of different sizes must not interleave with the backward of a checkpointed one.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.degree = group_degree(group)
        self.rank = dist.get_rank(group) if self.degree > 1 else 0
        self.length = 0           # real tokens N of the current forward
        self.padded = 0           # N rounded up to a multiple of the degree
        self.local = 0            # padded / degree: the tokens each rank holds
        self.patch: tuple[int, int, int] = (1, 1, 1)    # the plan's token patch (set by install_plan)
        self.backends: tuple[str, ...] = ()              # attention backends of the sharded attention

    def __deepcopy__(self, memo: dict) -> "SequenceParallel":     # copies of a model share the group
        return self

    def begin(self, length: int) -> None:
        """Start a forward over ``length`` video tokens."""
        self.length = int(length)
        self.padded = -(-self.length // self.degree) * self.degree
        self.local = self.padded // self.degree

    # -- token shards
    def _pad(self, x: torch.Tensor, dim: int, value: float = 0.0) -> torch.Tensor:
        if x.shape[dim] != self.length:
            raise RuntimeError(f"sequence parallel: expected {self.length} tokens along dim {dim}, "
                               f"got shape {tuple(x.shape)}")
        extra = self.padded - self.length
        if not extra:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, x.new_full(shape, value)], dim=dim)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The local slice of ``x``'s ``N`` tokens along ``dim`` (padded to a multiple of the degree
        first); the gradient flows back into zeros for the other ranks' tokens."""
        return _Shard.apply(self._pad(x, dim), self.group, dim)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All ``N`` tokens from the local slices along ``dim``, padding stripped; backward keeps the
        local slice of the gradient (every rank computes the same loss from this output)."""
        full = _GatherKeepSlice.apply(x, self.group, dim)
        return full.narrow(dim, 0, self.length)

    # -- attention
    def attention(self, attend: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attn_mask: torch.Tensor | None = None, *args: Any,
                  **kwargs: Any) -> torch.Tensor:
        """``attend`` (a ``dispatch_attention_fn``) over the whole sequence with the local heads.

        ``query``/``key``/``value`` are ``(B, S, H, d)`` with ``S = local + T``: the rank's video
        tokens, then ``T >= 0`` replicated text tokens (joint attention). ``attn_mask`` (or None)
        broadcasts to ``(B, 1, S_q, S_k)`` over either this local layout or the full one
        (``N + T``). Returns ``(B, S, H, d)`` in the input layout.
        """
        if kwargs.get("is_causal"):
            raise ModelError("sequence parallelism does not support causal attention")
        kwargs["parallel_config"] = None
        text = query.shape[1] - self.local
        if text < 0 or key.shape[1] != query.shape[1] or value.shape[1] != query.shape[1]:
            raise RuntimeError(f"sequence parallel attention: q/k/v lengths {query.shape[1]}/{key.shape[1]}/"
                               f"{value.shape[1]} do not hold the {self.local} local video tokens of this forward")
        check_heads(query.shape[2], self.degree)
        heads = query.shape[2] // self.degree

        def to_heads(t: torch.Tensor) -> torch.Tensor:
            video = _AllToAll.apply(t[:, :self.local], self.group, 2, 1)        # (B, N_pad, H/sp, d)
            if not text:
                return video
            # The text is replicated: take this rank's heads (the gradient of the others stays 0 here).
            return torch.cat([video, t[:, self.local:].narrow(2, self.rank * heads, heads)], dim=1)

        q, k, v = to_heads(query), to_heads(key), to_heads(value)
        mask = self._relayout_mask(attn_mask, text, query.shape[0], query.device)
        out = attend(q, k, v, mask, *args, **kwargs)                              # (B, N_pad + T, H/sp, d)
        video = _AllToAll.apply(out[:, :self.padded], self.group, 1, 2)           # (B, local, H, d)
        if not text:
            return video
        return torch.cat([video, _GatherReduceSlice.apply(out[:, self.padded:], self.group, 2)], dim=1)

    def _relayout_mask(self, mask: torch.Tensor | None, text: int, batch: int,
                       device: torch.device) -> torch.Tensor | None:
        """The mask over ``[N_pad video, T text]`` (padded keys masked out) from one over the local
        or the full layout; video rows and columns must not vary within the video part."""
        pad = self.padded - self.length
        if mask is None:
            if not pad:
                return None
            keep = torch.ones(self.padded + text, dtype=torch.bool, device=device)
            keep[self.length:self.padded] = False
            return keep.view(1, 1, 1, -1)
        while mask.dim() < 4:
            mask = mask.unsqueeze(1)
        mask = self._relayout_axis(mask, -1, text, key_axis=True)
        if mask.shape[-2] > 1:
            mask = self._relayout_axis(mask, -2, text, key_axis=False)
        return mask

    def _relayout_axis(self, mask: torch.Tensor, axis: int, text: int, key_axis: bool) -> torch.Tensor:
        size = mask.shape[axis]
        if size == self.length + text:
            video_len = self.length
        elif size == self.local + text:
            video_len = self.local
        else:
            raise RuntimeError(f"sequence parallel: attention mask of shape {tuple(mask.shape)} fits neither "
                               f"{self.length} nor {self.local} video tokens plus {text} text tokens")
        video, rest = mask.narrow(axis, 0, video_len), mask.narrow(axis, video_len, text)
        first = video.narrow(axis, 0, 1)
        if not bool((video == first).all()):
            raise ModelError("sequence parallelism needs attention masks that are the same for every video token")
        shape = list(mask.shape)
        shape[axis] = self.length
        parts = [first.expand(shape)]
        if self.padded > self.length:
            shape[axis] = self.padded - self.length
            if key_axis:        # padded keys: never attended to
                masked = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
                parts.append(torch.full(shape, masked, dtype=mask.dtype, device=mask.device))
            else:               # padded queries: attend like real ones (no fully masked rows); stripped later
                parts.append(first.expand(shape))
        return torch.cat([*parts, rest], dim=axis)

    # -- installation helpers (forward hooks)
    def shard_output_hook(self, dim: int) -> Callable[..., Any]:
        """A forward hook sharding a module's output (a tensor or a tuple of tensors) along ``dim``:
        rotary embeddings computed for the whole sequence."""
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return self.shard(output, dim)
            return type(output)(self.shard(o, dim) for o in output)
        return hook

    def shard_input_hook(self, dim: int = 1) -> Callable[..., Any]:
        """A forward pre-hook (``with_kwargs=True``) sharding the first argument (``hidden_states``)."""
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (self.shard(args[0], dim), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.shard(kwargs["hidden_states"], dim)}
        return hook

    def gather_output_hook(self, dim: int = 1) -> Callable[..., Any]:
        """A forward hook gathering a module's output tokens along ``dim`` (the output projection)."""
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return self.gather(output, dim)
        return hook

    def wrap(self, processor: Any) -> "UlyssesAttnProcessor":
        return UlyssesAttnProcessor(processor, self)


def model_input(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    """Argument ``name`` of a forward call, given by keyword or at position ``index``."""
    return kwargs[name] if name in kwargs else args[index]


def replace_input(args: tuple, kwargs: dict, name: str, index: int, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with argument ``name`` (keyword or position ``index``) set to ``value``."""
    if name in kwargs or len(args) <= index:
        return args, {**kwargs, name: value}
    return (*args[:index], value, *args[index + 1:]), kwargs


# ---------------------------------------------------------------------------- the processor wrapper
class UlyssesAttnProcessor:
    """An attention processor running ``inner``'s own code with its attention call
    (``dispatch_attention_fn``) routed through :meth:`SequenceParallel.attention`.

    The projections, norms, rotary embeddings and output projections stay the model's own: the
    wrapper calls ``inner``'s ``__call__`` function bound to a copy of its module namespace in
    which ``dispatch_attention_fn`` is the Ulysses one. Nothing in diffusers is modified.
    Install it only on self- or joint attention; cross-attention of local queries to replicated
    text keeps its own processor (it needs no communication).
    """

    def __init__(self, inner: Any, sp: SequenceParallel) -> None:
        fn = getattr(type(inner), "__call__", None)
        if not inspect.isfunction(fn) or "dispatch_attention_fn" not in fn.__code__.co_names:
            raise ModelError(f"sequence parallelism cannot wrap the attention processor {type(inner).__name__} "
                             "(it does not call diffusers' dispatch_attention_fn)")
        namespace = dict(fn.__globals__)
        namespace["dispatch_attention_fn"] = functools.partial(sp.attention, fn.__globals__["dispatch_attention_fn"])
        call = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
        call.__kwdefaults__ = fn.__kwdefaults__
        self.inner, self.sp = inner, sp
        self._call = call
        # diffusers' Attention.forward passes only the keyword arguments named in
        # `inspect.signature(processor.__call__)`: show it the inner processor's signature.
        self.__call__ = functools.partial(call, inner)

    def __call__(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self._call(self.inner, attn, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:       # _attention_backend and the like: the inner one's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------- installing a family's plan
def apply_sequence_parallel(adapter: VideoFlowAdapter, group: Any) -> None:
    """Shard the tokens of every expert and frozen reference copy of ``adapter`` over the ranks of
    ``group``, as each one's :meth:`~flowdppo_video.models.base.VideoFlowAdapter.sequence_parallel_plan`
    says; ``adapter.velocity`` still returns the whole ``(B, C, F, H, W)``, the same on every rank.
    ``None`` or a group of one rank: nothing. Call it after LoRA / fine-tuning setup (the hooks sit
    on the modules present then)."""
    if group_degree(group) <= 1:
        return
    for transformer in [*adapter.experts, *adapter.reference_copies().values()]:
        plan = adapter.sequence_parallel_plan(transformer)
        if plan is None:
            raise ModelError(adapter.sequence_parallel_refusal or f"{type(adapter).__name__} does not support sequence parallelism")
        install_plan(transformer, plan, group)


def install_plan(transformer: torch.nn.Module, plan: SequenceParallelPlan, group: Any) -> SequenceParallel:
    """Hooks and processors of ``plan`` on ``transformer``; its :class:`SequenceParallel` is kept as
    ``transformer._sequence_parallel`` (read by tests and benchmarks)."""
    if getattr(transformer, "_sequence_parallel", None) is not None:
        raise ModelError("sequence parallelism is already enabled on this transformer")
    sp = SequenceParallel(group)
    check_heads(plan.heads, sp.degree)
    attention = _place_attention(transformer, plan)
    sp.patch = plan.patch
    # diffusers keeps a backend set by set_attention_backend on each processor (None: the default, native).
    sp.backends = tuple(sorted({getattr(getattr(m.processor, "_attention_backend", None), "value", "native")
                                for m in attention}))

    def begin(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = model_input(args, kwargs, "hidden_states", 0)                       # (B, C, F, H, W)
        sp.begin(math.prod(x.shape[2 + i] // p for i, p in enumerate(plan.patch)))
        for name, index in plan.per_token_inputs:
            if name in kwargs or len(args) > index:
                value = model_input(args, kwargs, name, index)
                if value is not None and value.ndim == 2:                        # (B, N): one per token
                    args, kwargs = replace_input(args, kwargs, name, index, sp.shard(value, 1))
        return args, kwargs

    transformer.register_forward_pre_hook(begin, with_kwargs=True)
    transformer.get_submodule(plan.rotary).register_forward_hook(sp.shard_output_hook(plan.rotary_token_dim))
    transformer.get_submodule(plan.tokens_enter).register_forward_pre_hook(sp.shard_input_hook(1), with_kwargs=True)
    transformer.get_submodule(plan.tokens_leave).register_forward_hook(sp.gather_output_hook(1))
    for module in attention:
        module.set_processor(sp.wrap(module.processor))
    transformer._sequence_parallel = sp
    return sp


def check_token_padding(adapter: VideoFlowAdapter, latent_shape: tuple[int, ...]) -> None:
    """Refuse up front an attention backend that takes no mask where this run's token count is not a
    multiple of the SP degree: the padded keys are masked (:meth:`SequenceParallel._relayout_mask`),
    and such a backend would fail at the first forward. ``latent_shape``: ``(C, F, H, W)``."""
    for transformer in [*adapter.experts, *adapter.reference_copies().values()]:
        sp = getattr(transformer, "_sequence_parallel", None)
        if sp is None:
            continue
        tokens = math.prod(latent_shape[1 + i] // p for i, p in enumerate(sp.patch))
        for backend in sp.backends:
            if tokens % sp.degree and mask_alternative(backend):
                raise ModelError(f"model.attention_backend {backend!r} takes no attention mask, but "
                                 f"parallel.sequence_parallel={sp.degree} does not divide the {tokens} video tokens "
                                 f"and masks the padding; use {mask_alternative(backend)}, or a degree dividing {tokens}")


def _place_attention(transformer: torch.nn.Module, plan: SequenceParallelPlan) -> list[torch.nn.Module]:
    """The attention modules ``plan.attention`` names; every other one must be ``plan.replicated``
    (an attention the plan forgets would see only its rank's tokens: a wrong result, not an error)."""
    sharded = []
    for name, module in transformer.named_modules():
        if not hasattr(module, "set_processor"):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in plan.attention):
            sharded.append(module)
        elif not any(fnmatch.fnmatchcase(name, pattern) for pattern in plan.replicated):
            raise ModelError(f"the sequence-parallel plan of {type(transformer).__name__} does not place the "
                             f"attention module {name!r} (neither sharded nor replicated)")
    if not sharded:
        raise ModelError(f"the sequence-parallel plan of {type(transformer).__name__} names no attention module")
    return sharded
