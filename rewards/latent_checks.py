"""Pixel checkers of the latent world (:mod:`rewards.latent_world`), computed from decoded videos.

Each object of a prompt is found by its colour (the objects of a prompt differ in colour):

* foreground: a pixel counts for colour ``c`` by ``exp(-|rgb - c|^2 / (2 sigma^2))`` (sigma 64
  levels), gated by its distance to the prompt's background picture (0 below 26 levels, 1 from 51:
  the background is the world's, as the palette is, so faint noise and texture count for nothing);
* object: the densest disc of that weight (box of 2R+1), the centroid refined twice in a window of
  1.6 R around it; presence per frame ramps with the windowed mass from a quarter to half an
  object's area, and with the share of the frame's mass inside the window (a colour cast over the
  whole frame is no object);
* shape: vertical skewness ``mu03 / mu02^1.5`` and cross-kurtosis ``mu22 / ((mu40 + mu04) / 2)``
  of the windowed weight over present frames, against references of the three outlines blurred
  as a small VAE blurs them (0 to 3 px); colour: the object's presence;
* motion: presence-weighted least-squares velocity of the centroid, in world pixels per frame
  (a 64-px frame's pixels, whatever the size); the direction score is ``max(0, cos)`` with the
  prompt's direction times a smoothstep of the speed from 0.3 to 0.6 (the speeds are 1 and 2);
* fidelity: ``background_error``, the RMS (8-bit levels) of the frames minus the prompt's
  background over pixels away from every object, and ``grid_energy``, the patch grid at this
  world's period (8 px of VAE times 2 of patch: 16 px; :func:`rewards.artifacts.grid_measurements`).

Registered: ``latent_colour``, ``latent_shape``, ``latent_direction``, ``latent_adherence``,
``latent_fidelity``; :func:`classify` and :func:`adherence_table` for evaluation tables. A score
of a two-object prompt is the mean over its objects.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .artifacts import grid_measurements
from .latent_world import (COLOURS, DIRECTIONS, MAX_OBJECTS, RADIUS, SHAPES, SIZE, SPEEDS, LatentScene,
                           background_image, object_area, object_mask, parse_prompt)
from .pixels import as_rgb, box_sum as _box_sum, ramp as _ramp, smoothstep as _smoothstep
from .registry import register

COLOUR_NAMES = tuple(COLOURS)
COLOUR_SIGMA = 64.0 / 255.0
GATE_LO, GATE_HI = 26.0 / 255.0, 51.0 / 255.0
AREA_LO, AREA_HI = 0.25, 0.5            # windowed mass over an object's area: presence 0 -> 1
CONC_LO, CONC_HI = 0.5, 0.8             # share of the frame's mass in the window: presence 0 -> 1
WINDOW = 1.6                            # window half-width in radii
MOTION_LO, MOTION_HI = 0.3, 0.6         # world px/frame: the direction score's motion factor
MOVING_SPEED = 0.45                     # world px/frame: at or above this a video counts as moving
REFERENCE_BLURS = (0.0, 1.0, 2.0, 3.0)  # px: the shape references (a small VAE blurs edges by 1-3 px)
SHAPE_FLOOR = (0.08, 0.04)              # least spread of (skewness, cross-kurtosis)
BACKGROUND_SCALE, GRID_SCALE = 16.0, 4.0  # 8-bit levels: fidelity exp(-(error / scale)^2), as the shapes world
GRID_PERIOD = 16                        # px at 64x64: 8 (VAE) x 2 (patch)


@dataclass
class ObjectTrack:
    """Measurements of one object slot over a batch (float64 numpy arrays): per frame ``presence``
    (B, F), ``centroid`` (B, F, 2) (x, y) world px, ``mass`` (B, F) world px^2; per video
    ``video_presence`` (B,), ``velocity`` (B, 2) world px/frame, ``speed`` (B,), ``shape_probs`` (B, 3)
    over ``SHAPES``; ``valid`` (B,) bool: the prompt has an object in this slot."""

    presence: np.ndarray
    centroid: np.ndarray
    mass: np.ndarray
    video_presence: np.ndarray
    velocity: np.ndarray
    speed: np.ndarray
    shape_probs: np.ndarray
    valid: np.ndarray


def _moments(w: np.ndarray, x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """(skewness, cross-kurtosis) of weights ``w (..., H, W)`` about ``(cx, cy) (...)``; ``(..., 2)``."""
    m = np.maximum(w.sum((-1, -2)), 1e-9)
    dx, dy = x - cx[..., None, None], y - cy[..., None, None]

    dx2, dy2 = dx * dx, dy * dy
    wy2 = w * dy2

    def mean(v: np.ndarray) -> np.ndarray:
        return v.sum((-1, -2)) / m

    mu02, mu03, mu22, mu40, mu04 = mean(wy2), mean(wy2 * dy), mean(wy2 * dx2), mean(w * dx2 * dx2), mean(wy2 * dy2)
    return np.stack([mu03 / np.maximum(mu02, 1e-9) ** 1.5, mu22 / np.maximum((mu40 + mu04) / 2, 1e-9)], -1)


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return x
    r = int(math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, x)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, x)


@functools.lru_cache(maxsize=1)
def shape_reference() -> tuple[np.ndarray, np.ndarray]:
    """Reference (skewness, cross-kurtosis) ``(3 shapes, blurs, 2)`` and their spread ``(3, 2)``."""
    n = 48
    y, x = np.meshgrid(np.arange(n) + 0.5, np.arange(n) + 0.5, indexing="ij")
    refs = []
    for shape in SHAPES:
        row = []
        for blur in REFERENCE_BLURS:
            w = _gaussian(object_mask(shape, n / 2, n / 2, n, RADIUS), blur)
            cx, cy = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
            row.append(_moments(w, x, y, np.array(cx), np.array(cy)))
        refs.append(row)
    ref = np.array(refs)
    spread = np.maximum(ref.std(axis=1), np.array(SHAPE_FLOOR))
    return ref, spread


def _as_rgb(videos) -> np.ndarray:
    rgb = as_rgb(videos)
    if rgb.shape[2] != rgb.shape[3]:
        raise ValueError(f"latent-world videos are square, got {rgb.shape[2]}x{rgb.shape[3]}")
    return rgb


def scenes_of(prompts: list[str], b: int) -> list[LatentScene]:
    """The scene of each prompt; ValueError when there is not one prompt per video."""
    if isinstance(prompts, str) or len(prompts) != b:
        n = "a string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"latent-world rewards need one prompt per video: {n} for {b} videos")
    return [parse_prompt(p) for p in prompts]


def _backgrounds(scenes: list[LatentScene], size: int) -> np.ndarray:
    return np.stack([background_image(s.background, size) for s in scenes]).astype(np.float32) / 255.0


def track(rgb: np.ndarray, backgrounds: np.ndarray, colours: list[str | None],
          shapes: list[str | None]) -> ObjectTrack:
    """Find the object of colour ``colours[i]`` in video ``i`` (``None``: no object in this slot).

    Args:
        rgb: ``(B, F, H, W, 3)`` float32 in [0, 1]. backgrounds: ``(B, H, W, 3)`` the prompts' pictures.
        colours, shapes: per video, the slot's palette colour name and the shape it asks for (its
            area sets the presence scale), or ``None``.
    """
    b, f, h, w, _ = rgb.shape
    scale = SIZE / w                                       # world px per pixel
    radius = RADIUS / scale
    valid = np.array([c is not None for c in colours])
    pal = np.array([COLOURS[c] if c else (0, 0, 0) for c in colours], dtype=np.float32) / 255.0
    d_bg = np.sqrt(((rgb - backgrounds[:, None]) ** 2).sum(-1))
    gate = _ramp(d_bg, GATE_LO, GATE_HI)
    d_c = ((rgb - pal[:, None, None, None]) ** 2).sum(-1)
    wt = (np.exp(-d_c / (2 * COLOUR_SIGMA ** 2)) * gate).astype(np.float32)        # (B, F, H, W)
    wt[~valid] = 0.0
    y, x = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5, indexing="ij")
    peak = _box_sum(wt.astype(np.float64), max(1, int(round(radius))))
    idx = peak.reshape(b, f, -1).argmax(-1)
    cy, cx = (idx // w + 0.5).astype(np.float32), (idx % w + 0.5).astype(np.float32)
    half = WINDOW * radius
    for _ in range(3):
        win = ((np.abs(x - cx[..., None, None]) <= half) & (np.abs(y - cy[..., None, None]) <= half)) * wt
        m = win.sum((-1, -2))
        ok = m > 1e-6
        cx = np.where(ok, (win * x).sum((-1, -2)) / np.maximum(m, 1e-9), cx)
        cy = np.where(ok, (win * y).sum((-1, -2)) / np.maximum(m, 1e-9), cy)
    total = wt.sum((-1, -2))
    areas = np.array([object_area(s) if s else object_area("circle") for s in shapes]) / scale ** 2
    presence = (_ramp(m / areas[:, None], AREA_LO, AREA_HI)
                * _ramp(m / np.maximum(total, 1e-9), CONC_LO, CONC_HI))
    # Constant-velocity fit of the centroid, weighted by presence (world px).
    t = np.arange(f, dtype=np.float64)
    pw = presence + 1e-12
    tm = (pw * t).sum(1) / pw.sum(1)
    var_t = (pw * (t - tm[:, None]) ** 2).sum(1)
    enough = presence.sum(1) >= 2.0
    vel = np.zeros((b, 2))
    for k, c in enumerate((cx, cy)):
        cm = (pw * c).sum(1) / pw.sum(1)
        vel[:, k] = np.where(enough, (pw * (t - tm[:, None]) * (c - cm[:, None])).sum(1) / np.maximum(var_t, 1e-9), 0.0)
    vel *= scale
    # Shape: moments over present frames, against the blurred references.
    feats = _moments(win, x, y, cx, cy)                                      # (B, F, 2)
    fw = presence[..., None]
    vf = (feats * fw).sum(1) / np.maximum(fw.sum(1), 1e-9)
    ref, spread = shape_reference()
    z2 = (((vf[:, None, None, :] - ref[None]) / spread[None, :, None, :]) ** 2).sum(-1)      # (B, 3, blurs)
    logits = np.log(np.exp(-z2 / 2).sum(-1) + 1e-300)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    video_presence = presence.mean(1) * valid
    return ObjectTrack(presence=presence, centroid=np.stack([cx, cy], -1) * scale, mass=m * scale ** 2,
                       video_presence=video_presence, velocity=vel, speed=np.sqrt((vel ** 2).sum(-1)),
                       shape_probs=probs, valid=valid)


def analyse(videos, prompts: list[str]) -> tuple[list[LatentScene], list[ObjectTrack]]:
    """The scenes of ``prompts`` and one :class:`ObjectTrack` per object slot (``MAX_OBJECTS``)."""
    rgb = _as_rgb(videos)
    scenes = scenes_of(prompts, len(rgb))
    bgs = _backgrounds(scenes, rgb.shape[3])
    tracks = []
    for k in range(MAX_OBJECTS):
        things = [s.things[k] if k < len(s.things) else None for s in scenes]
        tracks.append(track(rgb, bgs, [t.colour if t else None for t in things], [t.shape if t else None for t in things]))
    return scenes, tracks


def criteria(videos, prompts: list[str]) -> dict[str, np.ndarray]:
    """Per-video scores in [0, 1] (mean over a prompt's objects): ``colour``, ``shape``, ``direction``,
    ``presence``, and the first object's measured ``speed`` (world px/frame)."""
    scenes, tracks = analyse(videos, prompts)
    n_obj = np.array([len(s.things) for s in scenes], dtype=np.float64)
    out = {k: np.zeros(len(scenes)) for k in ("colour", "shape", "direction")}
    for k, tr in enumerate(tracks):
        rows = [i for i, s in enumerate(scenes) if k < len(s.things)]
        if not rows:
            continue
        u = np.array([DIRECTIONS[scenes[i].things[k].direction] for i in rows], dtype=np.float64)
        si = np.array([SHAPES.index(scenes[i].things[k].shape) for i in rows])
        pres = tr.video_presence[rows]
        cos = (tr.velocity[rows] * u).sum(-1) / np.maximum(tr.speed[rows], 1e-6)
        out["colour"][rows] += pres
        out["shape"][rows] += tr.shape_probs[rows, si] * pres
        out["direction"][rows] += np.maximum(cos, 0.0) * _smoothstep(tr.speed[rows], MOTION_LO, MOTION_HI) * pres
    out = {k: v / n_obj for k, v in out.items()}
    out["presence"] = out["colour"].copy()
    out["speed"] = tracks[0].speed
    return out


def _tensors(d: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in d.items()}


@register("latent_colour")
class LatentColour:
    """Each asked-for object present in its colour, in ``[0, 1]``: the mean per-frame presence of an
    object of the prompt's colour (mean over the prompt's objects)."""

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        return _tensors(criteria(videos, prompts))["colour"]


@register("latent_shape")
class LatentShape:
    """Shape match in ``[0, 1]``: P(the asked shape) x presence, mean over the prompt's objects."""

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        return _tensors(criteria(videos, prompts))["shape"]


@register("latent_direction")
class LatentDirection:
    """Direction agreement in ``[0, 1]``: ``max(0, cos) x motion x presence`` per object (the
    opposite or a perpendicular direction scores 0, a static object 0), mean over the objects."""

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> torch.Tensor:
        return _tensors(criteria(videos, prompts))["direction"]


@register("latent_adherence")
class LatentAdherence:
    """Prompt adherence in ``[0, 1]``: the mean of colour, shape and direction. Returns a dict:
    ``score``, ``colour``, ``shape``, ``direction``, ``presence``, ``speed``."""

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        c = criteria(videos, prompts)
        return _tensors({"score": (c["colour"] + c["shape"] + c["direction"]) / 3.0, **c})


def artifact_measurements(videos, prompts: list[str]) -> dict[str, np.ndarray]:
    """``background_error`` and ``grid_energy`` (8-bit levels, (B,) each): the RMS of the frames
    minus the prompt's background over pixels farther than two radii from every found object, and
    the patch grid at the world's 16-px period (scaled with the frame size)."""
    rgb = _as_rgb(videos)
    scenes, tracks = analyse(videos, prompts)
    b, f, h, w, _ = rgb.shape
    scale = SIZE / w
    bgs = _backgrounds(scenes, w)
    y, x = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    keep = np.ones((b, f, h, w), dtype=bool)
    for tr in tracks:
        cx, cy = tr.centroid[..., 0] / scale, tr.centroid[..., 1] / scale
        near = (np.abs(x - cx[..., None, None]) <= 2 * RADIUS / scale) & (np.abs(y - cy[..., None, None]) <= 2 * RADIUS / scale)
        keep &= ~(near & tr.valid[:, None, None, None])
    diff = ((rgb - bgs[:, None]) * 255.0) ** 2
    err = np.sqrt((diff * keep[..., None]).sum((1, 2, 3, 4)) / np.maximum(3 * keep.sum((1, 2, 3)), 1))
    period = max(2, int(round(GRID_PERIOD / scale)))
    grid = grid_measurements(np.asarray(rgb * 255.0 + 0.5, dtype=np.uint8), period)["energy"]
    return {"background_error": err, "grid_energy": grid.astype(np.float64)}


@register("latent_fidelity")
class LatentFidelity:
    """Artifact-free output in ``[0, 1]``: the mean of ``exp(-(background_error / 16)^2)`` and
    ``exp(-(grid_energy / 4)^2)`` (:func:`artifact_measurements`), as ``world_fidelity``. An
    evaluation metric for forgetting. Returns a dict: ``score``, ``background_error``, ``grid_energy``."""

    def __call__(self, videos: torch.Tensor, prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        m = artifact_measurements(videos, prompts)
        score = (np.exp(-(m["background_error"] / BACKGROUND_SCALE) ** 2)
                 + np.exp(-(m["grid_energy"] / GRID_SCALE) ** 2)) / 2
        return _tensors({"score": score, **m})


def classify(videos, prompts: list[str]) -> list[list[dict]]:
    """Discrete verdicts per video and asked-for object: ``present`` (presence >= 0.5), ``shape``
    (the likeliest, ``None`` when absent), ``direction`` (the nearest to the velocity, ``None`` when
    not moving), ``speed`` (the nearest speed word, ``None`` when not moving)."""
    scenes, tracks = analyse(videos, prompts)
    dirs = np.array(list(DIRECTIONS.values()), dtype=np.float64)
    out = []
    for i, s in enumerate(scenes):
        row = []
        for k in range(len(s.things)):
            tr = tracks[k]
            present = bool(tr.video_presence[i] >= 0.5)
            moving = present and bool(tr.speed[i] >= MOVING_SPEED)
            row.append({"present": present, "shape": SHAPES[int(tr.shape_probs[i].argmax())] if present else None,
                        "direction": list(DIRECTIONS)[int((dirs @ tr.velocity[i]).argmax())] if moving else None,
                        "speed": min(SPEEDS, key=lambda w: abs(SPEEDS[w] - tr.speed[i])) if moving else None,
                        "velocity": tuple(tr.velocity[i].tolist()), "presence": float(tr.video_presence[i])})
        out.append(row)
    return out


def adherence_table(videos, prompts: list[str]) -> dict[str, float]:
    """Accuracies over videos: ``colour`` (every asked object present), ``shape``, ``direction``,
    ``speed`` (every asked object right), ``all`` (colour, shape and direction right), ``n``."""
    scenes = scenes_of(prompts, len(videos))
    if not scenes:
        return dict(colour=math.nan, shape=math.nan, direction=math.nan, speed=math.nan, all=math.nan, n=0)
    preds = classify(videos, prompts)
    hits: dict[str, list[bool]] = {k: [] for k in ("colour", "shape", "direction", "speed")}
    for s, row in zip(scenes, preds):
        hits["colour"].append(all(p["present"] for p in row))
        for k in ("shape", "direction", "speed"):
            hits[k].append(all(p[k] == getattr(t, k) for p, t in zip(row, s.things)))
    hits["all"] = [c and s and d for c, s, d in zip(hits["colour"], hits["shape"], hits["direction"])]
    return {**{k: sum(v) / len(scenes) for k, v in hits.items()}, "n": len(scenes)}


__all__ = ["LatentAdherence", "LatentColour", "LatentDirection", "LatentFidelity", "LatentShape", "ObjectTrack",
           "adherence_table", "analyse", "artifact_measurements", "classify", "criteria", "scenes_of", "track"]
