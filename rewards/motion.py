"""Weight-free motion-quality rewards from optical flow (OpenCV DIS or Farneback; RAFT optional).

Registered: ``dynamic_degree`` (how much of the video moves), ``motion_smoothness`` (is the
motion consistent), ``temporal_flicker`` (change that motion does not explain; 1 = none) and
``motion_quality`` (their geometric mean: neither a static video nor a flickering one can win).
Each returns a dict with ``"score"`` in ``[0, 1]`` and its components, logged by the trainer as
``<name>/<component>``. ``motion_quality`` computes every component from one set of flows, so
configure it alone rather than beside the other three, which would compute the flows again.

Method. Frames are resized so that their short side is ``size`` pixels (default 128, the
*working resolution*; up for small videos, down for large ones), so every threshold below means
the same at 16x16 and at 480p. For each pair of consecutive frames ``t, t+1`` the forward flow
``f_t`` (t -> t+1) and, where needed, the backward flow ``b_t`` (t+1 -> t) are computed on the
grey frames. With ``x`` a pixel of frame ``t`` and ``w(g, f)`` the field ``g`` sampled at
``x + f(x)`` (bilinear; pixels whose target leaves the frame are left out):

* **speed** of a pair: the mean of the top ``top`` fraction (5%) of flow magnitudes, in frame
  short sides per second (``|f| / size * fps``, ``fps`` the videos' real frame rate, which every
  call receives: ``video.fps`` in training, the file's own in ``score``), so it measures the
  moving part of the frame, however small, as VBench's dynamic degree does with RAFT (top 5%,
  a threshold of 6 px per frame at a 256 px short side and 8 fps, i.e. 0.1875 short sides per
  second);
* **dynamic degree**: per pair a ramp from 0 at ``threshold / 4`` (slower is flow-estimation
  noise, not motion) to 1 at ``threshold``, averaged over pairs: a soft fraction of moving pairs,
  0 for a static video, 1 when every pair moves at least ``threshold``;
* **forward-backward consistency**: the fraction of pixels with
  ``|f + w(b, f)|^2 < alpha (|f|^2 + |w(b, f)|^2) + beta`` (the test of Sundaram et al. 2010,
  looser: ``alpha`` 0.05, ``beta`` 1 working px^2, as upscaled small videos have blurrier flow),
  counted where the frame has structure (Sobel gradient; flow in a flat background is whatever
  the estimator propagated there); flow that points nowhere consistent (noise) fails it;
* **temporal consistency**: the same test between ``f_t`` and ``w(f_{t+1}, f_t)``: a point
  keeps its velocity along its path; jitter (left, right, left) fails it (needs 3 frames);
* **motion smoothness** = forward-backward consistency x temporal consistency, in ``[0, 1]``;
* **residual**: the mean absolute difference (RGB in ``[0, 1]``) between frame ``t`` and frame
  ``t+1`` warped back by ``f_t``: change that motion does not explain (flicker, noise,
  brightness pumping); **flicker score** = ``exp(-residual / scale)`` (``scale`` 0.05: a
  residual of 0.05 scores 1/e; i.i.d. noise, residual ~0.2, scores ~0.02);
* **motion quality** = ``(dynamic degree x smoothness x flicker score) ** (1/3)``.

A video of fewer than 2 frames has dynamic degree 0, smoothness 1 and flicker score 1 (nothing
moved, nothing was inconsistent), hence motion quality 0.

Flow backends (option ``flow``): ``dis`` (default; OpenCV DIS, medium preset, ~2 ms a pair at
128x228 on one core), ``farneback`` (OpenCV, ~3x slower) and ``raft`` (torchvision's RAFT with
local weights, option ``raft_weights``: a state-dict file of ``raft_large`` or ``raft_small``;
needs torchvision, which is not a dependency). Everything runs on the CPU in numpy, except RAFT,
which runs on the videos' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .registry import RewardError, register

FLOW_BACKENDS = ("dis", "farneback", "raft")
VBENCH_THRESHOLD = 6.0 / 256.0 * 8.0   # VBench: 6 px/frame at a 256 px short side, 8 fps = 0.1875 short sides/s
TEXTURE_GRADIENT = 0.02                # intensity change per working pixel at which a pixel fully counts


def _cv2():
    try:
        import cv2
    except ImportError as e:  # a dependency, but name the fix if an install lost it
        raise RewardError(f"motion rewards need OpenCV: pip install opencv-python-headless ({e})") from None
    return cv2


# --------------------------------------------------------------------------- flow

class _RaftFlow:
    """torchvision RAFT (large or small, from a local state dict), moved to the videos' device on use."""

    def __init__(self, weights: str | Path) -> None:
        from torchvision.models.optical_flow import raft_large, raft_small

        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except Exception as e:
            raise RewardError(f"raft_weights {weights}: cannot load it ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        for build in (raft_large, raft_small):
            model = build(weights=None)
            try:
                model.load_state_dict(state)
                break
            except (RuntimeError, TypeError, AttributeError):
                continue
        else:
            raise RewardError(f"raft_weights {weights}: not a state dict of torchvision raft_large or raft_small")
        self.model = model.eval()
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> None:
        if device != self.device:
            self.model.to(device)
            self.device = device

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a``, ``b`` (P, h, w, 3) uint8 -> flows a -> b (P, h, w, 2) float32 in pixels."""
        h, w = a.shape[1:3]
        ph, pw = -h % 8, -w % 8   # RAFT needs sizes divisible by 8

        def prep(x: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            return torch.nn.functional.pad(t, (0, pw, 0, ph), mode="replicate")

        out = []
        for i in range(0, a.shape[0], 8):
            flow = self.model(prep(a[i:i + 8]), prep(b[i:i + 8]))[-1][:, :, :h, :w]
            out.append(flow.permute(0, 2, 3, 1).float().cpu().numpy())
        return np.concatenate(out)


def _check_flow_options(who: str, flow: str, size: int, raft_weights: str | None) -> None:
    if flow not in FLOW_BACKENDS:
        raise RewardError(f"{who}: option flow={flow!r} is not a flow backend; "
                          f"choose one of {', '.join(FLOW_BACKENDS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise RewardError(f"{who}: option size (working short side, px) must be an integer >= 32, got {size!r}")
    if flow == "raft":
        if size < 128:   # RAFT's correlation pyramid needs 16 feature cells (8 px each) a side
            raise RewardError(f"{who}: option flow='raft' needs size >= 128, got {size}")
        try:
            import torchvision  # noqa: F401
        except ImportError:
            raise RewardError(f"{who}: option flow='raft' needs torchvision, which is not installed "
                              "(pip install torchvision, or use flow: dis)") from None
        except Exception as e:  # installed, but built for another torch
            raise RewardError(f"{who}: option flow='raft' needs torchvision, which fails to import "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if raft_weights is None or not Path(raft_weights).is_file():
            raise RewardError(f"{who}: option flow='raft' needs raft_weights, a local torchvision RAFT state-dict "
                              f"file; got {raft_weights!r}")
    elif raft_weights is not None:
        raise RewardError(f"{who}: option raft_weights is only used with flow='raft' (flow={flow!r})")


def _check_positive(who: str, **options: Any) -> None:
    for key, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise RewardError(f"{who}: option {key} must be a positive number, got {value!r}")


def _working_frames(video: np.ndarray, size: int) -> np.ndarray:
    """``(F, H, W, 3)`` uint8 -> ``(F, h, w, 3)`` uint8 with ``min(h, w) == size``."""
    cv2 = _cv2()
    f, h, w = video.shape[:3]
    s = size / min(h, w)
    hw = (max(1, round(w * s)), max(1, round(h * s)))
    if hw == (w, h):
        return np.ascontiguousarray(video)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return np.stack([cv2.resize(fr, hw, interpolation=interp) for fr in video])


class FlowEstimator:
    """Optical flow between frame stacks at the working resolution, one backend."""

    def __init__(self, flow: str = "dis", size: int = 128, raft_weights: str | None = None,
                 who: str = "motion reward") -> None:
        _check_flow_options(who, flow, size, raft_weights)
        self.flow, self.size = flow, size
        # loaded now, so a bad weights file fails when the reward is built, not mid-run
        self._raft = _RaftFlow(raft_weights) if flow == "raft" else None

    def pairs(self, a: np.ndarray, b: np.ndarray, device: torch.device | None = None) -> np.ndarray:
        """``a``, ``b`` (P, h, w, 3) uint8 -> flow a -> b, (P, h, w, 2) float32, (dx, dy) in pixels."""
        if self._raft is not None:
            self._raft.to(device or torch.device("cpu"))
            return self._raft(a, b)
        cv2 = _cv2()
        ga = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in a]
        gb = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in b]
        if self.flow == "dis":
            dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
            return np.stack([dis.calc(x, y, None) for x, y in zip(ga, gb)])
        return np.stack([cv2.calcOpticalFlowFarneback(x, y, None, 0.5, 3, 15, 3, 5, 1.2, 0)
                         for x, y in zip(ga, gb)])


def video_flow(videos: torch.Tensor, flow: str = "dis", size: int = 128) -> np.ndarray:
    """Forward flows of ``(B, F, H, W, 3)`` uint8 videos, ``(B, F-1, h, w, 2)`` float32.

    Computed at the working resolution ``(h, w)`` (short side ``size``) and expressed in pixels of
    the *original* frames per frame (so a pattern shifted ``k`` pixels a frame measures ``k``).
    """
    est = FlowEstimator(flow, size)
    arr = _as_numpy(videos)
    if arr.shape[1] < 2:
        raise RewardError(f"video_flow needs at least 2 frames, got videos of shape {tuple(arr.shape)}")
    out = []
    for v in arr:
        fr = _working_frames(v, size)
        out.append(est.pairs(fr[:-1], fr[1:], videos.device) * (min(v.shape[1:3]) / size))
    return np.stack(out)


# --------------------------------------------------------------------------- analysis

@dataclass
class MotionStats:
    """Per-video motion measurements, each ``(B,)`` float32 numpy (see the module docstring).

    ``flow_px`` mean flow magnitude in original pixels per frame; ``speed`` mean over pairs of the
    top-fraction speed, short sides per second; ``moving_pixels`` fraction of pixels (over all
    pairs) moving at least ``threshold``; ``dynamic_degree``, ``fb_consistency``,
    ``temporal_consistency``, ``smoothness`` and ``flicker_score`` in ``[0, 1]``; ``residual``
    mean unexplained change in ``[0, 1]`` intensity.
    """

    flow_px: np.ndarray
    speed: np.ndarray
    moving_pixels: np.ndarray
    dynamic_degree: np.ndarray
    fb_consistency: np.ndarray
    temporal_consistency: np.ndarray
    smoothness: np.ndarray
    residual: np.ndarray
    flicker_score: np.ndarray

    @property
    def motion_quality(self) -> np.ndarray:
        return np.cbrt(self.dynamic_degree * self.smoothness * self.flicker_score)


def _as_numpy(videos: torch.Tensor) -> np.ndarray:
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != torch.uint8:
        shape = tuple(videos.shape) if hasattr(videos, "shape") else type(videos).__name__
        raise RewardError(f"motion rewards take (B, F, H, W, 3) uint8 videos, got {shape} "
                          f"{getattr(videos, 'dtype', '')}".rstrip())
    return videos.detach().cpu().numpy()


def _warp(field: np.ndarray, flow: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``field`` (h, w, C) float32 at ``x + flow(x)``; returns (warped, in-frame mask)."""
    cv2 = _cv2()
    h, w = flow.shape[:2]
    mx = grid[..., 0] + flow[..., 0]
    my = grid[..., 1] + flow[..., 1]
    warped = cv2.remap(field, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if warped.ndim == 2:
        warped = warped[..., None]
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    return warped, inside


def _consistent_fraction(u: np.ndarray, v: np.ndarray, weight: np.ndarray, alpha: float, beta: float,
                         opposite: bool) -> float:
    """Weighted fraction of pixels where ``u`` and ``v`` agree (``u ~ -v`` if ``opposite``)."""
    d = u + v if opposite else u - v
    ok = (d ** 2).sum(-1) < alpha * ((u ** 2).sum(-1) + (v ** 2).sum(-1)) + beta
    n = weight.sum()
    return float((ok * weight).sum() / n) if n > 1e-6 * weight.size else 1.0


def _texture_weight(grey: np.ndarray) -> np.ndarray:
    """Per-pixel weight in [0, 1] of a (h, w) uint8 frame: where flow is defined at all.

    Flow in a flat region (a black background) is whatever the estimator propagated there and
    says nothing about the video's motion, so consistency is measured where the frame has
    structure: the Sobel gradient magnitude (intensity in [0, 1] per working pixel) over
    ``TEXTURE_GRADIENT``, capped at 1, spread a few pixels so an edge's neighbours count.
    """
    cv2 = _cv2()
    g = grey.astype(np.float32) / 255.0
    mag = np.sqrt(cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3) ** 2 + cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3) ** 2) / 8.0
    return cv2.GaussianBlur(np.minimum(1.0, mag / TEXTURE_GRADIENT), (5, 5), 0)


