"""``clap_audio``: text-audio alignment of a video's sound with its prompt, from a CLAP model
(transformers ``ClapModel`` + ``ClapProcessor``, loaded from a local directory, ``local_files_only``).

The waveform (``(C, T)`` at the rate the videos' :class:`~rewards.registry.Audio` gives) is mixed
to mono, resampled linearly to the feature extractor's rate (48 kHz for the published CLAP
checkpoints, e.g. laion/clap-htsat-unfused), cut to the extractor's window (10 s there) from the
start, and embedded; the prompt is embedded by the text
tower. The score is ``(cos + 1) / 2`` of the normalised embeddings, in ``[0, 1]``; ``cosine`` is
logged beside it. A video without sound is the caller's error (a family that makes none: LTX-2
makes sound, the other families do not).
"""

from __future__ import annotations

import torch

from .common import check_videos, checkpoint_dir, load_local, positive, resolve_device, resolve_dtype
from .registry import Audio, register


def _features(out: object) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def resample(wave: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """``(B, T)`` waveforms at ``rate`` -> at ``target`` samples per second (linear interpolation)."""
    if rate == target:
        return wave
    n = max(1, round(wave.shape[-1] * target / rate))
    return torch.nn.functional.interpolate(wave[:, None].float(), size=n, mode="linear", align_corners=False)[:, 0]


@register("clap_audio")
class ClapAudio:
    """CLAP text-audio similarity of each video's sound with its prompt, in ``[0, 1]`` (module docstring).

    Options: ``model`` (a local CLAP checkpoint directory with its processor), ``batch_size``,
    ``device``, ``dtype`` (``auto``: bfloat16 on CUDA, float32 on CPU).
    """

    default_retries = 0

    def __init__(self, model: str, batch_size: int = 8, device: str = "auto", dtype: str = "auto") -> None:
        self.batch_size = positive("batch_size", batch_size, int)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.path = path = checkpoint_dir(model)
        from transformers import ClapModel, ClapProcessor

        self.processor, self.model = load_local(ClapProcessor, ClapModel, path, self.dtype, "CLAP")
        self.model.to(self.device).eval()
        self.rate = int(self.processor.feature_extractor.sampling_rate)

    @torch.inference_mode()
    def cosines(self, audio: Audio, prompts: list[str]) -> torch.Tensor:
        """``(b,)`` cosine of each waveform with its prompt."""
        mono = resample(audio.waveforms.float().mean(dim=1), audio.sample_rate, self.rate)
        # At most the extractor's window, from the start: its own truncation of longer sound is a random crop.
        mono = mono[:, :int(self.processor.feature_extractor.nb_max_samples)]
        feats = self.processor.feature_extractor(list(mono.cpu().numpy()), sampling_rate=self.rate,
                                                 return_tensors="pt")
        txt = self.processor.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        a = _features(self.model.get_audio_features(
            input_features=feats["input_features"].to(self.device, self.dtype),
            is_longer=feats.get("is_longer", None) if feats.get("is_longer", None) is None
            else feats["is_longer"].to(self.device))).float()
        t = _features(self.model.get_text_features(input_ids=txt["input_ids"].to(self.device),
                                                   attention_mask=txt["attention_mask"].to(self.device))).float()
        return (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(t, dim=-1)).sum(-1).cpu()

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float,
                 audio: Audio | None = None) -> dict[str, torch.Tensor]:
        check_videos(videos, prompts)       # fps unused: the sound is judged as a whole
        if audio is None:
            raise ValueError("clap_audio scores the videos' sound, and these videos have none (a model family "
                             "with audio, such as ltx2, or files with an audio stream)")
        if audio.waveforms.shape[0] != videos.shape[0]:
            raise ValueError(f"{audio.waveforms.shape[0]} waveforms for {videos.shape[0]} videos")
        cos = torch.cat([self.cosines(audio.rows(slice(s, s + self.batch_size)), prompts[s:s + self.batch_size])
                         for s in range(0, videos.shape[0], self.batch_size)])
        return {"score": ((cos + 1) / 2).float(), "cosine": cos.float()}
