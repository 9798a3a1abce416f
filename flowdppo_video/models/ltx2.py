"""LTX-2 text-to-video-with-audio (diffusers ``LTX2Pipeline``, e.g. Lightricks/LTX-2): one
``LTX2VideoTransformer3DModel`` denoises a video latent and an audio latent together (two token
streams with their own self-attention, cross-attention between them, one schedule), over
``AutoencoderKLLTX2Video`` (32x spatial, 8x temporal), ``AutoencoderKLLTX2Audio`` (mel spectrogram
latents) with ``LTX2Vocoder``, and a Gemma 3 text encoder whose stacked hidden states go through
``LTX2TextConnectors`` (one text embedding per stream).

The MDP covers both streams. The latent the rollout carries is flat, ``(B, E)``: the video tokens
as the pipeline packs them (``(N_v, D_v)``, ``D_v = C pt p p``), then the audio tokens (``(N_a,
D_a)``, one token per audio latent frame, ``D_a`` = audio channels x latent mel bins), both in the
transformer's normalised space. :meth:`LTX2Adapter.token_map` says so to the token functions of
:mod:`flowdppo_video.sde` (a :class:`~flowdppo_video.sde.TokenStreams`): every SDE step's Gaussian
is over both, the log-probability and the exact KL are summed per token over both streams, each
token with its own ``D``; ``model.frozen_streams: [audio]`` keeps the audio sampled but out of the
objective.

As ``LTX2Pipeline.__call__``: the schedule is ``linspace(1, 1/K, K)`` shifted by the scheduler
with ``mu`` from the video token count (:meth:`LTX2Adapter.schedule`; ``sampler.shift`` is not
used), the transformer takes ``sigma * 1000`` as ``timestep`` and ``sigma``, the frame rate
(``video.fps``) as ``fps`` (its rotary time axis), the audio length follows from the video's
duration. The policy's CFG is plain CFG over both streams at ``sampler.guidance_scale``; the
pipeline's extra guidance terms (STG, modality isolation, guidance rescale, a separate audio scale)
are not part of it (the comparison test sets them off).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowdppo_video.runs.config import ModelConfig

from .. import sde
from ._training import TrainableExperts
from .activations import F32, ActivationProfile, BlockBytes, Linears, rms, trains
from .base import ModelError, TextBatch, VideoFlowAdapter, cat_text, causal_latent_shape, init_parts
from .common import DTYPES, built_in, check_pipeline_folders
from .memory import read_part_configs
from .registry import FamilySpec, register
from .tokenizers import byte_tokenizer

PARTS = ("transformer", "vae", "audio_vae", "vocoder", "text_encoder", "connectors", "tokenizer")
# LTX-2's scheduler (FlowMatchEulerDiscreteScheduler, exponential time shift by the video token count
# between 1024 and 4096 tokens, stretched to a terminal sigma of 0.1): the published values, which
# LTX2Pipeline's own defaults for calculate_shift repeat. A checkpoint's scheduler_config.json wins.
SCHEDULER = {"use_dynamic_shifting": True, "base_shift": 0.95, "max_shift": 2.05, "base_image_seq_len": 1024,
             "max_image_seq_len": 4096, "shift_terminal": 0.1, "time_shift_type": "exponential"}

# A tiny LTX-2 (real classes) for tests: video latent 4 channels at 2x2x2 compression (D_v = 4), audio
# latent 2 channels x 4 mel bins (D_a = 8, a D of its own), a vocoder at 8 kHz, a 2-layer Gemma 3.
TINY_INIT: dict[str, dict[str, Any]] = {
    "transformer": {"in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
                    "attention_head_dim": 8, "cross_attention_dim": 16, "audio_in_channels": 8,
                    "audio_out_channels": 8, "audio_num_attention_heads": 2, "audio_attention_head_dim": 4,
                    "audio_cross_attention_dim": 8, "num_layers": 2, "caption_channels": 16,
                    "rope_double_precision": False, "rope_type": "split"},
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8],
            "decoder_block_out_channels": [8], "layers_per_block": [1], "decoder_layers_per_block": [1, 1],
            "spatio_temporal_scaling": [True], "decoder_spatio_temporal_scaling": [True],
            "decoder_inject_noise": [False, False], "downsample_type": ["spatial"], "upsample_residual": [False],
            "upsample_factor": [1], "timestep_conditioning": False, "patch_size": 1, "patch_size_t": 1,
            "encoder_causal": True, "decoder_causal": False},
    "audio_vae": {"base_channels": 8, "output_channels": 2, "ch_mult": [1], "num_res_blocks": 1,
                  "attn_resolutions": None, "in_channels": 2, "resolution": 32, "latent_channels": 2,
                  "norm_type": "pixel", "causality_axis": "height", "dropout": 0.0, "mid_block_add_attention": False,
                  "sample_rate": 16000, "mel_hop_length": 160, "is_causal": True, "mel_bins": 16},
    "vocoder": {"in_channels": 32, "hidden_channels": 16, "out_channels": 2, "upsample_kernel_sizes": [16, 20],
                "upsample_factors": [8, 10], "resnet_kernel_sizes": [3], "resnet_dilations": [[1, 3, 5]],
                "leaky_relu_negative_slope": 0.1, "output_sampling_rate": 8000},
    "text_encoder": {"text_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
                     "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                     "mm_tokens_per_image": 4},
    "connectors": {"caption_channels": 16, "text_proj_in_factor": 3, "video_connector_num_attention_heads": 2,
                   "video_connector_attention_head_dim": 8, "video_connector_num_layers": 1,
                   "video_connector_num_learnable_registers": None, "audio_connector_num_attention_heads": 2,
                   "audio_connector_attention_head_dim": 8, "audio_connector_num_layers": 1,
                   "audio_connector_num_learnable_registers": None, "connector_rope_base_seq_len": 32,
                   "rope_theta": 10000.0, "rope_double_precision": False, "causal_temporal_positioning": False,
                   "rope_type": "split"},
}
_TUPLES = {"vae": ("block_out_channels", "decoder_block_out_channels", "layers_per_block", "decoder_layers_per_block",
                   "spatio_temporal_scaling", "decoder_spatio_temporal_scaling", "decoder_inject_noise",
                   "downsample_type", "upsample_residual", "upsample_factor"),
           "audio_vae": ("ch_mult",)}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The latent grid of one video size: video ``(C, F, H, W)`` (unpatched), audio ``(C_a, L, M)``."""

    video: tuple[int, int, int, int]
    audio: tuple[int, int, int]
    patch: tuple[int, int, int]

    @property
    def streams(self) -> tuple[tuple[int, int, tuple[int, ...]], tuple[int, int, tuple[int, ...]]]:
        c, f, h, w = self.video
        pt, ph, pw = self.patch
        grid = (f // pt, h // ph, w // pw)
        ca, length, mel = self.audio
        return (grid[0] * grid[1] * grid[2], c * pt * ph * pw, grid), (length, ca * mel, (length,))

    @property
    def elements(self) -> int:
        return sum(n * d for n, d, _ in self.streams)


def _vocoder_class(name: str | None) -> Any:
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder, LTX2VocoderWithBWE

    return LTX2VocoderWithBWE if name == "LTX2VocoderWithBWE" else LTX2Vocoder


class LTX2Adapter(TrainableExperts, VideoFlowAdapter):
    """LTX-2: the transformer (both streams) trains; Gemma 3, the connectors, both autoencoders and
    the vocoder are frozen. Text conditioning per prompt (a :class:`TextBatch`): the connectors'
    ``video`` and ``audio`` embeddings and their ``mask``."""

    PIPELINE = "LTX2Pipeline"
    FAMILY = "ltx2"
    has_audio = True
    STREAMS = ("video", "audio")
    masks_attention = True
    # Why parallel.sequence_parallel > 1 is refused (no plan yet), in one line.
    sequence_parallel_refusal = (
        "LTX-2 has no sequence-parallel plan yet: its video tokens could be sharded, but its audio stream is short "
        "(25 tokens a second) and replicated, and the video-to-audio cross-attention of every block reads all the "
        "video tokens as keys, which this installer cannot gather; set parallel.sequence_parallel=1 (data parallel "
        "with ZeRO-3 shards the 19B transformer)")
    TEXT_ENCODERS = ("text_encoder", "connectors")
    FROZEN_PARTS = ("vae", "audio_vae", "vocoder")

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, audio_vae: torch.nn.Module,
                 vocoder: torch.nn.Module, text_encoder: torch.nn.Module, connectors: torch.nn.Module, tokenizer: Any,
                 *, device: torch.device, dtype: torch.dtype, max_sequence_length: int,
                 scheduler_config: dict[str, Any] | None = None) -> None:
        self.device, self.dtype, self.max_sequence_length = device, dtype, max_sequence_length
        self.experts = [transformer.to(device=device)]
        self.trained = [0]
        self._init_training()
        self.vae = vae.to(device=device).eval().requires_grad_(False)
        self.audio_vae = audio_vae.to(device=device).eval().requires_grad_(False)
        self.vocoder = vocoder.to(device=device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device=device).eval().requires_grad_(False)
        self.connectors = connectors.to(device=device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler_config = {**SCHEDULER, **{k: v for k, v in (scheduler_config or {}).items()
                                                  if not k.startswith("_")}}
        tcfg = self.transformer.config
        self.patch_size = (int(tcfg.patch_size_t), int(tcfg.patch_size), int(tcfg.patch_size))
        self.scale_spatial = int(self.vae.spatial_compression_ratio)
        self.scale_temporal = int(self.vae.temporal_compression_ratio)
        self.latent_channels = int(self.vae.config.latent_channels)
        acfg = self.audio_vae.config
        self.audio_channels = int(acfg.latent_channels)
        self.audio_mel_bins = int(acfg.mel_bins) // int(self.audio_vae.mel_compression_ratio)
        if int(tcfg.in_channels) != self.latent_channels:
            raise ModelError(f"transformer in_channels {tcfg.in_channels} != vae latent_channels {self.latent_channels}")
        if int(tcfg.audio_in_channels) != self.audio_channels * self.audio_mel_bins:
            raise ModelError(f"transformer audio_in_channels {tcfg.audio_in_channels} != audio_vae latent_channels "
                             f"{self.audio_channels} x latent mel bins {self.audio_mel_bins}")
        self._geometries: dict[int, Geometry] = {}
        self._text_cache: dict[str, TextBatch] = {}

    # ---------------------------------------------------------------- building
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device, dtype: str = "float32",
                        max_sequence_length: int = 1024) -> "LTX2Adapter":
        """A directory as ``LTX2Pipeline.save_pretrained`` lays it out (e.g. Lightricks/LTX-2)."""
        from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel
        from diffusers.pipelines.ltx2 import LTX2TextConnectors
        from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

        p = Path(path)
        check_pipeline_folders(p, "LTX2VideoTransformer3DModel", cls.FAMILY, PARTS)
        tdtype = DTYPES[dtype]
        voc = json.loads((p / "vocoder" / "config.json").read_text()).get("_class_name")
        sched = p / "scheduler" / "scheduler_config.json"
        return cls(LTX2VideoTransformer3DModel.from_pretrained(p, subfolder="transformer", torch_dtype=tdtype),
                   AutoencoderKLLTX2Video.from_pretrained(p, subfolder="vae", torch_dtype=torch.float32),
                   AutoencoderKLLTX2Audio.from_pretrained(p, subfolder="audio_vae", torch_dtype=torch.float32),
                   _vocoder_class(voc).from_pretrained(p, subfolder="vocoder", torch_dtype=torch.float32),
                   Gemma3ForConditionalGeneration.from_pretrained(p / "text_encoder", dtype=tdtype),
                   LTX2TextConnectors.from_pretrained(p, subfolder="connectors", torch_dtype=tdtype),
                   AutoTokenizer.from_pretrained(p / "tokenizer"), device=device, dtype=tdtype,
                   max_sequence_length=max_sequence_length,
                   scheduler_config=json.loads(sched.read_text()) if sched.is_file() else None)

    @classmethod
    def from_config(cls, init: dict[str, Any], *, device: torch.device, dtype: str = "float32",
                    max_sequence_length: int = 1024, seed: int = 0) -> "LTX2Adapter":
        """Random weights from ``model.init`` parts (missing ones: :data:`TINY_INIT`); a byte tokenizer."""
        from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel
        from diffusers.pipelines.ltx2 import LTX2TextConnectors
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        parts = init_parts(init, TINY_INIT)
        for part, keys in _TUPLES.items():
            parts[part] = {k: tuple(v) if k in keys and isinstance(v, list) else v for k, v in parts[part].items()}
        tok = byte_tokenizer()
        tdtype = DTYPES[dtype]
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            with built_in(tdtype):
                transformer = LTX2VideoTransformer3DModel(**parts["transformer"])
                te = dict(parts["text_encoder"])
                te["text_config"] = {"vocab_size": len(tok), "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1,
                                     **te.get("text_config", {})}
                text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(**te))
                connectors = LTX2TextConnectors(**parts["connectors"])
            vae = AutoencoderKLLTX2Video(**parts["vae"])
            audio_vae = AutoencoderKLLTX2Audio(**parts["audio_vae"])
            vocoder = _vocoder_class(None)(**parts["vocoder"])
        except (TypeError, ValueError, KeyError) as e:
            raise ModelError(f"bad model.init: {str(e).splitlines()[0]}") from None
        finally:
            torch.random.set_rng_state(state)
        vae.use_framewise_encoding = vae.use_framewise_decoding = False
        if tdtype != torch.float32:
            transformer, text_encoder, connectors = (m.to(tdtype) for m in (transformer, text_encoder, connectors))
        return cls(transformer, vae, audio_vae, vocoder, text_encoder.eval(), connectors, tok, device=device,
                   dtype=tdtype, max_sequence_length=max_sequence_length)

    def pipeline(self, transformer: torch.nn.Module | None = None) -> Any:
        """An ``LTX2Pipeline`` of these parts (``transformer``: the plain one by default)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, LTX2Pipeline

        return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**self.scheduler_config), vae=self.vae,
                            audio_vae=self.audio_vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                            connectors=self.connectors, transformer=transformer or self.export_single(),
                            vocoder=self.vocoder)

    def save_pretrained(self, directory: Path) -> None:
        """A diffusers ``LTX2Pipeline`` directory."""
        self.pipeline().save_pretrained(str(directory))

    # ---------------------------------------------------------------- the latent
    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int]:
        """``(E,)``: the video tokens then the audio tokens, flat (see :meth:`token_map`); the audio
        length follows from ``num_frames / video.fps`` as in the pipeline."""
        video = causal_latent_shape(num_frames, height, width, self.scale_temporal, self.scale_spatial,
                                    self.patch_size, self.latent_channels)
        acfg = self.audio_vae.config
        per_second = int(acfg.sample_rate) / int(acfg.mel_hop_length) / float(self.audio_vae.temporal_compression_ratio)
        length = round(num_frames / float(self.frame_rate) * per_second)
        if length < 1:
            raise ModelError(f"video.num_frames={num_frames} at video.fps={self.frame_rate} is too short for one "
                             "audio latent frame")
        geo = Geometry(video, (self.audio_channels, length, self.audio_mel_bins), self.patch_size)
        known = self._geometries.get(geo.elements)
        if known is not None and known != geo:      # (E,) alone could not tell them apart
            raise ModelError(f"two latent geometries of {geo.elements} elements (video {known.video} and {geo.video}): "
                             "an LTX-2 adapter serves one video size at a time")
        self._geometries[geo.elements] = geo
        return (geo.elements,)

    def geometry(self, latent_shape: tuple[int, ...]) -> Geometry:
        if len(latent_shape) != 1 or int(latent_shape[0]) not in self._geometries:
            raise ModelError(f"latent {tuple(latent_shape)} is not one this LTX-2 adapter made (latent_shape first)")
        return self._geometries[int(latent_shape[0])]

    def token_map(self, latent_shape: tuple[int, ...]) -> sde.TokenStreams:
        (nv, dv, gv), (na, da, ga) = self.geometry(latent_shape).streams
        unknown = set(self.frozen_streams) - {"video", "audio"}
        if unknown:
            raise ModelError(f"model.frozen_streams names {sorted(unknown)}; LTX-2's streams are 'video' and 'audio'")
        return sde.TokenStreams((sde.Stream("video", nv, dv, gv, "video" not in self.frozen_streams),
                                 sde.Stream("audio", na, da, ga, "audio" not in self.frozen_streams)))

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat ``(B, E)`` -> the packed video ``(B, N_v, D_v)`` and audio ``(B, N_a, D_a)`` tokens."""
        video, audio = self.token_map((x.shape[1],)).split(x)
        return video, audio

    def schedule(self, num_steps: int, shift: float, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """``LTX2Pipeline``'s sigmas: ``linspace(1, 1/K, K)`` through the scheduler with ``mu`` from the
        video token count, then 0 (``sampler.shift`` is not used)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift

        nv = self.geometry(latent_shape).streams[0][0]
        c = self.scheduler_config
        mu = calculate_shift(nv, c.get("base_image_seq_len", 1024), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.95), c.get("max_shift", 2.05))
        scheduler = FlowMatchEulerDiscreteScheduler(**c)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas.to(torch.float64)

    # ---------------------------------------------------------------- text
    def embed_text(self, prompts: list[str]) -> TextBatch:
        """Gemma 3's stacked hidden states (the pipeline's own function) through the connectors; no cache."""
        from diffusers import LTX2Pipeline

        embeds, mask = LTX2Pipeline._get_gemma_prompt_embeds(self, prompts, max_sequence_length=self.max_sequence_length,
                                                               device=self.device, dtype=self.dtype)
        video, audio, mask = self.connectors(embeds, mask, padding_side=getattr(self.tokenizer, "padding_side", "left"))
        return TextBatch(video=video.to(self.dtype), audio=audio.to(self.dtype), mask=mask.long())

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextBatch:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        for p in missing:                               # one prompt at a time: rows never depend on the batch
            self._text_cache[p] = self.embed_text([p])
        return cat_text([self._text_cache[p] for p in prompts])

    # ---------------------------------------------------------------- the velocity
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, text: TextBatch, expert: int = 0) -> torch.Tensor:
        """Both streams through the transformer; ``x`` and the result are flat ``(B, E)``."""
        if not isinstance(text, TextBatch) or "audio" not in text.parts:
            raise ModelError("LTX-2 needs the conditioning its encode_prompts returns (video, audio, mask)")
        dev, dt = self.device, self.dtype
        geo = self.geometry((x.shape[1],))
        video, audio = self.split(x.to(device=dev, dtype=dt))
        _, f, h, w = geo.video
        pt, ph, pw = self.patch_size
        t = text.parts
        timestep = sigma.to(device=dev, dtype=torch.float32) * 1000.0
        mask = t["mask"].to(device=dev)
        out_v, out_a = self.experts[expert](
            hidden_states=video, audio_hidden_states=audio, encoder_hidden_states=t["video"].to(device=dev, dtype=dt),
            audio_encoder_hidden_states=t["audio"].to(device=dev, dtype=dt), timestep=timestep, sigma=timestep,
            encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=f // pt, height=h // ph,
            width=w // pw, fps=float(self.frame_rate), audio_num_frames=geo.audio[1], use_cross_timestep=True,
            return_dict=False)
        return torch.cat([out_v.float().flatten(1), out_a.float().flatten(1)], dim=1)

    # ---------------------------------------------------------------- decoding
    def video_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The video stream of flat latents as the VAE's ``(B, C, F, H, W)`` (denormalised)."""
        from diffusers import LTX2Pipeline

        geo = self.geometry((latents.shape[1],))
        video, _ = self.split(latents.to(self.device, torch.float32))
        _, f, h, w = geo.video
        pt, p, _ = self.patch_size
        z = LTX2Pipeline._unpack_latents(video, f // pt, h // p, w // p, p, pt)
        return LTX2Pipeline._denormalize_latents(z, self.vae.latents_mean, self.vae.latents_std,
                                                 self.vae.config.scaling_factor)

    def audio_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The audio stream of flat latents as the audio VAE's ``(B, C_a, L, M)`` (denormalised)."""
        from diffusers import LTX2Pipeline

        geo = self.geometry((latents.shape[1],))
        _, audio = self.split(latents.to(self.device, torch.float32))
        audio = LTX2Pipeline._denormalize_audio_latents(audio, self.audio_vae.latents_mean, self.audio_vae.latents_std)
        return LTX2Pipeline._unpack_audio_latents(audio, geo.audio[1], num_mel_bins=geo.audio[2])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 2) -> torch.Tensor:
        outs = []
        for part in latents.split(chunk):
            z = self.video_latents(part).to(self.vae.dtype)
            timestep = (torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)      # decode_timestep 0
                        if self.vae.config.timestep_conditioning else None)
            video = self.vae.decode(z, timestep, return_dict=False)[0]              # (b, 3, F, H, W) in [-1, 1]
            video = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            outs.append(video.permute(0, 2, 3, 4, 1).cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def decode_audio(self, latents: torch.Tensor, chunk: int = 2) -> tuple[torch.Tensor, int]:
        """``(B, channels, T)`` waveforms (the vocoder's, in [-1, 1]) and the vocoder's sample rate."""
        outs = []
        for part in latents.split(chunk):
            mel = self.audio_vae.decode(self.audio_latents(part).to(self.audio_vae.dtype), return_dict=False)[0]
            outs.append(self.vocoder(mel).float().clamp(-1, 1).cpu())
        return torch.cat(outs), int(self.vocoder.config.output_sampling_rate)


# ---------------------------------------------------------------- the family
def build(cfg: ModelConfig, path: str | None, device: torch.device) -> LTX2Adapter:
    if cfg.embedded_guidance is not None:
        raise ModelError("model.embedded_guidance: LTX-2 has no embedded guidance (use sampler.guidance_scale)")
    if path is not None:
        return LTX2Adapter.from_pretrained(path, device=device, dtype=cfg.dtype,
                                           max_sequence_length=cfg.max_sequence_length)
    return LTX2Adapter.from_config(cfg.init or {}, device=device, dtype=cfg.dtype,
                                   max_sequence_length=cfg.max_sequence_length, seed=cfg.init_seed)


def init_from_folder(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """``model.init`` of a folder of ``<part>/config.json`` files (configs/model_shapes/ltx2_19b)."""
    return read_part_configs(folder, ("transformer", "vae", "audio_vae", "vocoder", "text_encoder", "connectors"),
                             {"text_encoder": ("model_type",)})


def _attention(a: Any, lin: Linears, s: int, d_q: int, d_kv: int, heads: int, self_attn: bool
               ) -> tuple[float, float]:
    """Saved bytes of one ``LTX2Attention`` per query token and per key token (0 for self-attention,
    whose keys are the queries): q/k/v inputs, the q/k RMS norms across heads, fused attention
    (q, k, v, out, log-sum-exp) and the output projection."""
    inner = int(a.to_q.out_features)
    if self_attn:
        q = lin.saved([a.to_q, a.to_k, a.to_v], d_q) + rms(a.norm_q, s, inner) + rms(a.norm_k, s, inner)
        return q + 4 * s * inner + F32 * heads + lin.saved([a.to_out[0]], inner, counted=True), 0.0
    q = lin.saved([a.to_q], d_q) + rms(a.norm_q, s, inner) + 2 * s * inner + F32 * heads
    q += lin.saved([a.to_out[0]], inner, counted=True)
    kv = lin.saved([a.to_k, a.to_v], d_kv, counted=False) + rms(a.norm_k, s, inner) + 2 * s * inner
    return q, kv


def activation_profile(t: torch.nn.Module, s: int) -> ActivationProfile:
    """Saved-for-backward bytes of an ``LTX2VideoTransformer3DModel`` (the terms of
    :mod:`flowdppo_video.models.memory`'s docstring), per video token (``per_token``), per audio
    token (``per_token_2``) and per text token. Each block, per stream: RMSNorm + self-attention,
    RMSNorm + text cross-attention, RMSNorm + cross-modal attention (video queries over audio keys,
    audio queries over video keys), RMSNorm + GELU feed-forward; modulation and gates save their
    inputs only when they train. Built from the block's modules like the other families' profiles,
    not yet checked tensor by tensor (tests/test_planner.py does that for Wan and HunyuanVideo)."""
    c = t.config
    H, Ha = int(c.num_attention_heads), int(c.audio_num_attention_heads)
    D, Da = H * int(c.attention_head_dim), Ha * int(c.audio_attention_head_dim)
    blk = t.transformer_blocks[0]
    lin = Linears(s)
    full = trains(blk) and blk.scale_shift_table.requires_grad
    mod = s if full else 0

    def stream(d: int, heads: int, self_a: Any, text_a: Any, cross_a: Any, d_other: int, ff: Any
               ) -> tuple[float, float, float]:
        """Bytes per token of this stream, per text token, per token of the other stream."""
        fw = int(ff.net[0].proj.out_features)
        tok = 4 * (s * d + 4) + 4 * mod * d                                # four RMSNorms, modulation, gates
        tok += _attention(self_a, lin, s, d, d, heads, True)[0]
        q, kv_text = _attention(text_a, lin, s, d, int(text_a.to_k.in_features), heads, False)
        tok += q
        q, kv_other = _attention(cross_a, lin, s, d, d_other, heads, False)
        tok += q
        tok += lin.saved([ff.net[0].proj], d) + s * fw + lin.saved([ff.net[2]], fw)
        return tok, kv_text, kv_other

    v_tok, v_txt, v_from_a = stream(D, H, blk.attn1, blk.attn2, blk.audio_to_video_attn, Da, blk.ff)
    a_tok, a_txt, a_from_v = stream(Da, Ha, blk.audio_attn1, blk.audio_attn2, blk.video_to_audio_attn, D,
                                    blk.audio_ff)
    # The cross-modal keys and values are the other stream's tokens: counted per token of that stream.
    per_block = BlockBytes(v_tok + a_from_v, v_txt + a_txt, 0.0, a_tok + v_from_a)
    n = len(t.transformer_blocks)
    inputs = BlockBytes(s * D * n, 0.0, 0.0, s * Da * n)
    out = BlockBytes(s * D + 8 + Linears(s).saved([t.proj_out], D), 0.0, 0.0,
                     s * Da + 8 + Linears(s).saved([t.audio_proj_out], Da))
    fw, fwa = int(blk.ff.net[0].proj.out_features), int(blk.audio_ff.net[0].proj.out_features)
    live = BlockBytes(s * D + 2 * F32 * D + max(5 * s * D, s * D + 2 * s * fw), 2 * s * max(D, Da), 0.0,
                      s * Da + 2 * F32 * Da + max(5 * s * Da, s * Da + 2 * s * fwa))
    return ActivationProfile(per_block.scale(n), per_block, inputs, out, live, H)


def text_tokens(adapter: VideoFlowAdapter) -> int:
    """Text tokens each video (and audio) token attends to: the prompt's Gemma tokens."""
    return int(adapter.max_sequence_length)


register(FamilySpec(name="ltx2", pipeline="LTX2Pipeline", adapter=LTX2Adapter, build=build, tiny_init=TINY_INIT,
                    text_tokens=text_tokens, activation_profile=activation_profile, init_from_folder=init_from_folder,
                    unsupported_pipelines={"LTX2ImageToVideoPipeline": "image-to-video with audio",
                                           "LTX2ConditionPipeline": "conditioned video with audio"}))