def analyse_motion(videos: torch.Tensor, estimator: FlowEstimator, fps: float,
                   threshold: float = VBENCH_THRESHOLD, top: float = 0.05, alpha: float = 0.05,
                   beta: float = 1.0, scale: float = 0.05, need_backward: bool = True) -> MotionStats:
    """Every motion measurement of ``(B, F, H, W, 3)`` uint8 videos shown at ``fps`` frames per
    second (see the module docstring).

    ``need_backward=False`` skips the backward flows (and reports consistencies of 1), for
    rewards that do not use smoothness.
    """
    arr = _as_numpy(videos)
    b, f, h, w = arr.shape[:4]
    size = estimator.size
    px = min(h, w) / size            # original pixels per working pixel
    rows = []
    for v in arr:
        if f < 2:
            rows.append((0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0))
            continue
        fr = _working_frames(v, size)
        fwd = estimator.pairs(fr[:-1], fr[1:], videos.device)                     # (P, h, w, 2)
        bwd = estimator.pairs(fr[1:], fr[:-1], videos.device) if need_backward else None
        mag = np.sqrt((fwd ** 2).sum(-1)).reshape(f - 1, -1)                      # (P, h*w) working px
        speed = mag / size * fps                                                  # short sides per second
        k = max(1, math.ceil(top * speed.shape[1]))
        top_speed = np.partition(speed, speed.shape[1] - k, axis=1)[:, -k:].mean(1)   # (P,)
        # below a quarter of the threshold is flow-estimation noise, not motion
        dynamic = np.clip((top_speed - threshold / 4) / (0.75 * threshold), 0.0, 1.0).mean()
        moving = (speed >= threshold).mean()
        hh, ww = fwd.shape[1:3]
        grid = np.stack(np.meshgrid(np.arange(ww, dtype=np.float32), np.arange(hh, dtype=np.float32)), -1)
        rgb = fr.astype(np.float32) / 255.0
        fb, tc, res = [], [], []
        for t in range(f - 1):
            warped, inside = _warp(rgb[t + 1], fwd[t], grid)
            n = inside.sum()
            res.append(float(np.abs(warped - rgb[t]).mean(-1)[inside].mean()) if n else 0.0)
            if bwd is not None:
                tex = _texture_weight(_cv2().cvtColor(fr[t], _cv2().COLOR_RGB2GRAY))
                bw, inside_b = _warp(bwd[t], fwd[t], grid)
                fb.append(_consistent_fraction(fwd[t], bw, tex * inside_b, alpha, beta, opposite=True))
                if t + 1 < f - 1:
                    nxt, inside_n = _warp(fwd[t + 1], fwd[t], grid)
                    tc.append(_consistent_fraction(fwd[t], nxt, tex * inside_n, alpha, beta, opposite=False))
        rows.append((float(mag.mean() * px), float(top_speed.mean()), float(moving), float(dynamic),
                     float(np.mean(fb)) if fb else 1.0, float(np.mean(tc)) if tc else 1.0, float(np.mean(res))))
    cols = np.asarray(rows, dtype=np.float32).reshape(b, 7).T
    flow_px, speed, moving, dynamic, fb, tc, residual = cols
    return MotionStats(flow_px=flow_px, speed=speed, moving_pixels=moving, dynamic_degree=dynamic,
                       fb_consistency=fb, temporal_consistency=tc, smoothness=fb * tc, residual=residual,
                       flicker_score=np.exp(-residual / scale).astype(np.float32))


