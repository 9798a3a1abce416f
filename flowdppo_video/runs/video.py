"""Writing and reading video files (mp4 with av, read back with decord or av)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch


def write_video(path: str | Path, frames: torch.Tensor | np.ndarray, fps: float = 8.0,
                audio: torch.Tensor | np.ndarray | None = None, audio_rate: int | None = None) -> Path:
    """Write ``(F, H, W, 3)`` uint8 frames as H.264 mp4 (yuv420p, plays in browsers), with their
    sound when given: ``audio`` ``(channels, T)`` float waveforms in ``[-1, 1]`` at ``audio_rate``
    samples per second, as an AAC stream (1 or 2 channels).

    Odd sizes are padded by one pixel (H.264 in yuv420p needs even sizes). The file appears
    under its name only when complete.
    """
    import av

    sound = None
    if audio is not None:
        sound = (audio.detach().float().cpu().numpy() if isinstance(audio, torch.Tensor)
                 else np.asarray(audio, dtype=np.float32))
        if sound.ndim != 2 or sound.shape[0] not in (1, 2) or not audio_rate or audio_rate <= 0:
            raise ValueError(f"audio must be (channels, T) with 1 or 2 channels and a sample rate > 0, got "
                             f"{sound.shape} at {audio_rate}")
        sound = np.ascontiguousarray(np.clip(sound, -1.0, 1.0).astype(np.float32))
    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    with av.open(str(tmp), mode="w") as out:
        # A container's rate is a fraction: 8.0 -> 8, 23.976 -> 2997/125 (denominators up to 1001).
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        # Every stream is added before the first packet (the header is written then).
        sound_stream = None if sound is None else out.add_stream(
            "aac", rate=int(audio_rate), layout="mono" if sound.shape[0] == 1 else "stereo")
        for f in arr:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
        if sound is not None:
            _mux_audio(out, sound_stream, sound, int(audio_rate))
    tmp.replace(path)
    return path


def _mux_audio(out: Any, stream: Any, sound: np.ndarray, rate: int) -> None:
    """``(channels, T)`` float32 into the AAC ``stream`` of ``out`` (planar float frames of 1024 samples)."""
    import av

    layout = "mono" if sound.shape[0] == 1 else "stereo"
    for start in range(0, sound.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(sound[:, start:start + 1024], format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, start
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


def read_audio(path: str | Path) -> tuple[np.ndarray, int] | None:
    """A file's first audio stream as ``(channels, T)`` float32 in ``[-1, 1]`` and its sample rate;
    None when it has no sound."""
    import av

    with av.open(str(path)) as src:
        if not src.streams.audio:
            return None
        stream = src.streams.audio[0]
        parts = [f.to_ndarray().astype(np.float32) for f in src.decode(stream)]
        rate = int(stream.rate)
    if not parts:
        return None
    planar = [p if p.shape[0] <= 2 and p.ndim == 2 else p.reshape(-1, 1).T for p in parts]
    return np.concatenate(planar, axis=1), rate


def read_video(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """All frames of a video file as ``(F, H, W, 3)`` uint8 (decord, else av). ``size``: ``(height,
    width)`` to scale every frame to as it is decoded (av), so the full-size frames are never held."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    if size is not None:
        return _read_scaled(path, size)
    import av

    # av opens the container first (quietly): decord's own ffmpeg would print its log lines on
    # stderr ("moov atom not found") for a file that is not a video, around our one warning line.
    with av.open(str(path)):
        pass
    try:
        import decord

        vr = decord.VideoReader(str(path))
        return vr.get_batch(list(range(len(vr)))).asnumpy()
    except Exception:  # no decord here, or it mis-sizes a very small video: av reads it
        pass
    with av.open(str(path)) as src:
        return np.stack([f.to_ndarray(format="rgb24") for f in src.decode(video=0)])


def declared_frames(path: str | Path) -> int | None:
    """The frame count a video file's container declares for its first video stream, or None
    when it declares none (GIF, some streams) or cannot be opened."""
    import av

    try:
        with av.open(str(path)) as src:
            n = src.streams.video[0].frames if src.streams.video else 0
    except Exception:  # noqa: BLE001 - an unreadable header: nothing declared
        return None
    return int(n) if n and n > 0 else None


def video_fps(path: str | Path) -> float:
    """The frame rate a video file's container gives its first video stream (frames per second).

    The stream's average rate, else its guessed (r_frame_rate) one; a ``ValueError`` naming the
    file when neither is there (then the caller must be told the rate).
    """
    import av

    with av.open(str(path)) as src:
        if not src.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = src.streams.video[0]
        for rate in (stream.average_rate, stream.guessed_rate):
            if rate is not None and rate > 0:
                return float(rate)
    raise ValueError(f"{path}: its container gives no frame rate (give --fps)")


def _read_scaled(path: Path, size: tuple[int, int]) -> np.ndarray:
    import av

    h, w = size
    frames: list[np.ndarray] = []
    with av.open(str(path)) as src:
        for f in src.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24", width=w, height=h))
    if not frames:
        raise ValueError(f"{path} has no frames")
    return np.stack(frames)


def probe_video(path: str | Path) -> tuple[int | None, int, int]:
    """``(frames, height, width)`` of a video file's first video stream from its container, without
    decoding: frames as declared, else estimated from the duration and rate, else None."""
    import av

    with av.open(str(path)) as src:
        if not src.streams.video:
            raise ValueError(f"{path} has no video stream")
        st = src.streams.video[0]
        n = int(st.frames or 0)
        if n <= 0 and st.duration and st.time_base and st.average_rate:
            n = int(round(float(st.duration * st.time_base) * float(st.average_rate)))
        return (n if n > 0 else None), int(st.codec_context.height), int(st.codec_context.width)
