"""What the memory planner (``flowdppo_video.planner``) needs to know about a family, and nothing
the planner needs to know by name: a model built on the meta device (no weights allocated), its
parameters grouped into parts, its token counts and its activation bytes per token.

Activation model (bytes of the tensors autograd keeps for backward during one forward)
--------------------------------------------------------------------------------------
Per transformer block, per token of the video sequence (``N`` tokens) and per text token (``L``)::

    saved = sum over the block's ops of the tensors that op saves, given what requires grad

with ``s`` the model dtype's bytes, ``f = 4`` (float32), ``D`` the hidden size, ``F`` the FFN
width, ``H`` the heads, ``r`` the LoRA rank. The terms, read off the diffusers blocks and checked
tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` (tests/test_planner.py):

- a float32 LayerNorm (Wan's ``FP32LayerNorm``) saves its float32 input and mean/rstd:
  ``f*D + 8``; a LayerNorm in the model dtype (HunyuanVideo) ``s*D + 8``;
- adaLN modulation ``norm * (1 + scale) + shift`` saves ``norm`` (``f*D`` or ``s*D``) only when
  the modulation trains (full fine-tuning); a gate ``x * gate`` saves ``x`` likewise;
- an ``nn.RMSNorm`` of q or k saves its float32 upcast (``f*D``), plus the float32 normalised
  tensor when its weight trains, plus rstd (4 per row);
- a Linear saves its input when its weight trains (``s*D``, shared by q/k/v that read the same
  input); a peft LoRA Linear saves its input cast to the adapter dtype (``f*D`` per target when
  float32 adapters sit on a 16-bit base, else the shared ``s*D``) and ``lora_A``'s output
  (``f*r``); a frozen Linear keeps only its weight;
- fused attention (flash / memory-efficient, what a GPU runs) saves q, k, v, the output
  (``4*s*D`` for self-attention) and the log-sum-exp (``4*H`` per query token); no N^2 term;
- tanh-GELU saves its input (``s*F``); the second FFN Linear its input when it trains.

So full fine-tuning of a Wan block in float32 keeps ``(22 D + 2 F) * 4`` bytes per token and
LoRA on attention ``~(12 D + F) * 4``; in bf16 the float32 norm inputs stay 4 bytes. The blocks'
inputs, the text conditioning (once per forward), RoPE tables, the final norm and projection and
the patch embedding are added once. With gradient checkpointing only each block's input
(``s*D`` per token) is kept, and the backward pass re-runs one block at a time (its full
``saved`` is the extra peak, reported separately). The no-grad rollout holds, per block, the
residual stream and the larger of the attention working set (q, k, v, out) and the FFN hidden
state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import ModelConfig
from .base import ModelError, VideoFlowAdapter

F32 = 4
# Weights smaller than this (all files under model.path) are loaded for real to be counted
# (the shipped shapes-world model); larger checkpoints are planned from their config.json files.
SMALL_CHECKPOINT_BYTES = 256 * 2 ** 20
_TRANSFORMERS_META_KEYS = ("architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype",
                           "dtype", "_attn_implementation_autoset", "use_cache", "output_past")
# Wan's from_config sets these itself (UMT5Config keyword arguments); a checkpoint's values are equal.
_WAN_TEXT_FIXED = ("pad_token_id", "eos_token_id", "decoder_start_token_id")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Part:
    """One group of parameters: ``role`` is ``trained`` (what the optimizer updates), ``base`` (frozen
    weights inside a training expert: ZeRO-3 shards them with it), or ``frozen`` (held whole on
    every GPU). ``counted`` is False when the part's config was not given (shapes folder)."""

    name: str
    role: str
    tensors: list[torch.Tensor]
    counted: bool = True

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def dtypes(self) -> str:
        names = sorted({str(t.dtype).replace("torch.", "") for t in self.tensors})
        return "/".join(names) if names else "-"


# ---------------------------------------------------------------- building without weights
def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable JSON file ({str(e).splitlines()[0]})") from None


def _clean(cfg: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _TRANSFORMERS_META_KEYS
            and k not in drop}