def _tensors(**arrays: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}


# --------------------------------------------------------------------------- rewards

class _MotionReward:
    name = "motion reward"

    def __init__(self, flow: str = "dis", size: int = 128, raft_weights: str | None = None) -> None:
        self.estimator = FlowEstimator(flow, size, raft_weights, who=self.name)


@register("dynamic_degree")
class DynamicDegree(_MotionReward):
    """How much of the video moves, in ``[0, 1]``: 0 static, 1 when every frame pair moves.

    Per pair, the speed of its fastest ``top`` fraction of pixels (frame short sides per second at
    the videos' real ``fps``, given with each call), ramped from 0 at ``threshold / 4`` to 1 at
    ``threshold`` (default VBench's, 0.1875), averaged over pairs. Noise moves too: pair it with
    smoothness and flicker (``motion_quality``). Extras: ``speed`` (short sides/s), ``flow_px``
    (mean flow, original px/frame), ``moving_pixels`` (fraction).
    """

    name = "dynamic_degree"

    def __init__(self, flow: str = "dis", size: int = 128, threshold: float = VBENCH_THRESHOLD,
                 top: float = 0.05, raft_weights: str | None = None) -> None:
        super().__init__(flow, size, raft_weights)
        _check_positive(self.name, threshold=threshold, top=top)
        if top > 1:
            raise RewardError(f"{self.name}: option top (fraction of pixels) must be in (0, 1], got {top!r}")
        self.threshold, self.top = float(threshold), float(top)

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = analyse_motion(videos, self.estimator, fps=fps, threshold=self.threshold, top=self.top,
                           need_backward=False)
        return _tensors(score=m.dynamic_degree, speed=m.speed, flow_px=m.flow_px, moving_pixels=m.moving_pixels)


