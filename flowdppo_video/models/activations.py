"""The activation model of the memory planner, in pieces each family's profile is written with
(see :mod:`flowdppo_video.models.memory` for the model itself: the bytes of the tensors autograd
keeps for backward, per token, read off the diffusers blocks and checked tensor by tensor)."""

from __future__ import annotations

import dataclasses

import torch

F32 = 4


@dataclasses.dataclass
class BlockBytes:
    """Bytes per video of one forward: ``per_token`` x tokens + ``per_text`` x text tokens + ``fixed``,
    + ``per_token_2`` x the tokens of a second stream (LTX-2's audio; 0 elsewhere)."""

    per_token: float = 0.0
    per_text: float = 0.0
    fixed: float = 0.0
    per_token_2: float = 0.0

    def __add__(self, other: "BlockBytes") -> "BlockBytes":
        return BlockBytes(self.per_token + other.per_token, self.per_text + other.per_text, self.fixed + other.fixed,
                          self.per_token_2 + other.per_token_2)

    def scale(self, k: float) -> "BlockBytes":
        return BlockBytes(self.per_token * k, self.per_text * k, self.fixed * k, self.per_token_2 * k)

    def bytes(self, tokens: float, text_tokens: float, tokens_2: float = 0.0) -> float:
        return self.per_token * tokens + self.per_text * text_tokens + self.fixed + self.per_token_2 * tokens_2


@dataclasses.dataclass
class ActivationProfile:
    """One forward of one video through a training expert, split as the planner needs it."""

    blocks: BlockBytes          # all blocks, nothing checkpointed (with what only they keep: RoPE tables)
    one_block: BlockBytes       # the largest block (re-run in backward under checkpointing)
    block_inputs: BlockBytes    # what checkpointing keeps: each block's input
    outside: BlockBytes         # embeddings, text conditioning, RoPE, final norm and projection
    rollout_peak: BlockBytes    # no-grad forward: live set inside one block + the residual stream
    heads: int


def trains(m: torch.nn.Module | None) -> bool:
    return m is not None and any(p.requires_grad for p in m.parameters())


def is_lora(m: torch.nn.Module | None) -> bool:
    return m is not None and hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0


def lora_rank(m: torch.nn.Module) -> int:
    return int(next(iter(m.lora_A.values())).out_features)


def lora_dtype_bytes(m: torch.nn.Module) -> int:
    return next(iter(m.lora_A.values())).weight.element_size()


class Linears:
    """Input bytes a group of Linears reading one input saves (see the module docstring)."""

    def __init__(self, s: int) -> None:
        self.s = s

    def shares(self, mods: list[torch.nn.Module | None]) -> bool:
        """Whether one of them keeps the shared input itself (a trained weight, or an adapter of
        the input's dtype)."""
        return any(m is not None and ((is_lora(m) and lora_dtype_bytes(m) == self.s)
                                      or (not is_lora(m) and trains(m))) for m in mods)

    def saved(self, mods: list[torch.nn.Module | None], width: int, counted: bool = False) -> float:
        """``counted``: the shared input is already kept by another op (attention's output)."""
        extra = 0.0
        for m in mods:
            if m is not None and is_lora(m):
                lb = lora_dtype_bytes(m)
                extra += F32 * lora_rank(m)                          # lora_A's output, lora_B's input
                if lb != self.s:
                    extra += lb * width                               # a cast copy per adapter
        shared = self.s * width if self.shares(mods) and not counted else 0.0
        return shared + extra


def rms(norm: torch.nn.Module | None, s: int, width: int, heads_rows: int = 1) -> float:
    """An RMSNorm of a row of ``width``: its float32 upcast, the float32 normalised tensor if its
    weight trains, and rstd per row (``heads_rows`` rows per token)."""
    if norm is None or isinstance(norm, torch.nn.Identity):
        return 0.0
    return F32 * width * (2 if trains(norm) else 1) + F32 * heads_rows