def _init_from_folder(family: str, folder: Path) -> tuple[dict[str, Any], list[str]]:
    """``model.init`` equivalent of a folder of diffusers ``<part>/config.json`` files (a checkpoint
    or a shapes folder); returns it and the parts that have no config there (built tiny, not counted)."""
    if not (folder / "transformer" / "config.json").is_file():
        raise ModelError(f"{folder}: no transformer/config.json (a model-config folder holds "
                         "<part>/config.json files, as a diffusers checkpoint does)")
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    known = {"wan": ("transformer", "vae", "text_encoder"),
             "hunyuan_video": ("transformer", "vae", "text_encoder", "text_encoder_2"),
             "hunyuan_video_1.5": ("transformer", "vae", "text_encoder", "text_encoder_2")}
    if family not in known:
        raise ModelError(f"the planner cannot read a model-config folder for model.family={family!r} yet "
                         f"(known: {', '.join(known)}); give it a checkpoint's model.path instead")
    parts = known[family]
    init: dict[str, Any] = {}
    missing = []
    for part in parts:
        f = folder / part / "config.json"
        if not f.is_file():
            missing.append(part)
            continue
        drop = _WAN_TEXT_FIXED if (family == "wan" and part == "text_encoder") else ()
        init[part] = _clean(_read_json(f), drop)
    if family == "wan":
        if index.get("position_channels"):
            raise ModelError(f"{folder}: the planner builds AutoencoderKLWan/WanTransformer3DModel shapes only "
                             "(this checkpoint's extras need its weights: use a checkpoint under "
                             f"{SMALL_CHECKPOINT_BYTES // 2 ** 20} MiB or drop them)")
        if (folder / "transformer_2" / "config.json").is_file():
            init["transformer_2"] = _clean(_read_json(folder / "transformer_2" / "config.json"))
        pipeline = {k: index[k] for k in ("boundary_ratio", "expand_timesteps") if index.get(k) is not None}
        if "transformer_2" in init and "boundary_ratio" not in pipeline:
            raise ModelError(f"{folder}: a transformer_2 needs boundary_ratio in model_index.json")
        if pipeline:
            init["pipeline"] = pipeline
    for key in ("rope_axes_dim",):
        if key in init.get("transformer", {}):
            init["transformer"][key] = list(init["transformer"][key])
    return init, missing


def _weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))