@register("motion_smoothness")
class MotionSmoothness(_MotionReward):
    """Flow consistency in ``[0, 1]``, 1 = perfectly consistent motion (a static video too).

    Forward-backward consistency x temporal consistency (fractions of pixels passing
    ``|d|^2 < alpha (|u|^2 + |v|^2) + beta``, working px). Extras: ``fb_consistency``,
    ``temporal_consistency``.
    """

    name = "motion_smoothness"

    def __init__(self, flow: str = "dis", size: int = 128, alpha: float = 0.05, beta: float = 1.0,
                 raft_weights: str | None = None) -> None:
        super().__init__(flow, size, raft_weights)
        _check_positive(self.name, alpha=alpha, beta=beta)
        self.alpha, self.beta = float(alpha), float(beta)

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = analyse_motion(videos, self.estimator, fps=fps, alpha=self.alpha, beta=self.beta)
        return _tensors(score=m.smoothness, fb_consistency=m.fb_consistency,
                        temporal_consistency=m.temporal_consistency)


@register("temporal_flicker")
class TemporalFlicker(_MotionReward):
    """``exp(-residual / scale)`` in ``[0, 1]``, 1 = no flicker: ``residual`` is the mean absolute
    change (RGB in [0, 1]) between a frame and the next one warped back by the flow. Extra:
    ``residual``."""

    name = "temporal_flicker"

    def __init__(self, flow: str = "dis", size: int = 128, scale: float = 0.05,
                 raft_weights: str | None = None) -> None:
        super().__init__(flow, size, raft_weights)
        _check_positive(self.name, scale=scale)
        self.scale = float(scale)

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        if videos.ndim == 5 and videos.shape[1] < 2:   # no frame pair: "no flicker" would be its top score
            raise ValueError(f"temporal_flicker needs videos of at least 2 frames to compare, got {videos.shape[1]}")
        m = analyse_motion(videos, self.estimator, fps=fps, scale=self.scale, need_backward=False)
        return _tensors(score=m.flicker_score, residual=m.residual)


