"""HunyuanVideo (1.0) image-to-video (diffusers ``HunyuanVideoImageToVideoPipeline``): HunyuanVideo-I2V
(``image_condition_type: token_replace``) and HunyuanVideo-I2V-33ch (``latent_concat``).

The conditioning is formed as diffusers 0.42's pipeline forms it, once per prompt:

* text: the pipeline's own ``encode_prompt``: the I2V prompt template with an ``<image>`` token,
  expanded to the image features of the ``LlavaForConditionalGeneration`` text encoder (its CLIP
  vision tower sees the image through the ``CLIPImageProcessor``); hidden states of layer -3, the
  template cropped, every ``image_embed_interleave``-th image token kept in front of the text
  tokens (2 for ``latent_concat``, 4 for ``token_replace``); CLIP's pooled projection of the prompt;
* image latents: the image resized to the video size, one frame through the VAE (mode),
  times ``scaling_factor``;
* ``latent_concat`` (``in_channels = 2 C + 1``): the transformer sees ``[x, image latents on latent
  frame 0 (zeros after), mask (1 on frame 0)]``. The pipeline generates one latent frame more than
  the video keeps (the image's) and drops its ``temporal_compression_ratio`` pixel frames after
  decoding: :meth:`latent_shape` adds that frame, so videos still have ``video.num_frames`` frames
  (the pipeline called with ``num_frames + 4``);
* ``token_replace`` (``in_channels = C``): the image latent replaces latent frame 0 (the transformer
  gives those tokens timestep 0 itself). Frame 0's velocity is returned as ``(x - c) / sigma`` (no
  parameters), which carries it to the image latent ``c`` as the pipeline's overwrite does.

The unconditional (CFG) rows are the pipeline's ``true_cfg`` ones: the negative prompt encoded with
a black image (and the encoder's default interleave 2), with each row's own image latents. With
``token_replace`` the conditional and unconditional texts then differ in length; both are padded
with masked tokens at the end (the transformer's attention ignores them) so the rows concatenate.

One deviation: the pipeline starts from ``0.999 noise + 0.001 image latents``; the rollout starts
from the noise.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from . import hunyuan_common
from .base import ModelError, SequenceParallelPlan, TextBatch, cat_text, causal_latent_shape, init_parts
from .common import (DTYPES, PromptImages, built_in, check_pipeline_folders, clip_processor_class, encoder_part,
                     skeleton)
from .hunyuan import TINY_INIT, HunyuanVideoAdapter
from .hunyuan_common import CLIP_MAX_LENGTH, load_shared_parts, tiny_transformer_and_vae
from .registry import FamilySpec, register
from .tokenizers import byte_level, byte_tokenizer

DEFAULT_I2V_EMBEDDED_GUIDANCE = 1.0     # HunyuanVideoImageToVideoPipeline's `guidance_scale` default
CONDITION_TYPES = ("latent_concat", "token_replace")
_INTERLEAVE = {"latent_concat": 2, "token_replace": 4}   # the pipeline's image_embed_interleave defaults
_NEGATIVE_INTERLEAVE = 2                # the pipeline encodes the negative prompt with encode_prompt's default

# Llama 3's special tokens the prompt template uses (the pipeline finds <|end_header_id|> by name).
_SPECIALS = ["<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<unk>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eot_id|>", "<image>"]

# A tiny HunyuanVideo-I2V-33ch for tests: 4 latent + 4 image-latent + 1 mask channels in; a Llava
# of a 3-layer Llama (width 16) and a 2-layer CLIP vision tower on 32x32 crops (16 image features).
TINY_I2V_INIT: dict[str, dict[str, Any]] = {
    **TINY_INIT,
    "transformer": {**TINY_INIT["transformer"], "in_channels": 9, "out_channels": 4,
                    "image_condition_type": "latent_concat"},
    "vision": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8},
}


def llava_llama_tokenizer() -> Any:
    """A byte-level tokenizer with Llama 3's template tokens, ``<image>`` and ``assistant`` as single
    tokens (the pipeline crops the 4 tokens ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>``),
    ``<|begin_of_text|>`` prepended, ``<pad>`` 0. Built locally (tests and random demo models)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast


    tok = byte_level(_SPECIALS)
    tok.add_special_tokens(_SPECIALS)
    tok.add_tokens(["assistant"])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<pad>", unk_token="<unk>")