def _keep_fp32(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """As diffusers' ``from_pretrained`` does: ``_keep_in_fp32_modules`` stay float32 under a 16-bit dtype."""
    names = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype == torch.float32 or not names:
        return
    for n, p in module.named_parameters():
        if "lora_" not in n and any(m in n for m in names):
            p.data = p.data.float()


def plan_adapter(cfg: ModelConfig, shapes: str | Path | None, keep_reference: bool
                 ) -> tuple[VideoFlowAdapter, list[str]]:
    """The adapter as training would set it up (LoRA or full, reference copy, dtypes), on the meta
    device unless it is a small real checkpoint; and the parts whose config was missing.

    ``shapes``: a folder of ``<part>/config.json`` files standing in for ``cfg.path``.
    """
    from . import build_adapter
    from ..resources import resolve

    folder = Path(shapes) if shapes is not None else (Path(resolve(cfg.path)) if cfg.path is not None else None)
    if folder is not None and not folder.is_dir():
        raise ModelError(f"{'--model-config' if shapes is not None else 'model.path'} {folder} is not a folder")
    if folder is not None and shapes is None and (folder / "model_index.json").is_file() \
            and 0 < _weights_bytes(folder) < SMALL_CHECKPOINT_BYTES:
        return build_adapter(cfg, torch.device("cpu"), keep_reference=keep_reference), []
    missing: list[str] = []
    from_folder = folder is not None
    if from_folder:
        init, missing = _init_from_folder(cfg.family, folder)
        cfg = dataclasses.replace(cfg, path=None, init=init)
    from diffusers.utils import logging as diffusers_logging

    meta = torch.device("meta")
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()          # from_config's float32-modules cast warning: handled below
    try:
        with torch.device(meta):
            adapter = build_adapter(cfg, meta, keep_reference=keep_reference)
    finally:
        diffusers_logging.set_verbosity(level)
    if from_folder:
        dtype = _DTYPES[cfg.dtype]
        for m in _experts_and_references(adapter):
            _keep_fp32(m, dtype)
    return adapter, missing


def _experts_and_references(adapter: VideoFlowAdapter) -> list[torch.nn.Module]:
    return list(getattr(adapter, "experts", [adapter.transformer])) + \
        list(getattr(adapter, "_frozen_base", {}).values())


def parameter_parts(adapter: VideoFlowAdapter, missing: list[str] = ()) -> list[Part]:
    """Parameters grouped as the planner prints them (each tensor once)."""
    from ._training import EXPERT_DIRS

    experts = list(getattr(adapter, "experts", [adapter.transformer]))
    trained = set(getattr(adapter, "trained", range(len(experts))))
    parts: list[Part] = []
    seen: set[int] = set()

    def take(params: Iterator[torch.nn.Parameter]) -> list[torch.Tensor]:
        out = []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    for i, t in enumerate(experts):
        name = EXPERT_DIRS[i] if i < len(EXPERT_DIRS) else f"expert_{i}"
        if i in trained:
            parts.append(Part(name, "trained", take(p for p in t.parameters() if p.requires_grad)))
            base = take(p for p in t.parameters() if not p.requires_grad)
            if base:
                parts.append(Part(f"{name} base weights (under LoRA)", "base", base))
        else:
            parts.append(Part(f"{name} (frozen expert)", "frozen", take(t.parameters())))
    for i, ref in getattr(adapter, "_frozen_base", {}).items():
        parts.append(Part(f"{EXPERT_DIRS[i]} reference copy", "frozen", take(ref.parameters())))
    for attr in ("text_encoder", "text_encoder_2", "vae"):
        m = getattr(adapter, attr, None)
        if isinstance(m, torch.nn.Module):
            parts.append(Part(attr, "frozen", take(m.parameters()), counted=attr not in missing))
    return parts


# ---------------------------------------------------------------- tokens and activations
@dataclasses.dataclass
class BlockBytes:
    """Bytes per video of one forward: ``per_token`` x tokens + ``per_text`` x text tokens + ``fixed``."""

    per_token: float = 0.0
    per_text: float = 0.0
    fixed: float = 0.0

    def __add__(self, other: "BlockBytes") -> "BlockBytes":
        return BlockBytes(self.per_token + other.per_token, self.per_text + other.per_text, self.fixed + other.fixed)

    def scale(self, k: float) -> "BlockBytes":
        return BlockBytes(self.per_token * k, self.per_text * k, self.fixed * k)

    def bytes(self, tokens: float, text_tokens: float) -> float:
        return self.per_token * tokens + self.per_text * text_tokens + self.fixed


@dataclasses.dataclass
class ActivationProfile:
    """One forward of one video through a training expert, split as the planner needs it."""

    blocks: BlockBytes          # all blocks, nothing checkpointed (with what only they keep: RoPE tables)
    one_block: BlockBytes       # the largest block (re-run in backward under checkpointing)
    block_inputs: BlockBytes    # what checkpointing keeps: each block's input
    outside: BlockBytes         # embeddings, text conditioning, RoPE, final norm and projection
    rollout_peak: BlockBytes    # no-grad forward: live set inside one block + the residual stream
    heads: int


def _trains(m: torch.nn.Module | None) -> bool:
    return m is not None and any(p.requires_grad for p in m.parameters())


def _is_lora(m: torch.nn.Module | None) -> bool:
    return m is not None and hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0


def _lora_rank(m: torch.nn.Module) -> int:
    return int(next(iter(m.lora_A.values())).out_features)


def _lora_dtype_bytes(m: torch.nn.Module) -> int:
    return next(iter(m.lora_A.values())).weight.element_size()


class _Linears:
    """Input bytes a group of Linears reading one input saves (see the module docstring)."""

    def __init__(self, s: int) -> None:
        self.s = s

    def shares(self, mods: list[torch.nn.Module | None]) -> bool:
        """Whether one of them keeps the shared input itself (a trained weight, or an adapter of
        the input's dtype)."""
        return any(m is not None and ((_is_lora(m) and _lora_dtype_bytes(m) == self.s)
                                      or (not _is_lora(m) and _trains(m))) for m in mods)

    def saved(self, mods: list[torch.nn.Module | None], width: int, counted: bool = False) -> float:
        """``counted``: the shared input is already kept by another op (attention's output)."""
        extra = 0.0
        for m in mods:
            if m is not None and _is_lora(m):
                lb = _lora_dtype_bytes(m)
                extra += F32 * _lora_rank(m)                          # lora_A's output, lora_B's input
                if lb != self.s:
                    extra += lb * width                               # a cast copy per adapter
        shared = self.s * width if self.shares(mods) and not counted else 0.0
        return shared + extra


def _rms(norm: torch.nn.Module | None, s: int, width: int, heads_rows: int = 1) -> float:
    """An RMSNorm of a row of ``width``: its float32 upcast, the float32 normalised tensor if its
    weight trains, and rstd per row (``heads_rows`` rows per token)."""
    if norm is None or isinstance(norm, torch.nn.Identity):
        return 0.0
    return F32 * width * (2 if _trains(norm) else 1) + F32 * heads_rows


def _wan_profile(t: torch.nn.Module, s: int) -> ActivationProfile:
    c = t.config
    D = int(c.num_attention_heads) * int(c.attention_head_dim)
    H, hd = int(c.num_attention_heads), int(c.attention_head_dim)
    blk = t.blocks[0]
    Fw = int(blk.ffn.net[0].proj.out_features)
    lin = _Linears(s)
    full = blk.scale_shift_table.requires_grad                       # modulation and gates train
    a1, a2 = blk.attn1, blk.attn2
    tok = 0.0
    tok += F32 * D + 8                                               # norm1 (float32 input, mean, rstd)
    tok += F32 * D if full else 0                                    # norm1 * (1 + scale)
    tok += lin.saved([a1.to_q, a1.to_k, a1.to_v], D)
    tok += _rms(a1.norm_q, s, D) + _rms(a1.norm_k, s, D)
    tok += 4 * s * D + F32 * H                                       # fused attention: q, k, v, out, lse
    tok += lin.saved([a1.to_out[0]], D, counted=True)                # its input is attention's output
    tok += s * D if full else 0                                      # attn_output * gate
    tok += F32 * D + 8 if not isinstance(blk.norm2, torch.nn.Identity) else 0  # norm2
    tok += lin.saved([a2.to_q], D)
    tok += _rms(a2.norm_q, s, D)
    tok += 2 * s * D + F32 * H                                       # cross attention: q, out, lse
    tok += lin.saved([a2.to_out[0]], D, counted=True)
    tok += F32 * D + 8                                               # norm3
    tok += F32 * D if full else 0                                    # norm3 * (1 + c_scale)
    tok += lin.saved([blk.ffn.net[0].proj], D)
    tok += s * Fw                                                    # tanh-GELU input
    tok += lin.saved([blk.ffn.net[2]], Fw)
    tok += F32 * D if full else 0                                    # ff_output.float() * c_gate
    txt = 0.0
    txt += lin.saved([a2.to_k, a2.to_v], D, counted=True)            # the text states: once, below
    txt += _rms(a2.norm_k, s, D) + 2 * s * D                         # norm_k, then k and v in attention
    per_block = BlockBytes(tok, txt)
    n = len(t.blocks)
    # Only when the blocks are not checkpointed: the RoPE cos/sin tables their attention keeps, and
    # block 0's norm1 keeps nothing when nothing before the blocks trains (LoRA).
    pe = t.patch_embedding
    blocks_extra = 2 * s * hd
    if not (_trains(pe) or _trains(t.condition_embedder)):
        blocks_extra -= F32 * D + 8
    # Outside the blocks (once per forward).
    out_tok = F32 * D + 8 + (F32 * D if t.scale_shift_table.requires_grad else 0)  # norm_out, modulation
    out_tok += lin.saved([t.proj_out], D)
    if _trains(pe):
        out_tok += s * int(pe.in_channels) * int(torch.tensor(pe.kernel_size).prod())
    text_emb = t.condition_embedder.text_embedder
    out_txt = 0.0
    if _trains(text_emb):
        out_txt += s * (int(text_emb.linear_1.in_features) + 2 * D)
    if any(lin.shares([b.attn2.to_k, b.attn2.to_v]) for b in t.blocks):
        out_txt += s * D                                             # the text states every block's k/v read
    outside = BlockBytes(out_tok, out_txt)
    inputs = BlockBytes(s * D * n, 0.0)
    # No grad: the residual stream (model dtype) + its float32 norm copy, and the larger of the
    # attention set (normed input, q, k, v, out) and the FFN set (normed input, hidden, GELU out).
    live = s * D + 2 * F32 * D + max(5 * s * D, s * D + 2 * s * Fw)
    return ActivationProfile(per_block.scale(n) + BlockBytes(blocks_extra), per_block, inputs, outside,
                             BlockBytes(live, 2 * s * D), H)


def _hunyuan_profile(t: torch.nn.Module, s: int) -> ActivationProfile:
    """HunyuanVideo 1.0 (double- and single-stream blocks) and 1.5 (double-stream): the joint
    sequence is image tokens + text tokens; norms and modulation in the model dtype."""
    c = t.config
    H, hd = int(c.num_attention_heads), int(c.attention_head_dim)
    D = H * hd
    lin = _Linears(s)
    doubles = list(getattr(t, "transformer_blocks", []))
    singles = list(getattr(t, "single_transformer_blocks", []))
    total, largest = BlockBytes(), BlockBytes()
    live = 0.0
    for blk in doubles:
        full = _trains(blk.norm1)
        Fw = int(blk.ff.net[0].proj.out_features)
        a = blk.attn

        def stream(q: Any, k: Any, v: Any, out: Any, nq: Any, nk: Any, ff: Any) -> float:
            b = s * D + 8 + (s * D if full else 0)                   # norm1 (model dtype) and modulation
            b += lin.saved([q, k, v], D) + _rms(nq, s, hd, H) * 1 + _rms(nk, s, hd, H)
            b += 4 * s * D + F32 * H                                 # joint attention q, k, v, out, lse
            b += lin.saved([out], D, counted=True)
            b += s * D if full else 0                                # gate
            b += s * D + 8 + (s * D if full else 0)                  # norm2 and modulation
            b += lin.saved([ff.net[0].proj], D) + s * Fw + lin.saved([ff.net[2]], Fw)
            b += s * D if full else 0                                # gate
            return b

        img = stream(a.to_q, a.to_k, a.to_v, a.to_out[0], a.norm_q, a.norm_k, blk.ff)
        txt = stream(a.add_q_proj, a.add_k_proj, a.add_v_proj, a.to_add_out, a.norm_added_q, a.norm_added_k,
                     blk.ff_context)
        b = BlockBytes(img, txt)
        total = total + b
        largest = b if b.per_token > largest.per_token else largest
        live = max(live, s * D * 2 + max(5 * s * D, s * D + 2 * s * Fw))
    for blk in singles:
        full = _trains(blk.norm)
        Fw = int(blk.proj_mlp.out_features)
        a = blk.attn
        b = s * D + 8 + (s * D if full else 0)
        b += lin.saved([a.to_q, a.to_k, a.to_v, blk.proj_mlp], D) + s * Fw
        b += _rms(a.norm_q, s, hd, H) + _rms(a.norm_k, s, hd, H)
        b += 4 * s * D + F32 * H
        b += lin.saved([blk.proj_out], D + Fw) + (s * D if full else 0)
        bb = BlockBytes(b, b)                                        # one joint sequence
        total = total + bb
        largest = bb if bb.per_token > largest.per_token else largest
        live = max(live, s * D * 2 + max(5 * s * D, s * (D + 2 * Fw)))
    n = len(doubles) + len(singles)
    inputs = BlockBytes(s * D * n, s * D * n)
    total = total + BlockBytes(2 * F32 * hd)                         # RoPE tables kept by the blocks
    outside = BlockBytes(s * D + 8 + lin.saved([t.proj_out], D), 0.0)
    return ActivationProfile(total, largest, inputs, outside, BlockBytes(live, live), H)


_PROFILES = {"WanTransformer3DModel": _wan_profile, "HunyuanVideoTransformer3DModel": _hunyuan_profile,
             "HunyuanVideo15Transformer3DModel": _hunyuan_profile}


def activation_profile(adapter: VideoFlowAdapter, expert: int = 0) -> ActivationProfile:
    """Saved-for-backward bytes per token of one forward through ``expert`` (see module docstring)."""
    t = adapter.experts[expert] if hasattr(adapter, "experts") else adapter.transformer
    fn = _PROFILES.get(type(t).__name__)
    if fn is None:
        raise ModelError(f"no activation model for a {type(t).__name__}")
    s = torch.empty((), dtype=adapter.dtype).element_size()
    return fn(t, s)


def text_tokens(adapter: VideoFlowAdapter) -> int:
    """Conditioning tokens each video token attends to (padded text, plus fixed extra tokens)."""
    name = type(adapter.transformer).__name__
    if name == "HunyuanVideo15Transformer3DModel":
        from .hunyuan15 import _IMAGE_TOKENS, BYT5_MAX_LENGTH

        return int(adapter.max_sequence_length) + BYT5_MAX_LENGTH + _IMAGE_TOKENS
    return int(adapter.max_sequence_length)
