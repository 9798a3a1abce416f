"""The one interface every model family gives the rollout and the trainer."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import gc
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Union

import torch

from .. import sde
from ..exceptions import ModelError  # noqa: F401 (defined at the bottom, importable here as always)

if TYPE_CHECKING:
    from .registry import FamilySpec
    from .text_cache import TextCache


class TextBatch:
    """Text conditioning made of several tensors, each with the batch as its first dimension.

    Families whose conditioning is one ``(B, L, D)`` tensor (Wan) use a plain tensor; others
    (HunyuanVideo: embeddings, attention mask, pooled projection) use this. It supports what the
    rollout and trajectories do with a tensor: index rows, slice, move, and concatenate
    (:func:`cat_text`).
    """

    def __init__(self, **parts: torch.Tensor) -> None:
        sizes = {k: v.shape[0] for k, v in parts.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"TextBatch parts differ in batch size: {sizes}")
        self.parts = parts

    def __getitem__(self, index: Any) -> "TextBatch":
        """Rows ``index`` (a slice, a list or a tensor of indices: the result keeps its batch dimension)."""
        if isinstance(index, int):
            raise TypeError("index a TextBatch with a slice or a list of rows (it keeps the batch dimension)")
        return TextBatch(**{k: v[index] for k, v in self.parts.items()})

    def __len__(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    @property
    def shape(self) -> torch.Size:                       # the batch size, as for a tensor
        return torch.Size([len(self)])

    def to(self, *args: Any, **kwargs: Any) -> "TextBatch":
        return TextBatch(**{k: v.to(*args, **kwargs) for k, v in self.parts.items()})

    def cpu(self) -> "TextBatch":
        return self.to("cpu")

    def __repr__(self) -> str:
        return "TextBatch(" + ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.parts.items()) + ")"


Text = Union[torch.Tensor, TextBatch]


def cat_text(items: list[Text]) -> Text:
    """Concatenate text conditionings along the batch (tensors or :class:`TextBatch`)."""
    if isinstance(items[0], torch.Tensor):
        return torch.cat(items)
    return TextBatch(**{k: torch.cat([t.parts[k] for t in items]) for k in items[0].parts})



def init_parts(init: dict[str, Any], tiny: dict[str, dict[str, Any]], optional: tuple[str, ...] = ()
               ) -> dict[str, dict[str, Any]]:
    """``model.init`` checked against a family's tiny defaults: every part a mapping, no unknown
    part; returns each known part of ``tiny`` updated by ``init`` (optional parts only if given)."""
    unknown = set(init) - set(tiny) - set(optional)
    if unknown:
        raise ModelError(f"unknown model.init part(s) {sorted(unknown)}; known: {sorted(tiny) + list(optional)}")
    bad = [k for k, v in init.items() if not isinstance(v, dict)]
    if bad:
        raise ModelError(f"model.init.{bad[0]} must be a mapping of config values")
    return {k: {**tiny[k], **init.get(k, {})} for k in tiny}


def causal_latent_shape(num_frames: int, height: int, width: int, scale_temporal: int, scale_spatial: int,
                        patch_size: tuple[int, int, int], channels: int) -> tuple[int, int, int, int]:
    """``(C, F, H, W)`` of a causal video autoencoder's latent (``F = (frames - 1) / st + 1``),
    checking the frame count, the size and the transformer patch; one-line errors naming the key."""
    st, ss = scale_temporal, scale_spatial
    pt, ph, pw = patch_size
    if num_frames < 1 or (num_frames - 1) % st:
        raise ModelError(f"video.num_frames={num_frames} must be {st}k+1 for this autoencoder")
    if height % (ss * ph) or width % (ss * pw):
        raise ModelError(f"video size {height}x{width} must be divisible by {ss * ph}x{ss * pw} "
                         f"(autoencoder x{ss} times patch {ph}x{pw})")
    f = (num_frames - 1) // st + 1
    if f % pt:
        raise ModelError(f"latent frames {f} (video.num_frames={num_frames}) not divisible by patch {pt}")
    return channels, f, height // ss, width // ss


class VideoFlowAdapter(abc.ABC):
    """A text-to-video flow model seen as a velocity field over latents ``(B, C, F, H, W)``.

    The adapter owns the transformer (the only part that trains), the frozen text encoder
    and autoencoder. It is a pure container: parallelism, optimisers and precision policy
    are applied from outside.
    """

    transformer: torch.nn.Module
    patch_size: tuple[int, int, int]
    device: torch.device
    # Mixture-of-experts families (Wan 2.2 A14B) route each denoising step to one of several
    # transformers by its sigma; the trajectory records the expert of every SDE step.
    num_experts: int = 1
    # What the trainer, ZeRO, the planner and checkpoints read: the transformers (expert i is
    # experts[i]; `transformer` is experts[0]), the indices of those that train, their dtype.
    experts: list[torch.nn.Module]
    trained: list[int]
    dtype: torch.dtype
    # Pixels per latent cell along height and width (the autoencoder's spatial stride; 1 in pixel space):
    # with the transformer's patch, the period of the patch grid RL can grow (flowdppo_video.training.monitors).
    scale_spatial: int
    # The family's spec: set on the adapter class by models.registry.register (None: unregistered), so
    # this module reads its family without importing the registry (which imports this module).
    family_spec: ClassVar["FamilySpec | None"] = None

    # Image-to-video families condition every video on an image as well as its prompt. The caller
    # hands each prompt's image over once (:meth:`set_images`); from then on the image travels inside
    # the prompt conditioning that :meth:`encode_prompts` returns, row by row, like the text.
    takes_images: bool = False
    # Whether the transformer's attention always takes a mask (HunyuanVideo's joint attention masks
    # the text padding): attention backends without mask support are refused for it up front.
    masks_attention: bool = False
    # The frame rate of the videos (``video.fps``), set by the run builder: a family that conditions on
    # it (LTX-Video's rotary time scale) reads it here; the others ignore it.
    frame_rate: float = 8.0

    def set_images(self, images: dict[str, Any], num_frames: int, height: int, width: int) -> None:
        """Condition ``prompt -> image`` (PIL RGB images) for videos of that size."""
        raise ModelError("this model is text-to-video: it takes no conditioning images")

    # Set by :func:`flowdppo_video.models.text_cache.cache_prompts`: conditioning encoded once at the
    # start of a run, served by :meth:`prompt_text` / :meth:`negative_text` without the text encoders.
    text_cache: "TextCache | None" = None
    # The attributes holding frozen text encoders (those set on an adapter); released after caching.
    TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    # The other frozen parts, each an attribute holding a module (the planner counts them all).
    FROZEN_PARTS: tuple[str, ...] = ("vae",)

    def prompt_text(self, prompts: list[str]) -> "Text":
        """The conditioning of ``prompts`` as the rollout uses it: rows of the run's cache when there
        is one (bit-identical to :meth:`encode_prompts`), else :meth:`encode_prompts`."""
        if self.text_cache is None:
            return self.encode_prompts(prompts)
        return self.text_cache.rows(self, None, prompts)

    def negative_text(self, negative_prompt: str, prompts: list[str]) -> "Text":
        """The unconditional conditioning of the rows ``prompts`` (:meth:`encode_negative`), cached alike."""
        if self.text_cache is None:
            return self.encode_negative(negative_prompt, prompts)
        return self.text_cache.rows(self, negative_prompt, prompts)

    def text_encoders_resident(self) -> bool:
        """Whether any text encoder is still in memory (False after :meth:`release_text_encoders`)."""
        return any(isinstance(getattr(self, a, None), torch.nn.Module) for a in self.TEXT_ENCODERS)

    def forget_prompt_rows(self) -> None:
        """Empty the family's in-memory rows of encoded prompts (and negatives, and image conditions):
        the next prompt is read from :attr:`text_cache` or encoded again."""
        for attr in ("_text_cache", "_negative_cache", "_cond_cache"):
            if isinstance(getattr(self, attr, None), dict):
                getattr(self, attr).clear()

    def release_text_encoders(self) -> int:
        """Drop the text encoders (and the families' per-prompt caches on the device); returns the
        bytes of parameters released. Prompts not cached by then can no longer be encoded."""
        freed = 0
        for attr in self.TEXT_ENCODERS:
            m = getattr(self, attr, None)
            if isinstance(m, torch.nn.Module):
                freed += sum(p.numel() * p.element_size() for p in m.parameters())
                setattr(self, attr, None)
                self.released_encoders = self.released_encoders | {attr}
        self.forget_prompt_rows()                     # the families' rows, now in text_cache
        gc.collect()
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    # The checkpoint folder the weights came from (``model.path``, set by ``models.build_adapter``;
    # None for ``model.init``): where an export finds the encoders this build left out.
    source_path: Path | None = None
    # The encoder attributes :meth:`release_text_encoders` dropped (an export copies their folders).
    released_encoders: frozenset[str] = frozenset()

    def save_encoders(self, directory: Path) -> None:
        """Save the conditioning encoders this build holds (:attr:`TEXT_ENCODERS`), each as its
        pipeline folder ``directory/<attr>``, and a ``model_index.json`` naming them as diffusers
        does (``[library, class]``): the folder a denoiser-only build's export copies them from
        (:attr:`source_path`, :meth:`copy_released_parts`)."""
        directory.mkdir(parents=True, exist_ok=True)
        index: dict[str, list[str]] = {}
        for attr in self.TEXT_ENCODERS:
            m = getattr(self, attr, None)
            if not isinstance(m, torch.nn.Module):
                continue
            m.save_pretrained(str(directory / attr))
            mod = type(m).__module__.split(".")
            # diffusers names a class of one pipeline's own module by that pipeline ("ltx2").
            lib = mod[2] if mod[:2] == ["diffusers", "pipelines"] and len(mod) > 3 else mod[0]
            index[attr] = [lib, type(m).__name__]
        (directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def copy_released_parts(self, directory: Path) -> None:
        """After a family's ``save_pretrained`` wrote ``directory`` without a conditioning encoder this
        build left out (or released), copy that encoder's folder (and ``model_index.json`` entry) from
        :attr:`source_path` unchanged: an export never builds the encoder. A source folder inside
        ``directory`` is the export's own staging (:meth:`save_encoders`): its folders are moved, not
        written a second time. A one-line :class:`ModelError` names what it needs when there is no such
        folder."""
        index_file = directory / "model_index.json"
        index = json.loads(index_file.read_text())
        absent = [a for a in self.TEXT_ENCODERS if a in self.released_encoders and getattr(self, a, None) is None
                  and (index.get(a) or [None])[0] is None]
        if not absent:
            return
        src = Path(self.source_path) if self.source_path is not None else None
        source_index = json.loads((src / "model_index.json").read_text()) \
            if src is not None and (src / "model_index.json").is_file() else {}
        for attr in absent:
            if src is None or not (src / attr).is_dir() or (source_index.get(attr) or [None])[0] is None:
                where = f"model.path {src} has no {attr}/ folder" if src is not None else "the model has no model.path"
                raise ModelError(f"export needs the {attr} weights to copy and {where}; export from a run whose "
                                 f"model.path holds {attr}/")
            if src.resolve().is_relative_to(directory.resolve()):
                shutil.rmtree(directory / attr, ignore_errors=True)
                (src / attr).rename(directory / attr)
            else:
                shutil.copytree(src / attr, directory / attr, dirs_exist_ok=True)
            index[attr] = source_index[attr]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def encode_negative(self, negative_prompt: str, prompts: list[str]) -> "Text":
        """The unconditional (CFG) conditioning of the rows ``prompts``: the negative prompt's text;
        image-to-video families keep each row's image, as their pipelines do."""
        return self.encode_prompts([negative_prompt] * len(prompts))

    def expert_for(self, sigma: float) -> int:
        """The expert (0 = ``transformer``, 1 = ``transformer_2``) that denoises at ``sigma``."""
        return 0

    def expert_trains(self, expert: int) -> bool:
        """Whether the expert has trainable parameters (SDE steps are drawn only where one does)."""
        return True

    # Routing by noise level (``model.base_below``): below this sigma the frozen base model denoises
    # (:meth:`reference`), the tuned weights only at or above it, as ``WanPipeline`` routes its
    # experts (``t >= boundary_ratio * 1000``: the first expert). None: the tuned model everywhere.
    base_below: float | None = None

    def uses_base(self, sigma: float) -> bool:
        """Whether a step at ``sigma`` is denoised by the frozen base model (``model.base_below``)."""
        return self.base_below is not None and sigma * 1000.0 < self.base_below * 1000.0

    def policy_at(self, sigma: float) -> contextlib.AbstractContextManager[None]:
        """The model that denoises at ``sigma``: within, :meth:`velocity` is the base model's if
        :meth:`uses_base` says so, else the tuned one's."""
        return self.reference() if self.uses_base(sigma) else contextlib.nullcontext()

    @abc.abstractmethod
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """``(C, F, H, W)`` of the latent for a video of that size; a clear error if impossible.
        A family of several token streams (LTX-2: video and audio) carries them flat: ``(E,)``, laid
        out by :meth:`token_map`."""

    # Streams (by name) sampled but not trained (``model.frozen_streams``): set by the run builder.
    frozen_streams: tuple[str, ...] = ()
    # The names of the family's token streams (one stream: none to freeze).
    STREAMS: tuple[str, ...] = ("video",)

    def token_map(self, latent_shape: tuple[int, ...]) -> "sde.Tokens":
        """How a latent of ``latent_shape`` is cut into tokens, as :mod:`flowdppo_video.sde`'s token
        functions take it: the transformer's ``(pt, ph, pw)`` patch (one stream), or the
        :class:`~flowdppo_video.sde.TokenStreams` of a flat multi-stream latent."""
        return self.patch_size

    def schedule(self, num_steps: int, shift: float, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The sigmas ``(K+1,)`` float64 of a ``num_steps`` rollout: :func:`sde.flow_schedule` with
        ``sampler.shift``; a family whose pipeline shifts by the sequence length overrides it."""
        return sde.flow_schedule(num_steps, shift)

    # Whether decoded videos come with sound (:meth:`decode_audio`).
    has_audio: bool = False

    def decode_audio(self, latents: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """The sound of latents ``(B, ...)``: ``(B, channels, T)`` float32 waveforms in ``[-1, 1]`` on
        the CPU and their sample rate; None for a family without audio."""
        return None

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Text:
        """Text conditioning of ``P`` prompts (``(P, L, D_text)`` or a :class:`TextBatch` of ``P``
        rows) in the transformer dtype, cached per prompt."""

    @abc.abstractmethod
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: Text, expert: int = 0) -> torch.Tensor:
        """``v(x, sigma, c)``: ``x`` ``(B, C, F, H, W)``, ``sigma`` ``(B,)``, ``text`` of ``B`` rows,
        through transformer ``expert`` (see :meth:`expert_for`).

        Returns float32 ``(B, C, F, H, W)``. The single forward path of rollout and replay.
        """

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, C, F, H, W)`` -> videos ``(B, F_px, H_px, W_px, 3)`` uint8 on the CPU."""

    @abc.abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimiser updates (LoRA adapters, or the whole transformer)."""

    @abc.abstractmethod
    def save_trainable(self, directory: Path) -> None:
        """Write what trains (safetensors) into ``directory``."""

    @abc.abstractmethod
    def load_trainable(self, directory: Path) -> None:
        """Load what :meth:`save_trainable` wrote, in place (optimiser state stays valid)."""

    @abc.abstractmethod
    def reference(self) -> contextlib.AbstractContextManager[None]:
        """Within this context, :meth:`velocity` is the frozen base model's."""

    @abc.abstractmethod
    def save_pretrained(self, directory: Path) -> None:
        """Write the whole model as a diffusers-format directory (``from_pretrained`` loads it)."""

    # ---------------------------------------------------------------- what trains, for those outside
    @abc.abstractmethod
    def reference_copies(self) -> dict[int, torch.nn.Module]:
        """Frozen copies of the trained experts kept as the reference (full fine-tuning with
        ``keep_reference``), by expert index; empty under LoRA, whose reference is the base itself."""

    # A family without a sequence-parallel plan says why in one line (the error parallel/ raises).
    sequence_parallel_refusal: str | None = None

    def sequence_parallel_plan(self, transformer: torch.nn.Module) -> "SequenceParallelPlan | None":
        """Where Ulysses sequence parallelism cuts ``transformer`` (one of :attr:`experts` or of
        :meth:`reference_copies`): the family spec's plan; ``None``: the family does not support it.
        Installed from outside by :func:`flowdppo_video.parallel.sequence.apply_sequence_parallel`."""
        spec = type(self).family_spec
        if spec is None or spec.sequence_parallel_plan is None:
            return None
        return spec.sequence_parallel_plan(transformer)


@dataclasses.dataclass(frozen=True)
class SequenceParallelPlan:
    """Where one transformer's video tokens are sharded under Ulysses sequence parallelism: plain
    data a family gives (:meth:`VideoFlowAdapter.sequence_parallel_plan`) and
    :mod:`flowdppo_video.parallel.sequence` installs as forward hooks and attention processors.

    Module names are dotted paths inside the transformer; in ``attention`` and ``replicated``,
    ``*`` matches any part of a path (``"blocks.*.attn1"``). Between ``tokens_enter`` and
    ``tokens_leave`` each rank holds ``N / degree`` of the ``N`` video tokens ``(B, N, D)``.
    """

    heads: int                              # attention heads (the SP degree must divide them)
    patch: tuple[int, int, int]             # (t, h, w): N = (F/t)(H/h)(W/w) of hidden_states (B, C, F, H, W)
    tokens_enter: str                       # module whose first input (B, N, D) is sharded over tokens
    tokens_leave: str                       # module whose output (B, N/sp, D') is gathered to (B, N, D')
    rotary: str                             # module whose output (a tensor or a tuple) is sharded over tokens
    rotary_token_dim: int                   # the token axis of that output
    attention: tuple[str, ...]              # self or joint attention: through the all-to-all
    replicated: tuple[str, ...]             # attention left as it is (to replicated text, text refiners)
    per_token_inputs: tuple[tuple[str, int], ...] = ()   # forward arguments (name, position) sharded
    #                                         when given per token, (B, N) (Wan TI2V's timestep)
