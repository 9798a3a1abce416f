"""Verifiable rewards for the shapes world, computed from decoded pixels only.

Every reward here looks at the video the way a judge would: it estimates the background, segments
the one foreground object in each frame, measures its area, centroid, colour and a shape
descriptor, tracks the centroid over frames, and compares what it measured with what the prompt
(``"a red circle moves left slowly on black"``, see :mod:`rewards.shapes_world`) asks
for. Nothing reads the generator's state and nothing calls the renderer; the only world
knowledge used is the grammar's palette and direction vectors, and the definition of the three
shapes (:func:`rewards.shapes_world.shape_mask`), from which the shape classifier's
reference descriptors are computed once.

:func:`analyse` is the shared, vectorised measurement, pure numpy on the CPU (a batch of 32
videos of 8x16x16 takes about 5 ms on one busy core; torch's thread pool is avoided on purpose,
as tiny multi-threaded ops on an oversubscribed machine took ~100x longer). Rewards return
float32 CPU tensors. The registered rewards are ``world_colour``, ``world_shape``,
``world_direction``, ``world_smoothness`` and ``world_adherence``; :func:`classify` and
:func:`adherence_table` give the discrete predictions and accuracies for evaluation tables.

Method, in pixels of a ``(F, H, W, 3)`` frame stack (lengths are in world pixels, i.e. a frame
is taken as 16 pixels wide whatever its size):

* background: per-frame per-channel median of the border pixels;
* foreground weight: ``alpha * gate`` where ``alpha = d / D`` is the colour distance ``d`` to the
  background over the video's foreground contrast ``D`` (so an anti-aliased edge pixel gets its
  coverage), and ``gate`` ramps from 0 to 1 as ``d`` goes from ``lo`` to ``lo + 0.06``, with
  ``lo = max(0.06, 2.5 x the median border distance)`` (faint or per-pixel noise counts for
  nothing);
* object: the densest 5x5 spot of weight, then a centroid refined three times inside an 11x11
  window around it (anything else in the frame is ignored but lowers the frame's concentration);
* presence per frame in ``[0, 1]``: enough windowed mass (>= 6 px^2 for 1) and most of the
  frame's foreground inside the window (concentration >= 0.8 for 1): empty frames and noise get 0;
* shape descriptor of the windowed soft mask: vertical skewness ``mu03 / mu02^1.5`` (an upward
  triangle is about -0.56, circle and square 0), cross-kurtosis ``mu22 / ((mu40 + mu04) / 2)``
  (square about 0.52, circle and triangle about 0.33) and ``(mu20 + mu02) / area`` (grows with
  blur), averaged over present frames and compared with reference descriptors of the three shapes
  at seven blur levels (so a blurred square is still a square, if a less certain one);
* colour: the foreground's mean colour (weighted by ``weight**2`` so cores dominate edges),
  compared with each palette colour *as blended onto the measured background*: the distance to
  the segment from the background to the palette colour, so a faint or blurred object is not
  mistaken for a darker palette colour;
* motion: weighted least-squares constant-velocity fit of the centroid track (weights =
  presence), its velocity and residual RMS.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .pixels import as_rgb as _as_rgb, box_sum as _box_sum, ramp as _ramp, smoothstep as _smoothstep
from .registry import register
from .shapes_world import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, SIZE, SPEEDS, Scene, parse_prompt, shape_mask

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
DIRECTION_NAMES: tuple[str, ...] = tuple(DIRECTIONS)
SPEED_NAMES: tuple[str, ...] = tuple(SPEEDS)

# Segmentation (colour distances are Euclidean RGB in [0, 1] units, max sqrt(3)).
GATE_LO, GATE_WIDTH = 0.06, 0.06   # foreground gate: 0 below lo, full alpha above lo + width
NOISE_GATE = 2.5                   # lo is at least NOISE_GATE x the median border distance (noise)
MIN_CONTRAST = 0.25                # the contrast D is at least this (an empty video stays empty)
PEAK_BOX = 5                       # box filter for the initial object location, pixels
WINDOW = 5.0                       # half-width of the object window around the centroid, world px
AREA_LO, AREA_HI = 2.0, 6.0        # windowed foreground mass (world px^2) ramping presence 0 -> 1
CONC_LO, CONC_HI = 0.5, 0.8        # fraction of the frame's foreground inside the window, 0 -> 1
# Classification.
COLOUR_SIGMA = 40.0 / 255.0        # soft colour: softmax(-dist^2 / (2 sigma^2)) over the palette
SHAPE_TEMPERATURE = 1.0            # soft shape: softmax(-z^2 / (2 T^2)), z = standardised distance
REFERENCE_BLURS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # Gaussian sigmas (px) of the shape references
SHAPE_SCALE_FLOOR = (0.08, 0.04, 0.01)  # least spread of (skewness, cross-kurtosis, spread/area)
MOVING_SPEED = 0.3                 # world px/frame: at or above this a video counts as moving
MOTION_LO, MOTION_HI = 0.15, 0.45  # speed ramp of the direction reward's motion factor (smoothstep)
SMOOTH_SCALE = 0.5                 # world px: smoothness = exp(-(residual_rms / SMOOTH_SCALE)^2)


@dataclass
class Analysis:
    """Measurements of a batch of ``B`` videos of ``F`` frames (float32 numpy arrays).

    Per frame: ``background`` (B, F, 3) RGB in [0, 1]; ``weight`` (B, F, H, W) soft foreground in
    [0, 1]; ``area`` (B, F) windowed foreground mass in world px^2; ``concentration`` (B, F);
    ``presence`` (B, F) in [0, 1]; ``centroid`` (B, F, 2) (x, y) in world px; ``colour`` (B, F, 3)
    mean foreground RGB in [0, 1]; ``shape_features`` (B, F, 3) (vertical skewness,
    cross-kurtosis, spread / area). Per video: ``video_presence`` (B,) mean presence;
    ``video_background`` and ``video_colour`` (B, 3); ``colour_probs`` (B, 4) over
    ``COLOUR_NAMES``; ``video_shape_features`` (B, 3); ``shape_probs`` (B, 3) over ``SHAPES``;
    ``velocity`` (B, 2) world px/frame; ``speed`` (B,); ``residual_rms`` (B,) world px;
    ``track_ok`` (B,) bool, at least two frames' worth of presence (else velocity and residual
    are 0 and meaningless).
    """

    background: np.ndarray
    weight: np.ndarray
    area: np.ndarray
    concentration: np.ndarray
    presence: np.ndarray
    centroid: np.ndarray
    colour: np.ndarray
    shape_features: np.ndarray
    video_presence: np.ndarray
    video_background: np.ndarray
    video_colour: np.ndarray
    colour_probs: np.ndarray
    video_shape_features: np.ndarray
    shape_probs: np.ndarray
    velocity: np.ndarray
    speed: np.ndarray
    residual_rms: np.ndarray
    track_ok: np.ndarray


def _softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def _frame_measurements(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Segmentation, centroid, colour and shape moments of ``rgb`` (B, F, H, W, 3) in [0, 1]."""
    b, f, h, w, _ = rgb.shape
    scale = min(h, w) / SIZE                                           # image px per world px
    border = np.concatenate([rgb[:, :, 0], rgb[:, :, -1], rgb[:, :, 1:-1, 0], rgb[:, :, 1:-1, -1]], axis=2)
    bg = np.median(border, axis=2)                                      # (B, F, 3)
    d = np.sqrt(((rgb - bg[:, :, None, None, :]) ** 2).sum(-1))         # (B, F, H, W)
    # Noise level: median distance of the border pixels to the background, over the video.
    border_d = np.sqrt(((border - bg[:, :, None]) ** 2).sum(-1))
    noise = np.median(np.median(border_d, axis=2), axis=1)             # (B,)
    lo = np.maximum(NOISE_GATE * noise, GATE_LO)[:, None, None, None]
    gate = np.clip((d - lo) / GATE_WIDTH, 0.0, 1.0)
    # Contrast: the video's strongest foreground, robust to one hot pixel (2nd largest per frame).
    peak = np.partition((d * (gate > 0)).reshape(b, f, h * w), h * w - 2, axis=2)[..., -2]
    contrast = np.maximum(peak.max(axis=1), MIN_CONTRAST)              # (B,)
    wgt = np.clip(d / contrast[:, None, None, None], 0.0, 1.0) * gate  # (B, F, H, W)

    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, None, None, :]
    ys = (np.arange(h, dtype=np.float32) + 0.5)[None, None, :, None]
    # Initial location: densest PEAK_BOX x PEAK_BOX spot.
    r = max(1, int(round(PEAK_BOX * scale))) // 2
    idx = _box_sum(wgt, r).reshape(b, f, h * w).argmax(axis=2)
    cx, cy = xs.ravel()[idx % w], ys.ravel()[idx // w]                  # (B, F)
    half = WINDOW * scale
    total = wgt.sum(axis=(2, 3))
    for _ in range(3):
        win = (np.abs(xs - cx[..., None, None]) <= half) & (np.abs(ys - cy[..., None, None]) <= half)
        ww = wgt * win
        m0 = ww.sum(axis=(2, 3))
        has = m0 > 1e-6
        safe = np.where(has, m0, 1.0)
        cx = np.where(has, (ww * xs).sum(axis=(2, 3)) / safe, cx)
        cy = np.where(has, (ww * ys).sum(axis=(2, 3)) / safe, cy)
    # Moments about the final centroid, inside the last window.
    dx = xs - cx[..., None, None]
    dy = ys - cy[..., None, None]
    wx, wy = ww * dx * dx, ww * dy * dy
    m20, m02 = wx.sum(axis=(2, 3)) / safe, wy.sum(axis=(2, 3)) / safe
    m03 = (wy * dy).sum(axis=(2, 3)) / safe
    m40, m04 = (wx * dx * dx).sum(axis=(2, 3)) / safe, (wy * dy * dy).sum(axis=(2, 3)) / safe
    m22 = (wx * dy * dy).sum(axis=(2, 3)) / safe
    skew_y = m03 / np.maximum(m02, 1e-6) ** 1.5
    cross = m22 / np.maximum((m40 + m04) / 2, 1e-6)
    spread = (m20 + m02) / safe
    feats = np.where(has[..., None], np.stack([skew_y, cross, spread], axis=-1), 0.0)

    area = m0 / scale ** 2
    conc = m0 / np.maximum(total, 1e-6)
    presence = _ramp(area, AREA_LO, AREA_HI) * _ramp(conc, CONC_LO, CONC_HI)
    w2 = ww * ww
    s2 = w2.sum(axis=(2, 3))
    col = (w2[..., None] * rgb).sum(axis=(2, 3)) / np.maximum(s2, 1e-6)[..., None]
    col = np.where((s2 > 1e-6)[..., None], col, bg)
    f32 = np.float32
    return dict(background=bg.astype(f32), weight=wgt.astype(f32), area=area.astype(f32),
                concentration=conc.astype(f32), presence=presence.astype(f32),
                centroid=(np.stack([cx, cy], axis=-1) / scale).astype(f32), colour=col.astype(f32),
                shape_features=feats.astype(f32), colour_mass=s2.astype(f32))


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``x`` (..., H, W), zero outside the frame."""
    if sigma <= 0:
        return x
    r = int(math.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    h, w = x.shape[-2:]
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(r, r), (r, r)])
    y = sum(k[i] * p[..., :, i:i + w] for i in range(2 * r + 1))
    return sum(k[i] * y[..., i:i + h, :] for i in range(2 * r + 1))


@functools.lru_cache(maxsize=None)
def shape_reference() -> tuple[np.ndarray, np.ndarray]:
    """``(means (3, L, 3), scales (3,))`` of the shape descriptor for ``SHAPES`` x blur levels.

    Computed once (~0.05 s) from the world's definition of the shapes (``shape_mask``) at a grid
    of sub-pixel positions, optionally Gaussian-blurred (``REFERENCE_BLURS``: a generator's
    shapes are softer than the anti-aliased renders), blended in every palette colour onto every
    background and measured by the same pipeline as any video, so gating and anti-aliasing are
    calibrated in. ``scales`` is the pooled within-group spread, floored at ``SHAPE_SCALE_FLOOR``.
    """
    offsets = [(3.1 + 9.8 * i / 7, 3.1 + 9.8 * j / 7) for i in range(8) for j in range(8)]
    pairs = [(COLOURS[c], BACKGROUNDS[g]) for c in COLOURS for g in BACKGROUNDS]
    fg = np.array([pairs[n % len(pairs)][0] for n in range(len(offsets))], dtype=np.float64)[:, None, None]
    bg = np.array([pairs[n % len(pairs)][1] for n in range(len(offsets))], dtype=np.float64)[:, None, None]
    cover = np.stack([[shape_mask(s, cx, cy) for cx, cy in offsets] for s in SHAPES])   # (3, N, H, W)
    feats = []
    for sigma in REFERENCE_BLURS:
        a = _gaussian_blur(cover, sigma)[..., None]
        rgb = np.round(bg * (1 - a) + fg * a) / 255.0                   # (3, N, H, W, 3)
        one_frame_videos = rgb.reshape(-1, 1, SIZE, SIZE, 3)            # each with its own contrast
        measured = _frame_measurements(one_frame_videos.astype(np.float32))["shape_features"]
        feats.append(measured.reshape(len(SHAPES), len(offsets), -1))
    feats = np.stack(feats, axis=1).astype(np.float64)                 # (3, L, N, K)
    means = feats.mean(axis=2)
    within = np.sqrt(((feats - means[:, :, None]) ** 2).mean(axis=(0, 1, 2)))
    return means, np.maximum(within, SHAPE_SCALE_FLOOR)


def analyse(videos) -> Analysis:
    """Measure every video of ``videos`` (B, F, H, W, 3): uint8 (or float in [0, 255]) tensor or array.

    Pure numpy on the CPU (no torch thread pool: tiny tensors on a busy machine are far faster
    this way); a GPU tensor is copied to the CPU first.
    """
    rgb = _as_rgb(videos)
    m = _frame_measurements(rgb)
    b, f = rgb.shape[:2]
    p = m["presence"].astype(np.float64)
    psum = p.sum(axis=1)
    video_presence = p.mean(axis=1)

    # Colour: pooled over present frames, compared with palette colours blended on the background.
    video_bg = np.median(m["background"], axis=1).astype(np.float64)   # (B, 3)
    cw = p * m["colour_mass"]
    cws = cw.sum(axis=1)
    video_col = (cw[..., None] * m["colour"]).sum(axis=1) / np.maximum(cws, 1e-6)[:, None]
    video_col = np.where((cws > 1e-6)[:, None], video_col, video_bg)
    palette = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float64) / 255.0
    e = palette[None] - video_bg[:, None]                              # (B, 4, 3)
    rel = (video_col - video_bg)[:, None]                              # (B, 1, 3)
    a = np.clip((rel * e).sum(-1) / np.maximum((e * e).sum(-1), 1e-6), 0.0, 1.0)
    dist2 = ((rel - a[..., None] * e) ** 2).sum(-1)                    # (B, 4)
    colour_probs = _softmax(-dist2 / (2 * COLOUR_SIGMA ** 2), axis=1)

    # Shape: presence-and-area weighted mean descriptor against every (shape, blur) reference.
    means, scales = shape_reference()
    sw = p * m["area"]
    vfeat = (sw[..., None] * m["shape_features"]).sum(axis=1) / np.maximum(sw.sum(axis=1), 1e-6)[:, None]
    z2 = (((vfeat[:, None, None] - means[None]) / scales) ** 2).sum(-1)  # (B, 3, L)
    shape_probs = _softmax(_logsumexp(-z2 / (2 * SHAPE_TEMPERATURE ** 2), axis=2), axis=1)

    # Motion: presence-weighted least-squares constant-velocity fit of the centroid track.
    t = np.broadcast_to(np.arange(f, dtype=np.float64)[None], (b, f))
    ps = np.maximum(psum, 1e-6)
    tm = (p * t).sum(1) / ps
    c = m["centroid"].astype(np.float64)
    cm = (p[..., None] * c).sum(1) / ps[:, None]
    dt = t - tm[:, None]
    stt = (p * dt * dt).sum(1)
    track_ok = (psum >= 2.0 - 1e-4) & (stt > 1e-6)
    vel = (p[..., None] * dt[..., None] * (c - cm[:, None])).sum(1) / np.maximum(stt, 1e-6)[:, None]
    vel = np.where(track_ok[:, None], vel, 0.0)
    res = c - cm[:, None] - vel[:, None] * dt[..., None]
    rms = np.sqrt((p * (res ** 2).sum(-1)).sum(1) / ps)
    rms = np.where(track_ok, rms, 0.0)
    f32 = np.float32
    return Analysis(background=m["background"], weight=m["weight"], area=m["area"],
                    concentration=m["concentration"], presence=m["presence"], centroid=m["centroid"],
                    colour=m["colour"], shape_features=m["shape_features"],
                    video_presence=video_presence.astype(f32), video_background=video_bg.astype(f32),
                    video_colour=video_col.astype(f32), colour_probs=colour_probs.astype(f32),
                    video_shape_features=vfeat.astype(f32), shape_probs=shape_probs.astype(f32),
                    velocity=vel.astype(f32), speed=np.sqrt((vel ** 2).sum(-1)).astype(f32),
                    residual_rms=rms.astype(f32), track_ok=track_ok)


def _scenes(prompts: list[str], b: int) -> list[Scene]:
    if isinstance(prompts, str) or len(prompts) != b:
        n = "a string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"world rewards need one prompt per video: {n} for {b} videos")
    return [parse_prompt(p) for p in prompts]


def _criteria(videos, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Every per-criterion score (B,) float32 CPU tensor for the prompts, plus logged measurements."""
    scenes = _scenes(prompts, len(videos))
    an = analyse(videos)
    rows = np.arange(len(scenes))
    ci = np.array([COLOUR_NAMES.index(s.colour) for s in scenes], dtype=np.int64)
    si = np.array([SHAPES.index(s.shape) for s in scenes], dtype=np.int64)
    u = np.array([DIRECTIONS[s.direction] for s in scenes], dtype=np.float64).reshape(-1, 2)
    pres = an.video_presence.astype(np.float64)
    colour = an.colour_probs[rows, ci] * pres
    shape = an.shape_probs[rows, si] * pres
    cos = (an.velocity * u).sum(-1) / np.maximum(an.speed, 1e-6)
    direction = np.maximum(cos, 0.0) * _smoothstep(an.speed.astype(np.float64), MOTION_LO, MOTION_HI) * pres
    smooth = np.exp(-(an.residual_rms / SMOOTH_SCALE) ** 2) * pres * an.track_ok
    out = dict(colour=colour, shape=shape, direction=direction, smoothness=smooth, presence=pres,
               speed=an.speed, residual_rms=an.residual_rms)
    return {k: torch.from_numpy(np.clip(v, 0.0, None).astype(np.float32)) for k, v in out.items()}


@register("world_colour")
class WorldColour:
    """Soft colour match in ``[0, 1]``: P(prompt colour) x presence.

    P is a softmax over the four palette colours of ``-dist^2 / (2 (40/255)^2)``, ``dist`` the
    distance of the video's mean foreground colour to the segment from the measured background
    to the palette colour; presence is the mean per-frame object presence. A clean render of the
    right colour scores ~1, the wrong colour ~0, an empty or pure-noise video 0, an object too
    faint to tell the colour apart about 0.25.
    """

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        return _criteria(videos, prompts)["colour"]


@register("world_shape")
class WorldShape:
    """Soft shape match in ``[0, 1]``: P(prompt shape) x presence.

    P is a softmax over circle/square/triangle of ``logsumexp`` over blur levels of ``-z^2 / 2``,
    ``z`` the standardised distance of the video's shape descriptor (vertical skewness,
    cross-kurtosis, spread / area of the soft mask) to each shape's reference descriptor at that
    blur (computed from ``shape_mask``). A clean render of the right shape scores ~1, a wrong
    shape ~0, empty or noise 0; blur lowers the certainty (a featureless blob is about equally
    circle and blurred square).
    """

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        return _criteria(videos, prompts)["shape"]


@register("world_direction")
class WorldDirection:
    """Direction agreement in ``[0, 1]``: ``max(0, cos) x motion x presence``.

    ``cos`` is between the least-squares centroid velocity and the prompt's unit direction (so
    the opposite or a perpendicular direction scores 0); ``motion`` is a smoothstep of the speed
    from 0.15 to 0.45 world px/frame (the grammar's speeds are 0.7 and 1.3), so a static video
    scores 0; presence as in ``world_colour``. The speed word is not scored here.
    """

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        return _criteria(videos, prompts)["direction"]


@register("world_smoothness")
class WorldSmoothness:
    """Constant-velocity fit quality in ``[0, 1]``: ``exp(-(rms / 0.5 px)^2) x presence``.

    ``rms`` is the presence-weighted residual RMS of the centroid track about its least-squares
    constant-velocity line, in world pixels; 1 = perfectly smooth. A static video scores 1 (a
    zero velocity explains it perfectly: penalising no motion is ``world_direction``'s job); a
    video with less than two frames' worth of object presence (empty, noise) scores 0. Ignores
    the prompt.
    """

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        return _criteria(videos, prompts)["smoothness"]


@register("world_adherence")
class WorldAdherence:
    """Prompt adherence in ``[0, 1]``: the mean of ``world_colour``, ``world_shape`` and
    ``world_direction`` (equal weights, so a video right on two of three scores about 2/3).

    Returns a dict: ``score`` plus ``colour``, ``shape``, ``direction``, ``smoothness`` (each in
    ``[0, 1]``, as the rewards of those names), ``presence`` (mean per-frame object presence in
    ``[0, 1]``), ``speed`` (measured world px/frame) and ``residual_rms`` (world px), for logging.
    Smoothness is logged, not part of the score.
    """

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        c = _criteria(videos, prompts)
        score = (c["colour"] + c["shape"] + c["direction"]) / 3.0
        return {"score": score, **c}


def classify(videos: torch.Tensor) -> list[dict]:
    """Discrete predictions per video, for evaluation tables.

    Each dict: ``present`` (mean object presence >= 0.5), ``colour`` (a COLOURS name, ``None``
    when not present), ``shape`` (a SHAPES name, ``None`` when not present), ``moving`` (a track
    of at least two frames and speed >= 0.3 world px/frame), ``direction`` (the DIRECTIONS name
    nearest the velocity, ``None`` when not moving), ``speed`` (the SPEEDS name nearest the
    measured speed, ``None`` when not moving), plus the raw ``velocity`` (vx, vy) in world
    px/frame and ``presence``. ``None`` never matches a prompt, so empty videos count as wrong.
    """
    an = analyse(videos)
    dirs = np.array([DIRECTIONS[d] for d in DIRECTION_NAMES], dtype=np.float32)
    dir_idx = (an.velocity @ dirs.T).argmax(axis=1).tolist()
    colour_idx = an.colour_probs.argmax(axis=1).tolist()
    shape_idx = an.shape_probs.argmax(axis=1).tolist()
    speeds = an.speed.tolist()
    out = []
    for i in range(len(speeds)):
        moving = bool(an.track_ok[i]) and speeds[i] >= MOVING_SPEED
        speed = min(SPEED_NAMES, key=lambda s: abs(SPEEDS[s] - speeds[i])) if moving else None
        present = float(an.video_presence[i]) >= 0.5
        out.append(dict(present=present, colour=COLOUR_NAMES[colour_idx[i]] if present else None,
                        shape=SHAPES[shape_idx[i]] if present else None, moving=moving,
                        direction=DIRECTION_NAMES[dir_idx[i]] if moving else None, speed=speed,
                        velocity=tuple(an.velocity[i].tolist()), presence=float(an.video_presence[i])))
    return out


def adherence_table(videos: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Accuracy (fraction of videos whose discrete prediction matches the prompt exactly).

    Keys ``colour``, ``shape``, ``direction`` (a static video is never right), ``speed``, ``all``
    (colour, shape and direction all right) and ``n`` (the number of videos).
    """
    scenes = _scenes(prompts, len(videos))
    preds = classify(videos)
    n = len(scenes)
    if n == 0:
        return dict(colour=math.nan, shape=math.nan, direction=math.nan, speed=math.nan, all=math.nan, n=0)
    keys = ("colour", "shape", "direction", "speed")
    hits = {k: [p[k] == getattr(s, k) for p, s in zip(preds, scenes)] for k in keys}
    hits["all"] = [c and s and d for c, s, d in zip(hits["colour"], hits["shape"], hits["direction"])]
    return {**{k: sum(v) / n for k, v in hits.items()}, "n": n}


__all__ = ["Analysis", "adherence_table", "analyse", "classify", "WorldAdherence", "WorldColour",
           "WorldDirection", "WorldShape", "WorldSmoothness"]


# ---------------------------------------------------------------------- artifacts (forgetting)
BACKGROUND_SCALE = 16.0            # 8-bit levels: background fidelity exp(-(error / 16)^2)
GRID_SCALE = 4.0                   # 8-bit levels: grid cleanliness exp(-(energy / 4)^2)
GRID_BACKGROUND_WEIGHT = 0.1       # pixels with foreground weight below this count as background


def artifact_measurements(videos, prompts: list[str]) -> dict[str, np.ndarray]:
    """Two pixel measurements of what RL can break without any adherence check seeing it, (B,) each:

    - ``background_error``: RMS over channels of the measured background colour (the video's median
      border colour) minus the background the prompt asks for, in 8-bit levels (black is 12, gray
      128): a black background turned brownish (RGB ~9 -> ~28) reads ~16.
    - ``grid_energy``: the RMS of the 2x2-periodic component of the background pixels (foreground
      weight < 0.1), in 8-bit levels: for each of the four phases ``(y % 2, x % 2)`` the mean colour
      over the video, minus the mean of the four. The transformer's 2x2 patch grid showing through
      has this period; a column pattern whose even and odd columns differ by ``2a`` reads ``a``.

    Args:
        videos: ``(B, F, H, W, 3)`` uint8 (or float in [0, 255]). prompts: one per video.
    """
    scenes = _scenes(prompts, len(videos))
    rgb = _as_rgb(videos).astype(np.float64) * 255.0
    an = analyse(videos)
    want = np.array([BACKGROUNDS[s.background] for s in scenes], dtype=np.float64)       # (B, 3)
    bg_err = np.sqrt(((an.video_background.astype(np.float64) * 255.0 - want) ** 2).mean(-1))
    mask = (an.weight < GRID_BACKGROUND_WEIGHT).astype(np.float64)                       # (B, F, H, W)
    h, w = rgb.shape[2] // 2 * 2, rgb.shape[3] // 2 * 2
    phases = []
    for i in (0, 1):
        for j in (0, 1):
            m = mask[:, :, i:h:2, j:w:2, None]
            x = rgb[:, :, i:h:2, j:w:2]
            phases.append((x * m).sum(axis=(1, 2, 3)) / np.maximum(m.sum(axis=(1, 2, 3)), 1.0))  # (B, 3)
    p = np.stack(phases, axis=1)                                                          # (B, 4, 3)
    energy = np.sqrt(((p - p.mean(axis=1, keepdims=True)) ** 2).mean(axis=(1, 2)))
    return {"background_error": bg_err, "grid_energy": energy}


@register("world_fidelity")
class WorldFidelity:
    """Artifact-free output in ``[0, 1]``: the mean of background fidelity
    ``exp(-(background_error / 16)^2)`` and grid cleanliness ``exp(-(grid_energy / 4)^2)``
    (:func:`artifact_measurements`; errors in 8-bit levels). An evaluation metric for forgetting,
    not meant as a training reward. Returns a dict: ``score``, ``background_error``, ``grid_energy``.
    """

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = artifact_measurements(videos, prompts)
        score = (np.exp(-(m["background_error"] / BACKGROUND_SCALE) ** 2)
                 + np.exp(-(m["grid_energy"] / GRID_SCALE) ** 2)) / 2
        return {k: torch.from_numpy(v.astype(np.float32)) for k, v in {"score": score, **m}.items()}
