"""The building blocks of the HTML pages (the run report, the checkpoint evaluation, before/after):
one style sheet, escaping, a page with its sections, tables, videos re-encoded to a visible size."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from flowdppo_video.runs.video import read_audio, read_video, write_video

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1400px;
     padding:0 18px 40px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:18px 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:14px 0 6px}
nav a{margin-right:14px} .muted{color:#666} img.plot{max-width:100%;background:#fff;border:1px solid #e3e3e3}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
     vertical-align:top} th{background:#f0f0f0} td.num{text-align:right;font-variant-numeric:tabular-nums}
.videos td{text-align:center} video{background:#000;image-rendering:pixelated;display:block;margin:0 auto}
.prompt{max-width:280px;font-size:13px} .good{background:#e6f4ea} .bad{background:#fdecea}
.scroll{overflow-x:auto;max-width:100%} td{overflow-wrap:anywhere}
"""

VIDEO_MIN_SIZE = 128   # small videos are upscaled (nearest neighbour) to at least this many pixels


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def page(title: str, sections: Sequence[tuple[str, str, str]], subtitle: str = "") -> str:
    """A whole HTML page: ``sections`` are ``(id, heading, body_html)``, linked from a top bar."""
    nav = " ".join(f'<a href="#{esc(i)}">{esc(h)}</a>' for i, h, _ in sections)
    body = "\n".join(f'<section id="{esc(i)}"><h2>{esc(h)}</h2>\n{b}\n</section>' for i, h, b in sections)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<title>{esc(title)}</title><link rel="icon" href="data:,"><style>{STYLE}</style></head>\n<body>\n'
            f'<h1>{esc(title)}</h1><p class="muted">{subtitle}</p>\n<nav>{nav}</nav>\n{body}\n</body></html>\n')


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], cls: str = "",
          raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (numbers right-aligned)."""
    def cell(v: Any) -> str:
        if raw:
            return f"<td>{v}</td>"
        if isinstance(v, float):
            return f'<td class="num">{"—" if not math.isfinite(v) else f"{v:.4g}"}</td>'
        if isinstance(v, int) and not isinstance(v, bool):
            return f'<td class="num">{v}</td>'
        return f"<td>{esc(v)}</td>"
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    # A table wider than the window scrolls inside its own box instead of widening the page.
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def video_tag(rel: str, width: int) -> str:
    return (f'<video src="{esc(rel)}" width="{width}" controls muted loop playsinline autoplay '
            f'preload="auto"></video>')


def report_video(src: Path, dst: Path, fps: float, min_size: int = VIDEO_MIN_SIZE) -> tuple[Path, int]:
    """Re-encode ``src`` into ``dst`` (H.264 mp4), nearest-neighbour upscaled to ``min_size``
    pixels, unless ``dst`` is already newer. Returns ``(dst, displayed width)``."""
    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        meta = dst.with_suffix(".json")
        if meta.is_file():
            return dst, int(json.loads(meta.read_text())["width"])
    frames = read_video(src)
    k = max(1, math.ceil(min_size / max(1, min(frames.shape[1:3]))))
    frames = frames.repeat(k, axis=1).repeat(k, axis=2)
    audio = read_audio(src)                     # a video with sound keeps it (the page's controls unmute it)
    write_video(dst, frames, fps=fps, **({} if audio is None else {"audio": audio[0], "audio_rate": audio[1]}))
    dst.with_suffix(".json").write_text(json.dumps({"width": int(frames.shape[2])}))
    return dst, int(frames.shape[2])


def flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as ``[("a.b.c", value), ...]``; lists stay values."""
    if isinstance(tree, dict) and tree:
        out = []
        for k, v in tree.items():
            out.extend(flatten(v, f"{prefix}{k}."))
        return out
    return [(prefix[:-1], tree)]


def config_table(config: dict[str, Any]) -> str:
    rows = [(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(config)]
    return (f"<details><summary>{len(rows)} keys (click to show)</summary>"
            f"{table(['key', 'value'], rows)}</details>")