def _prompt_template(tokenizer: Any, text_encoder: torch.nn.Module) -> dict[str, Any]:
    """The pipeline's prompt template with its token positions for ``tokenizer``: HunyuanVideo-I2V's
    own Llama tokenizer takes the pipeline's fixed numbers; another (the tiny byte tokenizer) counts
    them (tokens before the prompt, the ``<image>`` position, the vision tower's feature count)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import DEFAULT_PROMPT_TEMPLATE

    if "llama" in type(tokenizer).__name__.lower():
        return dict(DEFAULT_PROMPT_TEMPLATE)
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    image_id = int(text_encoder.config.image_token_index)
    prefix = tokenizer(template.split("{}")[0]).input_ids
    if prefix.count(image_id) != 1:
        raise ModelError(f"the tokenizer does not make the template's <image> one token (id {image_id}, the "
                         "text_encoder's image_token_index)")
    vcfg = text_encoder.config.vision_config
    length = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2
    if text_encoder.config.vision_feature_select_strategy == "full":
        length += 1
    start = prefix.index(image_id)
    return {"template": template, "crop_start": len(prefix), "image_emb_start": start,
            "image_emb_end": start + length, "image_emb_len": length}


def _pad(batch: TextBatch, length: int) -> TextBatch:
    """``embeds`` / ``mask`` padded at the end to ``length`` tokens with masked zeros."""
    embeds, mask = batch.parts["embeds"], batch.parts["mask"]
    extra = length - embeds.shape[1]
    if extra <= 0:
        return batch
    return TextBatch(**{**batch.parts, "embeds": torch.cat([embeds, embeds.new_zeros(len(batch), extra,
                                                                                   embeds.shape[2])], 1),
                        "mask": torch.cat([mask, mask.new_zeros(len(batch), extra)], 1)})


class HunyuanVideoI2VAdapter(PromptImages, HunyuanVideoAdapter):
    """HunyuanVideo image-to-video: the transformer trains; the Llava text encoder, CLIP and the VAE
    are frozen. Each prompt's image is given by :meth:`set_images` before the prompt is encoded."""

    takes_images = True

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                 tokenizer: Any, text_encoder_2: torch.nn.Module, tokenizer_2: Any, image_processor: Any, *,
                 device: torch.device, dtype: torch.dtype, max_sequence_length: int,
                 embedded_guidance: float | None = None, scheduler_config: dict[str, Any] | None = None) -> None:
        self._setup(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, device, dtype,
                    max_sequence_length, scheduler_config)
        tcfg = self.transformer.config
        self.embedded_guidance = (DEFAULT_I2V_EMBEDDED_GUIDANCE if embedded_guidance is None
                                  else float(embedded_guidance))
        if not tcfg.guidance_embeds:
            self.embedded_guidance = None
        vcfg = self.vae.config
        self.latent_channels = int(vcfg.latent_channels)
        self.scale_temporal = int(vcfg.temporal_compression_ratio)
        self.scale_spatial = int(vcfg.spatial_compression_ratio)
        self.scaling_factor = float(vcfg.scaling_factor)
        self.condition_type = tcfg.image_condition_type
        if self.condition_type not in CONDITION_TYPES:
            raise ModelError(f"transformer image_condition_type {self.condition_type!r} is not one of "
                             f"{', '.join(CONDITION_TYPES)} (an image-to-video HunyuanVideo transformer)")
        want = 2 * self.latent_channels + 1 if self.condition_type == "latent_concat" else self.latent_channels
        if int(tcfg.in_channels) != want:
            raise ModelError(f"transformer in_channels {tcfg.in_channels} != {want} for image_condition_type "
                             f"{self.condition_type!r} (vae latent_channels {self.latent_channels})")
        if int(text_encoder.config.text_config.hidden_size) != int(tcfg.text_embed_dim):
            raise ModelError(f"text_encoder text_config hidden_size {text_encoder.config.text_config.hidden_size} "
                             f"!= transformer text_embed_dim {tcfg.text_embed_dim}")
        if int(text_encoder_2.config.hidden_size) != int(tcfg.pooled_projection_dim):
            raise ModelError(f"text_encoder_2 hidden_size {text_encoder_2.config.hidden_size} != transformer "
                             f"pooled_projection_dim {tcfg.pooled_projection_dim}")
        self.image_processor = image_processor
        self.prompt_template = _prompt_template(tokenizer, self.text_encoder)
        self._init_images()
        self._text_cache: dict[str, TextBatch] = {}
        self._negative_cache: dict[str, TextBatch] = {}

    # ---------------------------------------------------------------- building
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device, dtype: str = "float32",
                        max_sequence_length: int = 256, embedded_guidance: float | None = None
                        ) -> "HunyuanVideoI2VAdapter":
        """A ``HunyuanVideoImageToVideoPipeline`` directory (e.g. hunyuanvideo-community/HunyuanVideo-I2V)."""
        from transformers import LlavaForConditionalGeneration

        p = Path(path)
        check_pipeline_folders(p, "HunyuanVideoTransformer3DModel", "hunyuan_video_i2v")
        if not (p / "image_processor").is_dir():
            raise ModelError(f"model.path {p} has no image_processor/ folder")
        tdtype = DTYPES[dtype]
        sh = load_shared_parts(p, tdtype, conditions=True)
        text_encoder = encoder_part(lambda: LlavaForConditionalGeneration.from_pretrained(p / "text_encoder", dtype=tdtype),
                                    lambda: skeleton(LlavaForConditionalGeneration, p / "text_encoder", tdtype))
        return cls(sh["transformer"], sh["vae"], text_encoder,
                   sh["tokenizer"], sh["text_encoder_2"], sh["tokenizer_2"],
                   clip_processor_class().from_pretrained(p / "image_processor"), device=device, dtype=tdtype,
                   max_sequence_length=max_sequence_length, embedded_guidance=embedded_guidance,
                   scheduler_config=sh["scheduler_config"])

    @classmethod
    def from_config(cls, init: dict[str, Any], *, device: torch.device, dtype: str = "float32",
                    max_sequence_length: int = 256, seed: int = 0, embedded_guidance: float | None = None
                    ) -> "HunyuanVideoI2VAdapter":
        """Random weights from sub-configs (missing ones take :data:`TINY_I2V_INIT`; ``text_encoder`` is
        the Llava's Llama, ``vision`` its CLIP vision tower); locally built tokenizers."""
        from transformers import (CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                                  LlavaForConditionalGeneration)

        parts = init_parts(init, TINY_I2V_INIT)
        tok, tok_2 = llava_llama_tokenizer(), byte_tokenizer()
        tok_2.model_max_length = CLIP_MAX_LENGTH
        ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIALS}
        tdtype = DTYPES[dtype]
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            # Created in the model dtype (never float32 first); the VAE stays float32.
            transformer, vae = tiny_transformer_and_vae(parts, tdtype, conditions=True)
            text = LlamaConfig(**{"vocab_size": len(tok), "pad_token_id": ids["<pad>"],
                                  "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": ids["<|end_of_text|>"],
                                  **parts["text_encoder"]})
            vision = CLIPVisionConfig(**parts["vision"])
            with built_in(tdtype):
                text_encoder = encoder_part(lambda: LlavaForConditionalGeneration(LlavaConfig(
                    text_config=text, vision_config=vision, image_token_index=ids["<image>"],
                    image_seq_length=(vision.image_size // vision.patch_size) ** 2, pad_token_id=ids["<pad>"])))
                text_encoder_2 = encoder_part(lambda: CLIPTextModel(CLIPTextConfig(**{
                    "vocab_size": len(tok_2), "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
                    "max_position_embeddings": CLIP_MAX_LENGTH, **parts["text_encoder_2"]})))
        except (TypeError, ValueError) as e:
            raise ModelError(f"bad model.init: {str(e).splitlines()[0]}") from None
        finally:
            torch.random.set_rng_state(state)
        side = int(vision.image_size)
        processor = clip_processor_class()(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        if tdtype != torch.float32:            # the buffers computed in an explicit dtype
            transformer, text_encoder, text_encoder_2 = (m.to(tdtype) for m in (transformer, text_encoder,
                                                                                text_encoder_2))
        return cls(transformer, vae, text_encoder, tok, text_encoder_2, tok_2, processor, device=device,
                   dtype=tdtype, max_sequence_length=max_sequence_length, embedded_guidance=embedded_guidance)

    def _pipeline(self, with_models: bool = False) -> Any:
        from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline

        scheduler = FlowMatchEulerDiscreteScheduler(**{"shift": 7.0, **{
            k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}}) if with_models else None
        return HunyuanVideoImageToVideoPipeline(
            text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            transformer=self.export_single() if with_models else None, vae=self.vae if with_models else None,
            scheduler=scheduler, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            image_processor=self.image_processor)

    def save_pretrained(self, directory: Path) -> None:
        """A diffusers ``HunyuanVideoImageToVideoPipeline`` directory (its ``from_pretrained`` loads it)."""
        self._pipeline(with_models=True).save_pretrained(str(directory))
        self.copy_released_parts(Path(directory))

    # ---------------------------------------------------------------- images
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        c, f, h, w = causal_latent_shape(num_frames, height, width, self.scale_temporal, self.scale_spatial,
                                         self.patch_size, self.latent_channels)
        # latent_concat: one latent frame more, the image's, dropped after decoding (see the module doc).
        return c, f + (self.condition_type == "latent_concat"), h, w

    def _forget_image_rows(self, prompt: str | None) -> None:
        # Here the image is inside each prompt's text rows (Llava's image tokens), and in the negatives'.
        if prompt is None:
            self._text_cache.clear()
            self._negative_cache.clear()
        else:
            self._text_cache.pop(prompt, None)

    def _text(self, prompt: str, image: Any, interleave: int) -> TextBatch:
        """One row of Llava embeddings (image tokens, then the text) with their mask, and CLIP's pooled."""
        embeds, pooled, mask = self._pipeline().encode_prompt(
            image=image, prompt=[prompt], prompt_template=self.prompt_template, device=self.device,
            dtype=self.dtype, max_sequence_length=self.max_sequence_length, image_embed_interleave=interleave)
        return TextBatch(embeds=embeds.to(self.dtype), mask=mask.long(), pooled=pooled.to(self.dtype))

    def _latents(self, image: Any) -> torch.Tensor:
        """``cond`` ``(C_c, F, H, W)`` of an image: the latent_concat channels or the token_replace frame."""
        from diffusers.video_processor import VideoProcessor

        frames, height, width = self._size
        pixels = VideoProcessor(vae_scale_factor=self.scale_spatial).preprocess(image, height=height, width=width)
        pixels = pixels.to(self.device, self.vae.dtype).unsqueeze(2)                   # (1, 3, 1, H, W)
        z = self.vae.encode(pixels).latent_dist.mode().float() * self.scaling_factor  # (1, C, 1, h, w)
        if self.condition_type == "token_replace":
            return z[0].to(self.dtype)
        _, f, h, w = self.latent_shape(frames, height, width)
        latents = torch.cat([z, z.new_zeros(1, z.shape[1], f - 1, h, w)], dim=2)      # the image on frame 0 only
        mask = torch.zeros(1, 1, f, h, w, device=z.device)
        mask[:, :, 0] = 1.0
        return torch.cat([latents, mask], dim=1)[0].to(self.dtype)

    def _length(self) -> int:
        """Text tokens of every row: image tokens at the larger of the two interleaves, then the text."""
        # The pipeline keeps every step-th image token and crops 4 assistant-header tokens off the text.
        n, step = self.prompt_template["image_emb_len"], min(_INTERLEAVE[self.condition_type], _NEGATIVE_INTERLEAVE)
        return (n + step - 1) // step + self.max_sequence_length - 4

    # ---------------------------------------------------------------- the interface
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextBatch:
        """Rows of ``embeds`` / ``mask`` (Llava: image tokens then the text), ``pooled`` (CLIP) and
        ``cond`` (the image latents); cached per prompt (one pipeline call each: rows are independent)."""
        for p in dict.fromkeys(prompts):
            if p not in self._text_cache:
                image = self._image(p)
                row = self._text(p, image, _INTERLEAVE[self.condition_type])
                self._text_cache[p] = TextBatch(**row.parts, cond=self._latents(image)[None])
        return cat_text([_pad(self._text_cache[p], self._length()) for p in prompts])

    @torch.no_grad()
    def encode_negative(self, negative_prompt: str, prompts: list[str]) -> TextBatch:
        """The pipeline's ``true_cfg`` rows: ``negative_prompt`` with a black image; each row's image latents."""
        conds = self.encode_prompts(prompts).parts["cond"]       # the rows' images (checks they have one)
        if negative_prompt not in self._negative_cache:
            _, height, width = self._size
            black = PIL.Image.new("RGB", (width, height), 0)
            self._negative_cache[negative_prompt] = self._text(negative_prompt, black, _NEGATIVE_INTERLEAVE)
        neg = _pad(self._negative_cache[negative_prompt], self._length())
        return TextBatch(**{k: v.expand(len(prompts), *v.shape[1:]) for k, v in neg.parts.items()}, cond=conds)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: TextBatch, expert: int = 0) -> torch.Tensor:
        if not isinstance(text, TextBatch) or "cond" not in text.parts:
            raise ModelError("an image-to-video model needs the conditioning from its encode_prompts "
                             "(text embeddings with the image condition)")
        b, dev, dt = x.shape[0], self.device, self.dtype
        sigma = sigma.to(device=dev, dtype=torch.float32)
        cond = text.parts["cond"].to(device=dev, dtype=dt)
        h = x.to(device=dev, dtype=dt)
        if self.condition_type == "latent_concat":
            h = torch.cat([h, cond], dim=1)                        # [x, image latents, mask], as the pipeline
        else:
            h = torch.cat([cond, h[:, :, 1:]], dim=2)              # the image latent is frame 0
        guidance = None
        if self.embedded_guidance is not None:
            guidance = torch.full((b,), self.embedded_guidance * 1000.0, device=dev, dtype=dt)
        t = text.parts
        out = self.experts[expert](hidden_states=h, timestep=sigma * 1000.0,
                                   encoder_hidden_states=t["embeds"].to(device=dev, dtype=dt),
                                   encoder_attention_mask=t["mask"].to(device=dev),
                                   pooled_projections=t["pooled"].to(device=dev, dtype=dt),
                                   guidance=guidance, return_dict=False)[0].float()
        if self.condition_type == "token_replace":
            # Frame 0 is not the model's to change: flow it to the image latent (no parameters).
            x0 = x[:, :, :1].to(device=dev, dtype=torch.float32)
            out = torch.cat([(x0 - cond.float()) / sigma.view(-1, 1, 1, 1, 1), out[:, :, 1:]], dim=2)
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 2) -> torch.Tensor:
        video = super().decode(latents, chunk)
        # latent_concat: the image's latent frame decodes to the first pixel frames, which the pipeline drops.
        return video[:, self.scale_temporal:] if self.condition_type == "latent_concat" else video


def sequence_parallel_plan(transformer: torch.nn.Module) -> SequenceParallelPlan:
    """HunyuanVideo's plan (:func:`.hunyuan_common.sequence_parallel_plan`); ``token_replace`` refused."""
    if transformer.config.image_condition_type == "token_replace":
        # Its blocks treat the first frame's token count as the leading tokens of whatever they hold.
        raise ModelError("sequence parallelism does not support image_condition_type 'token_replace'")
    return hunyuan_common.sequence_parallel_plan(transformer)


# HunyuanVideo-I2V (token_replace) and HunyuanVideo-I2V-33ch (latent_concat).
register(FamilySpec(name="hunyuan_video_i2v", pipeline="HunyuanVideoImageToVideoPipeline",
                    adapter=HunyuanVideoI2VAdapter, build=functools.partial(hunyuan_common.build, HunyuanVideoI2VAdapter),
                    tiny_init=TINY_I2V_INIT, activation_profile=hunyuan_common.activation_profile,
                    sequence_parallel_plan=sequence_parallel_plan, staged=True))
