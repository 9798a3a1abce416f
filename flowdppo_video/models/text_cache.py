"""Prompt conditioning encoded once per run, so the text encoders need not stay in memory.

Wan's UMT5-XXL (5.7B parameters) outweighs the 1.3B transformer it conditions, yet a run's prompts
are known at its start. :func:`cache_prompts` encodes every training and held-out prompt (and the
CFG negative of each) in batches, keeps the rows on the CPU, writes them to
``RUN_DIR/text_cache.safetensors`` (read back on resume) and releases the encoders. A run's start is
staged (``training/run_builder.py``: :func:`missing_rows`, :func:`encode_rows` on the encoders built
alone, released before the transformers are built); :func:`cache_prompts` serves the families that
build every part at once, and ``model.keep_text_encoder``: on a GPU their transformers wait in host
memory while the prompts are encoded.
``model.keep_text_encoder: true`` keeps them, for runs whose prompts change.

The rows are what the adapter's own ``encode_prompts`` / ``encode_negative`` returned, sliced and
concatenated again, so the rollout and the replay see bit-identical tensors with or without the cache
(the same batches of prompts are encoded either way when the encoder is kept).

The file is keyed by the model (a fingerprint of what decides the conditioning: the family, the
weights' path or ``model.init`` and its seed, the dtype, the text length, the video size for
image-to-video conditioning); an entry by its prompt (and its negative prompt), so a changed prompt
file is re-encoded where it changed and a changed model from scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .base import ModelError, Text, TextBatch, VideoFlowAdapter, cat_text

CACHE_FILE = "text_cache.safetensors"
CHECKSUM_SUFFIX = ".sha256"                       # beside the cache: its SHA-256, checked on load
_PLAIN = "_"                                      # the part name of a plain-tensor row


def _row(out: Text, i: int) -> Text:
    """Row ``i`` of an encoder output, batch dimension kept, as its own contiguous CPU tensors."""
    return out[i:i + 1].cpu().clone() if isinstance(out, torch.Tensor) else \
        TextBatch(**{k: v[i:i + 1].cpu().clone() for k, v in out.parts.items()})


def _parts(row: Text) -> dict[str, torch.Tensor]:
    return {_PLAIN: row} if isinstance(row, torch.Tensor) else dict(row.parts)


def _from_parts(parts: dict[str, torch.Tensor]) -> Text:
    return parts[_PLAIN] if set(parts) == {_PLAIN} else TextBatch(**parts)


class TextCache:
    """Conditioning rows by ``(negative prompt or None, prompt)``, on the CPU.

    ``key`` fingerprints the model (see the module docstring); rows of another key are never mixed in.
    """

    def __init__(self, key: str, hint: str = "model.keep_text_encoder") -> None:
        self.key = key
        self.hint = hint
        self.entries: dict[tuple[str | None, str], Text] = {}

    def missing(self, negative: str | None, prompts: Iterable[str]) -> list[str]:
        return [p for p in dict.fromkeys(prompts) if (negative, p) not in self.entries]

    def fill(self, adapter: VideoFlowAdapter, negative: str | None, prompts: list[str]) -> None:
        """Encode ``prompts`` (one batch) through the adapter's own encoder and keep their rows."""
        out = adapter.encode_prompts(prompts) if negative is None else adapter.encode_negative(negative, prompts)
        for i, p in enumerate(prompts):
            self.entries[(negative, p)] = _row(out, i)

    def rows(self, adapter: VideoFlowAdapter, negative: str | None, prompts: list[str]) -> Text:
        """The conditioning of ``prompts`` (``B`` rows, on the adapter's device); prompts not cached are
        encoded when the encoder is resident, refused in one line when it was released."""
        missing = self.missing(negative, prompts)
        if missing:
            if not adapter.text_encoders_resident():
                what = "prompt" if negative is None else f"negative prompt {negative!r} of prompt"
                raise ModelError(f"{what} {missing[0]!r} was not encoded at the start of the run and the text "
                                 f"encoder was released; set {self.hint}: true for runs whose prompts change")
            self.fill(adapter, negative, missing)
        return cat_text([self.entries[(negative, p)] for p in prompts]).to(adapter.device)

    # ---------------------------------------------------------------- on disk
    def save(self, path: Path) -> None:
        """Write every row to ``path`` (safetensors, through a temporary file renamed over it)."""
        tensors, index = {}, []
        for i, ((neg, p), row) in enumerate(self.entries.items()):
            index.append([neg, p])
            for k, v in _parts(row).items():
                tensors[f"{i}.{k}"] = v.contiguous()
        tmp = path.with_name(f".{path.name}.tmp")
        side = checksum_path(path)
        side_tmp = side.with_name(f".{side.name}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={"key": self.key, "entries": json.dumps(index)})
            side_tmp.write_text(_sha256(tmp) + "\n")
            # The checksum lands first: a kill between the two renames leaves a mismatch (rebuilt on
            # load), never a damaged cache that verifies.
            side_tmp.replace(side)
            tmp.replace(path)
        except Exception as e:  # noqa: BLE001 - safetensors reports a full disk in its own error type
            tmp.unlink(missing_ok=True)
            side_tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                if e.filename is None or str(e.filename) in (str(tmp), str(side_tmp)):
                    e.filename = str(path)
                raise
            first = (str(e).splitlines() or [""])[0][:300]
            raise ModelError(f"could not write the text cache {path}: {type(e).__name__}: {first}") from None

    def load(self, path: Path) -> int:
        """Read the rows of ``path`` if it was written for this model; returns how many were read
        (0 for another model's file or an unreadable one: those prompts are simply encoded again)."""
        if not path.is_file():
            return 0
        side = checksum_path(path)
        try:
            want = side.read_text().strip() if side.is_file() else None   # none: a cache from before checksums
            damaged = want is not None and _sha256(path) != want
        except OSError as e:
            print(f"flowdppo-video: warning: cannot read {path} or {side.name} ({e.strerror or e}); encoding "
                  "its prompts again", file=sys.stderr)
            return 0
        if damaged:
            print(f"flowdppo-video: warning: {path} does not match its checksum ({side.name}); encoding its prompts "
                  "again", file=sys.stderr)
            return 0
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key:
                    return 0
                index = json.loads(meta["entries"])
                parts: dict[int, dict[str, torch.Tensor]] = {}
                for name in f.keys():
                    i, k = name.split(".", 1)
                    parts.setdefault(int(i), {})[k] = f.get_tensor(name)
        except Exception:  # noqa: BLE001 - a truncated or foreign file: encode again
            return 0
        if not all(torch.isfinite(t).all() for ps in parts.values() for t in ps.values() if t.is_floating_point()):
            print(f"flowdppo-video: warning: {path} holds non-finite values; encoding its prompts again",
                  file=sys.stderr)
            return 0
        for i, (neg, p) in enumerate(index):
            self.entries[(neg, p)] = _from_parts(parts[i])
        return len(index)


def checksum_path(path: Path) -> Path:
    """Where the SHA-256 of the cache file ``path`` is kept."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_key(model: Any, video: tuple[int, int, int], images: dict[str, Any] | None = None) -> str:
    """A fingerprint of what decides the conditioning: ``model`` (the run's ``ModelConfig``), the video
    size ``(frames, height, width)`` and the image of each prompt (image-to-video)."""
    desc = {k: getattr(model, k, None) for k in ("family", "path", "init", "init_seed", "dtype",
                                                 "max_sequence_length")}
    if desc["path"] is not None:
        desc["path"] = str(Path(desc["path"]).resolve())
    desc["video"] = list(video)
    desc["images"] = sorted((p, str(v)) for p, v in (images or {}).items())
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:32]


@contextlib.contextmanager
def _transformers_on_host(adapter: VideoFlowAdapter, on: bool) -> Iterator[None]:
    """Within: the transformers (experts, reference copies) in host memory, so the encoders' start is
    not a peak above training's; moved back after (``Module.to``: the same parameters, bit-exact)."""
    mods = list({id(m): m for m in list(adapter.experts) + list(adapter.reference_copies().values())}.values())
    if not on:
        yield
        return
    for m in mods:
        m.to("cpu")
    if adapter.device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        for m in mods:
            m.to(adapter.device)


def missing_rows(cache: TextCache, prompts: list[str], negative: str | None) -> list[tuple[str | None, str]]:
    """The rows ``(negative or None, prompt)`` of ``prompts`` (and their CFG negatives) ``cache`` lacks."""
    jobs: list[tuple[str | None, str]] = [(None, p) for p in cache.missing(None, prompts)]
    if negative is not None:
        jobs += [(negative, p) for p in cache.missing(negative, prompts)]
    return jobs


def encode_rows(cache: TextCache, adapter: VideoFlowAdapter, jobs: list[tuple[str | None, str]], *,
                batch_size: int = 8, progress: bool = True) -> None:
    """Encode the rows ``jobs`` (:func:`missing_rows`) in batches of ``batch_size`` through the
    adapter's own encoders, with a progress bar, into ``cache``."""
    if jobs and not adapter.text_encoders_resident():
        raise ModelError("the text encoder was released before every prompt was encoded "
                         "(model.keep_text_encoder)")
    bar = tqdm(total=len(jobs), desc="encoding prompts", unit="prompt", disable=not progress or not jobs)
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            for neg in dict.fromkeys(n for n, _ in chunk):      # a batch holds one kind (the two meet once)
                cache.fill(adapter, neg, [p for n, p in chunk if n == neg])
            bar.update(len(chunk))
    finally:
        bar.close()


def run_negative(cfg: Any, num_experts: int | None = None) -> str | None:
    """The CFG negative prompt a run encodes (``cfg``: its ``Config``): ``data.negative_prompt`` when
    guidance is on, else None. ``num_experts`` None (the model not built yet): ``guidance_scale_2``
    counts as if the model had two experts (at worst a few rows more)."""
    s = cfg.sampler
    g2 = s.guidance_scale_2 if num_experts is None or num_experts > 1 else None
    on = s.guidance_scale != 1.0 or (g2 is not None and g2 != 1.0)
    return cfg.data.negative_prompt if on else None


def run_key(cfg: Any, images: dict[str, Any] | None) -> str:
    """:func:`model_key` of a run (``cfg``: its ``Config``)."""
    v = cfg.video
    return model_key(cfg.model, (v.num_frames, v.height, v.width), images)


def cache_prompts(adapter: VideoFlowAdapter, prompts: list[str], negative: str | None, key: str,
                  path: Path | None, *, keep_encoder: bool = False, batch_size: int = 8, progress: bool = True,
                  write: bool = True, offload_transformers: bool = False) -> dict[str, float]:
    """Encode ``prompts`` (and, with ``negative``, their CFG negatives) once, install the cache on the
    adapter, and release its text encoders unless ``keep_encoder``.

    ``path``: the cache file read first and written after (``write``: this process writes it; other
    ranks of a run read or encode alike). ``offload_transformers``: hold the transformers in host
    memory while encoding. Returns ``{"text/cached_prompts", "text/encoded_prompts",
    "text/encoder_released_bytes"}``.
    """
    cache = TextCache(key)
    read = cache.load(path) if path is not None else 0
    jobs = missing_rows(cache, prompts, negative)
    with _transformers_on_host(adapter, offload_transformers and bool(jobs)):
        encode_rows(cache, adapter, jobs, batch_size=batch_size, progress=progress)
        adapter.text_cache = cache
        # Released before the transformers come back: the encoder and the transformers never share
        # the device (their sum is no peak of the run).
        freed = 0 if keep_encoder else adapter.release_text_encoders()
    if jobs and path is not None and write:
        cache.save(path)
    return {"text/cached_prompts": float(read), "text/encoded_prompts": float(len(jobs)),
            "text/encoder_released_bytes": float(freed)}


def cache_run_prompts(adapter: VideoFlowAdapter, cfg: Any, prompts: list[str], images: dict[str, Any] | None,
                      run_dir: Path, progress: bool) -> dict[str, float]:
    """:func:`cache_prompts` for a run (``cfg``: its ``Config``): ``prompts`` (training and held-out)
    with the CFG negative when guidance is on; the file ``run_dir/text_cache.safetensors`` is read
    here and written by :meth:`TextCache.save` once the run directory is known to be this run's."""
    stats = cache_prompts(adapter, prompts, run_negative(cfg, adapter.num_experts), run_key(cfg, images),
                          run_dir / CACHE_FILE,
                          keep_encoder=cfg.model.keep_text_encoder, progress=progress, write=False,
                          offload_transformers=adapter.device.type == "cuda" and not cfg.model.keep_text_encoder)
    if progress:
        freed = stats["text/encoder_released_bytes"]
        tqdm.write(f"prompt conditioning: {stats['text/encoded_prompts']:.0f} rows encoded, "
                   f"{stats['text/cached_prompts']:.0f} read from {run_dir / CACHE_FILE}; "
                   + (f"text encoder released ({freed / 2 ** 30:.2f} GiB)" if freed else
                      "text encoder kept (model.keep_text_encoder)"))
    return stats
