"""The GPU speed switches of a built adapter: diffusers' attention dispatcher (``model.attention_backend``)
and regional compilation of the repeated transformer blocks (``model.compile``).

Both act on the transformers only (every expert and reference copy), leave parameter names and
checkpoints as they are, and go through the single forward path the rollout and the replay share, so
invariant 1 holds: exactly with another attention backend (the same kernel runs both), and to float
rounding under ``torch.compile`` (the rollout's no-grad graph and the replay's training graph may
fuse differently; ``tests/test_speed_switches.py`` states the tolerance).
"""

from __future__ import annotations

import importlib.util

import torch

from .base import ModelError, VideoFlowAdapter

# Short names users expect, for diffusers' backend names.
ALIASES = {"sdpa": "native", "cudnn": "_native_cudnn", "flash3": "_flash_3", "flash_3": "_flash_3"}
# The package each backend imports (None: PyTorch's own); backends named "*_hub" download kernels
# from the Hugging Face Hub at run time and are refused (install the package instead).
_PACKAGES = {"flash": "flash_attn", "flash_varlen": "flash_attn", "_flash_3": "flash_attn_interface",
             "_flash_varlen_3": "flash_attn_interface", "sage": "sageattention", "sage_varlen": "sageattention",
             "xformers": "xformers"}
# Backends that need a GPU (flex runs forward on the CPU but has no backward there: training fails).
_CUDA_ONLY = ("flash", "_flash", "sage", "_sage", "xformers", "_native_cudnn", "_native_flash",
              "_native_efficient", "flex")
# Backends whose diffusers 0.42 function raises on any attention mask ("`attn_mask` is not supported"),
# and what works instead.
_NO_MASK = {"flash": "flash_varlen or native", "_flash_3": "_flash_varlen_3 or native",
            "_native_flash": "native", "_native_xla": "native", "sage": "sage_varlen or native",
            "_sage_qk_int8_pv_fp8_cuda": "sage_varlen or native", "_sage_qk_int8_pv_fp8_cuda_sm90": "sage_varlen or native",
            "_sage_qk_int8_pv_fp16_cuda": "sage_varlen or native", "_sage_qk_int8_pv_fp16_triton": "sage_varlen or native"}


def mask_alternative(key: str) -> str | None:
    """What to use instead of attention backend ``key`` (diffusers' name) where attention has a mask;
    None if ``key`` takes masks."""
    return _NO_MASK.get(key)


def attention_backend(name: str, device: torch.device, masked: bool = False) -> str:
    """diffusers' name of ``model.attention_backend`` ``name``, or a one-line :class:`ModelError` naming
    the key when the backend is unknown, downloads kernels, takes no mask where the model's attention
    always has one (``masked``), is not installed or needs CUDA."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    key = ALIASES.get(name.lower(), name.lower())
    known = {b.value for b in AttentionBackendName if not b.value.endswith("_hub")}
    if key not in known:
        raise ModelError(f"model.attention_backend {name!r} is not one of {', '.join(sorted(known))} "
                         "(or sdpa, cudnn, flash3)")
    if masked and mask_alternative(key):
        raise ModelError(f"model.attention_backend {name!r} takes no attention mask, and this model's attention "
                         f"always has one; use {mask_alternative(key)}")
    pkg = _PACKAGES.get(key)
    if pkg is not None and importlib.util.find_spec(pkg) is None:
        raise ModelError(f"model.attention_backend {name!r} needs the {pkg} package, which is not installed")
    if device.type != "cuda" and key.startswith(_CUDA_ONLY):
        raise ModelError(f"model.attention_backend {name!r} needs a CUDA device (this run is on {device.type})")
    return key


def _transformers(adapter: VideoFlowAdapter) -> list[torch.nn.Module]:
    mods = list(adapter.experts) + list(adapter.reference_copies().values())
    return list({id(m): m for m in mods}.values())


def apply_speed_switches(adapter: VideoFlowAdapter, backend: str = "native", compile_blocks: bool = False) -> None:
    """Set the attention backend of every transformer (``native``: left as built) and compile their
    repeated blocks in place (``Module.compile``: parameter names unchanged)."""
    key = attention_backend(backend, adapter.device, adapter.masks_attention)
    for t in _transformers(adapter):
        if key != "native":
            if not hasattr(t, "set_attention_backend"):
                raise ModelError(f"model.attention_backend {backend!r}: a {type(t).__name__} has no attention "
                                 "dispatcher (leave it native)")
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            # diffusers also makes the backend the process-wide default; keep it on these processors
            # only, so other models in the process (rewards, a second adapter) are left as they were.
            active = _AttentionBackendRegistry._active_backend
            try:
                t.set_attention_backend(key)
            except (RuntimeError, ValueError, ImportError) as e:     # diffusers' own requirement checks
                raise ModelError(f"model.attention_backend {backend!r}: {str(e).splitlines()[0]}") from None
            finally:
                _AttentionBackendRegistry.set_active_backend(active)
        if compile_blocks:
            if not getattr(t, "_repeated_blocks", None):
                raise ModelError(f"model.compile: a {type(t).__name__} names no repeated blocks to compile")
            t.compile_repeated_blocks()
