"""What trains, shared by every family: LoRA or full fine-tuning of one or more transformers
("experts": Wan 2.2 A14B has two, the others one), the frozen reference, and checkpoints of
what trains. Only the experts in ``trained`` get adapters, gradients and optimizer state.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .base import ModelError

_LORA_FILE = "pytorch_lora_weights.safetensors"
_FULL_FILE = "transformer.safetensors"
EXPERT_DIRS = ("transformer", "transformer_2")


def _json_default(value: Any) -> Any:
    """Sets (peft target modules) as lists, paths and the rest as strings."""
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


class TrainableExperts:
    """Mixin over ``self.experts`` (transformers), ``self.trained`` (indices of those that train),
    ``self.device`` and ``self.dtype``. Call :meth:`_init_training` in ``__init__``."""

    experts: list[torch.nn.Module]
    trained: list[int]
    device: torch.device
    dtype: torch.dtype
    base_below: float | None               # VideoFlowAdapter's routing by noise level

    def _init_training(self) -> None:
        self.num_experts = len(self.experts)
        self._lora_rank = 0
        self._frozen_base: dict[int, torch.nn.Module] = {}
        self._reference_depth = 0

    @property
    def transformer(self) -> torch.nn.Module:
        """The first (Wan 2.2 A14B: high-noise) expert."""
        return self.experts[0]

    def _merged(self, i: int, lora: bool = True) -> torch.nn.Module:
        """Expert ``i`` as a plain model of its own class with any LoRA merged in (a copy); with
        ``lora=False`` the base model under the adapters (sharing its weights)."""
        t = self.experts[i]
        if not (self._lora_rank and i in self.trained):
            return t
        # Export base + LoRA as plain weights without touching the training model. Each wrapped layer
        # is merged in a copy of its own (peft's merge), the rest shares the training model's tensors,
        # and the plain model is built on the meta device: no second whole transformer, in no dtype.
        from peft.tuners.tuners_utils import BaseTunerLayer

        sd = {k.replace(".base_layer.", "."): v for k, v in t.state_dict().items() if "lora_" not in k}
        for name, m in t.named_modules():
            if lora and isinstance(m, BaseTunerLayer):
                layer = copy.deepcopy(m)
                layer.merge()
                for pname, p in layer.get_base_layer().named_parameters():
                    # A clone: keeping the merged copy itself holds ~2x the weight (measured, 1.3B)
                    sd[f"{name}.{pname}"] = p.detach().clone()
                del layer
        with torch.device("meta"):
            plain = type(t)(**{k: v for k, v in t.config.items() if not k.startswith("_")})
        plain.load_state_dict(sd, assign=True)
        for name, buf in t.named_buffers():            # buffers outside the state dict (RoPE tables)
            key = name.replace(".base_layer.", ".")
            if key not in sd:
                owner, _, attr = key.rpartition(".")
                plain.get_submodule(owner)._buffers[attr] = buf
        return plain.to(dtype=self.dtype)

    def enable_lora(self, rank: int, alpha: float | None, targets: list[str], seed: int = 0) -> None:
        """peft LoRA on the named submodules of the training expert(s); base weights frozen, B = 0."""
        from peft import LoraConfig

        for t in self.experts:
            t.requires_grad_(False)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            for i in self.trained:
                self.experts[i].add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank,
                                                       target_modules=targets, init_lora_weights=True))
        except ValueError as e:
            raise ModelError(f"model.lora.targets {targets}: {str(e).splitlines()[0]}") from None
        finally:
            torch.random.set_rng_state(state)
        for i in self.trained:
            for n, p in self.experts[i].named_parameters():
                p.requires_grad_("lora_" in n)
                if "lora_" in n:
                    p.data = p.data.float()  # float32 adapters (and optimizer state) under a bf16 base
        self._lora_rank = rank

    def enable_full_finetune(self, keep_reference: bool) -> None:
        for t in self.experts:
            t.requires_grad_(False)
        for i in self.trained:
            self.experts[i].requires_grad_(True)
            if keep_reference:
                self._frozen_base[i] = copy.deepcopy(self.experts[i]).eval().requires_grad_(False)

    def reference_copies(self) -> dict[int, torch.nn.Module]:
        return dict(self._frozen_base)

    def enable_gradient_checkpointing(self) -> None:
        for i in self.trained:
            self.experts[i].enable_gradient_checkpointing()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for i in self.trained for p in self.experts[i].parameters() if p.requires_grad]

    def expert_trains(self, expert: int) -> bool:
        return expert in self.trained

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        # Re-entrant: a routed rollout (model.base_below) may run inside an outer reference context
        # (the base model's own evaluation); only the outermost switches and restores.
        if self._reference_depth:
            self._reference_depth += 1
            try:
                yield
            finally:
                self._reference_depth -= 1
            return
        self._reference_depth = 1
        try:
            with self._switch_to_reference():
                yield
        finally:
            self._reference_depth = 0

    @contextlib.contextmanager
    def _switch_to_reference(self) -> Iterator[None]:
        if self._lora_rank:
            for i in self.trained:
                self.experts[i].disable_adapters()
            try:
                yield
            finally:
                for i in self.trained:
                    self.experts[i].enable_adapters()
            return
        if len(self._frozen_base) != len(self.trained):
            raise ModelError("no reference model: full fine-tuning keeps one only when objective.beta > 0")
        live = list(self.experts)
        for i, frozen in self._frozen_base.items():
            self.experts[i] = frozen
        try:
            yield
        finally:
            self.experts[:] = live

    def _base_plain(self, i: int) -> torch.nn.Module:
        """Expert ``i`` as the frozen base model, a plain model of its own class (LoRA: without the
        adapters, sharing the base weights; full fine-tuning: the reference copy)."""
        if self._lora_rank:
            return self._merged(i, lora=False)
        if i not in self._frozen_base:
            raise ModelError("no reference model to export: full fine-tuning keeps one only with "
                             "model.base_below or objective.beta > 0")
        return self._frozen_base[i]

    def export_experts(self) -> tuple[list[torch.nn.Module], float | None]:
        """The plain transformers of an export and their ``boundary_ratio``: every expert with LoRA
        merged; a model routed by noise level (``model.base_below``) becomes two experts, the tuned
        one above the boundary and the base below it, as Wan 2.2 A14B is laid out."""
        plain = [self._merged(i) for i in range(self.num_experts)]
        base_below = self.base_below
        if base_below is None:
            return plain, getattr(self, "boundary_ratio", None)
        return [plain[0], self._base_plain(0)], base_below

    def export_single(self) -> torch.nn.Module:
        """The one plain transformer of a single-transformer pipeline's export (LoRA merged); a model
        routed by noise level needs two and is refused in one line."""
        if self.base_below is not None:
            raise ModelError(f"model.base_below {self.base_below}: this family's diffusers pipeline holds one "
                             "transformer, so a model routed by noise level cannot be exported; sample it with "
                             "flowdppo-video sample, or train without model.base_below")
        return self._merged(0)

    def _trainable_dirs(self, directory: Path) -> list[tuple[int, Path]]:
        # One expert: files directly in `directory` (the Wan 2.1 layout); two: one folder per expert.
        if self.num_experts == 1:
            return [(0, directory)]
        return [(i, directory / EXPERT_DIRS[i]) for i in self.trained]

    def save_trainable(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for i, d in self._trainable_dirs(directory):
            d.mkdir(parents=True, exist_ok=True)
            t = self.experts[i]
            if self._lora_rank:
                from peft import get_peft_model_state_dict

                sd = get_peft_model_state_dict(t)
                save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, d / _LORA_FILE)
                (d / "adapter_config.json").write_text(json.dumps(
                    t.peft_config["default"].to_dict(), default=_json_default, indent=1))
            else:
                sd = {k: v.detach().contiguous().cpu() for k, v in t.state_dict().items()}
                save_file(sd, d / _FULL_FILE)
                (d / "config.json").write_text(json.dumps(dict(t.config), default=_json_default))

    def load_trainable(self, directory: Path) -> None:
        for i, d in self._trainable_dirs(directory):
            _load_into(self.experts[i], d, self.device, lora=bool(self._lora_rank))


def _load_into(module: torch.nn.Module, directory: Path, device: torch.device, lora: bool) -> None:
    """Load LoRA adapters or full weights saved by ``save_trainable`` into ``module``, in place."""
    if lora:
        from peft import set_peft_model_state_dict

        f = directory / _LORA_FILE
        if not f.is_file():
            raise ModelError(f"{f} not found: the checkpoint holds no LoRA weights")
        try:
            res = set_peft_model_state_dict(module, load_file(f, device=str(device)))
        except RuntimeError as e:
            raise ModelError(f"{f} does not fit this model's LoRA (rank or shapes differ): "
                             f"{str(e).splitlines()[0]}") from None
        bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
        if bad:
            raise ModelError(f"{f}: LoRA keys do not match this model ({bad[0]} ...)")
        return
    f = directory / _FULL_FILE
    if not f.is_file():
        raise ModelError(f"{f} not found: the checkpoint holds no full transformer weights")
    sd = load_file(f, device=str(device))
    try:
        with torch.no_grad():
            missing, unexpected = module.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ModelError(f"{f} does not fit this transformer: {str(e).splitlines()[0]}") from None
    if missing or unexpected:
        raise ModelError(f"{f} does not match the transformer (missing {missing[:2]}, "
                         f"unexpected {unexpected[:2]})")