@register("motion_quality")
class MotionQuality(_MotionReward):
    """``(dynamic_degree x motion_smoothness x temporal_flicker) ** (1/3)`` in ``[0, 1]``.

    A geometric mean, so a static video (dynamic degree 0) scores 0 and noise or flicker
    (smoothness and flicker score near 0) scores near 0; only consistent, visible motion
    scores high. Options as the three components'. Extras: every component.
    """

    name = "motion_quality"

    def __init__(self, flow: str = "dis", size: int = 128, threshold: float = VBENCH_THRESHOLD,
                 top: float = 0.05, alpha: float = 0.05, beta: float = 1.0, scale: float = 0.05,
                 raft_weights: str | None = None) -> None:
        super().__init__(flow, size, raft_weights)
        _check_positive(self.name, threshold=threshold, top=top, alpha=alpha, beta=beta, scale=scale)
        if top > 1:
            raise RewardError(f"{self.name}: option top (fraction of pixels) must be in (0, 1], got {top!r}")
        self.kw = dict(threshold=float(threshold), top=float(top), alpha=float(alpha),
                       beta=float(beta), scale=float(scale))

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = analyse_motion(videos, self.estimator, fps=fps, **self.kw)
        return _tensors(score=m.motion_quality, dynamic_degree=m.dynamic_degree, smoothness=m.smoothness,
                        flicker_score=m.flicker_score, speed=m.speed, flow_px=m.flow_px,
                        fb_consistency=m.fb_consistency, temporal_consistency=m.temporal_consistency,
                        residual=m.residual)
