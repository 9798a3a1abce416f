"""The run report and checkpoint evaluation, end to end on a 2-iteration tiny run.

The pages are loaded in headless Chromium (Debian's ``chromium``, installed where missing and
possible, else these checks are skipped with the reason); a screenshot of each page is saved
under ``tests/artifacts/``.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from flowdppo_video.reporting.winrates import wilson

from .chromium import check_page, find_chromium
from .conftest import ROOT, TINY_CONFIG, cli, train

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "tests" / "artifacts"
PROMPTS = ROOT / "configs" / "prompts" / "demo.txt"
SECTIONS = ("training", "evaluation", "videos", "klmaps", "config")


class _Page(HTMLParser):
    """Section ids, and the tags and links inside each section."""

    def __init__(self) -> None:
        super().__init__()
        self.section: str | None = None
        self.tags: dict[str, list[tuple[str, dict]]] = {}
        self.links: list[str] = []
        self.text: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id")
            self.tags[self.section] = []
            self.text[self.section] = ""
        elif self.section is not None:
            self.tags[self.section].append((tag, a))
        for key in ("src", "href"):
            if a.get(key):
                self.links.append(a[key])

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None

    def handle_data(self, data):
        if self.section is not None:
            self.text[self.section] += data


def parse(index: Path) -> _Page:
    p = _Page()
    p.feed(index.read_text())
    return p


def assert_links_exist(page: _Page, folder: Path) -> None:
    for link in page.links:
        if link.startswith(("#", "data:")):
            continue
        assert not link.startswith(("http:", "https:", "//")), f"network link {link}"
        assert (folder / link).is_file(), f"{link} is linked but missing under {folder}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("report") / "run"
    train(run, f"eval.prompts={PROMPTS}", "eval.every=1", "eval.num_videos=2")
    return run


@pytest.fixture(scope="module")
def chromium() -> str:
    pytest.importorskip("websocket", reason="websocket-client (a test extra) drives Chromium's DevTools")
    path, why = find_chromium(install=True)
    if path is None:
        pytest.skip(f"headless Chromium unavailable: {why}")
    return path


def test_report_has_every_section_and_file(run_dir):
    index = run_dir / "report" / "index.html"
    assert index.is_file()                                   # written at the end of the run
    first = index.stat().st_mtime_ns
    out = cli("report", str(run_dir))
    assert "index.html" in out.stdout and index.stat().st_mtime_ns > first
    page = parse(index)
    assert set(SECTIONS) <= set(page.tags), set(SECTIONS) - set(page.tags)
    imgs = {s: [a["src"] for t, a in page.tags[s] if t == "img"] for s in SECTIONS}
    assert imgs["training"] == ["training.png"]
    assert imgs["evaluation"] == ["evaluation.png"]
    assert imgs["klmaps"] == ["klmaps/iter_000000.png", "klmaps/iter_000001.png"]   # first and last iteration
    videos = [a for t, a in page.tags["videos"] if t == "video"]
    assert len(videos) == 2 * 3                              # 2 held-out prompts x after 0, 1, 2 iterations
    for v in videos:
        assert {"controls", "muted", "loop", "playsinline"} <= set(v)
    for k in ("after 0 iterations", "after 1 iterations", "after 2 iterations", "a red ball rolls to the left"):
        assert k in page.text["videos"]
    assert "objective.delta" in page.text["config"]
    # The held-out table: one row per metric, one column per evaluation (base, after 1, after 2).
    heads = [a for t, a in page.tags["evaluation"] if t == "th"]
    assert len(heads) == 1 + 3
    text = page.text["evaluation"]
    assert "held-out metric" in text and text.count("frame_change") == 1 and "KL to base (nats/token)" in text
    assert_links_exist(page, index.parent)
    # The snapshots behind the maps: per SDE step, the token grid (3, 2, 2) of the tiny model.
    import numpy as np

    with np.load(run_dir / "klmaps" / "iter_000001.npz") as z:
        assert z["kl"].shape[0] == 2 and z["kl"].shape[2:] == (3, 2, 2)
        assert z["drop"].shape == z["kl"].shape and (z["kl"] >= 0).all()
        assert z["kl"].max() > 0                              # the last minibatch follows an optimizer step


def test_report_loads_in_headless_chromium(run_dir, chromium):
    check = check_page(chromium, run_dir / "report" / "index.html", width=1400, height=900)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_screenshot.png"
    shot.write_bytes(check.screenshot)
    print(f"screenshot: {shot}")
    assert check.console_errors == []
    assert check.content_width <= 1400              # readable in a 1400-pixel window: nothing scrolls sideways
    assert len(check.videos) == 6
    for v in check.videos:
        assert v["error"] is None and v["readyState"] >= 2 and v["duration"] > 0, v   # decoded, playable
    assert check.images and all(i["complete"] and i["naturalWidth"] > 0 for i in check.images), check.images
    assert check.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(check.screenshot) > 20_000


def test_tensorboard_gets_eval_videos(run_dir):
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard" / "eval"), size_guidance={"images": 0})
    acc.Reload()
    assert {"eval/videos/0", "eval/videos/1"} <= set(acc.Tags()["images"])
    events = acc.Images("eval/videos/0")
    assert [e.step for e in events] == [0, 1, 2]
    gif = Image.open(io.BytesIO(events[-1].encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 9 and gif.size == (128, 128)
    assert "eval/frame_change/mean" in acc.Tags()["scalars"]


@pytest.fixture(scope="module")
def compared(run_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("compare") / "cmp"
    # The override comes right after --checkpoints (which takes several values): still an override.
    proc = cli("eval", "--checkpoints", str(run_dir / "checkpoints" / "iter_000002"), "run.device=cpu",
               "--prompts", str(PROMPTS), "--reward", "frame_change", "--samples", "2", "--num-videos", "3",
               "--out", str(out))
    return out, proc.stdout


def test_eval_checkpoints(compared):
    out, stdout = compared
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "iter_000002"]       # the base model is always compared
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4 * 2                                   # models x prompts x seeds
    score = {(r["model"], r["prompt_index"], r["seed"]): r["frame_change"] for r in rows}
    # Recount the win-rate and the means from the raw scores.
    pairs = [(score[("iter_000002", i, s)], score[("base", i, s)]) for i in range(4) for s in (0, 1)]
    wins, ties = sum(a > b for a, b in pairs), sum(a == b for a, b in pairs)
    w = summary["results"]["frame_change"]["win_rate"]["iter_000002 > base"]
    assert (w["wins"], w["ties"], w["n"]) == (wins, ties, 8)
    assert w["value"] == pytest.approx((wins + ties / 2) / 8)
    assert (w["lo"], w["hi"]) == pytest.approx(wilson(wins + ties / 2, 8))    # small n: a wide interval
    # 8 pairs: the page, the table and the end of the output say the sample is small.
    warning = "warning: the win-rates rest on only 8 (prompt, seed) pairs per comparison"
    assert summary["warnings"][0].startswith(warning) and stdout.strip().splitlines()[-2].startswith(warning)
    assert warning in (out / "table.md").read_text() and warning in (out / "index.html").read_text()
    assert "total" not in summary["results"]                           # one reward: no total column
    back = summary["results"]["frame_change"]["win_rate"]["base > iter_000002"]
    assert back["value"] == pytest.approx(1 - w["value"])
    m = summary["results"]["frame_change"]["mean"]["base"]
    assert m["value"] == pytest.approx(sum(b for _, b in pairs) / 8)
    assert m["lo"] <= m["value"] <= m["hi"]
    assert "| base |" in stdout and "| iter_000002 |" in (out / "table.md").read_text()
    page = parse(out / "index.html")
    assert {"scores", "winrates", "videos", "setup"} <= set(page.tags)
    assert len([1 for t, _ in page.tags["videos"] if t == "video"]) == 3 * 2          # 3 items x 2 models
    assert_links_exist(page, out)


def test_eval_page_loads_in_headless_chromium(compared, chromium):
    out, _ = compared
    check = check_page(chromium, out / "index.html")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "eval_screenshot.png").write_bytes(check.screenshot)
    assert check.console_errors == []
    assert len(check.videos) == 6
    assert all(v["error"] is None and v["readyState"] >= 2 for v in check.videos), check.videos


def test_bad_input_is_one_line(tmp_path):
    proc = cli("report", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "no config.yaml there" in proc.stderr
    fake = tmp_path / "ckpt"
    fake.mkdir()
    proc = cli("eval", "--checkpoints", str(fake), "--prompts", str(PROMPTS), check=False)
    assert proc.returncode == 2 and f"{fake} is not a checkpoint directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    try:
        import wandb  # noqa: F401
    except ImportError:   # wandb is optional: asking for it without it is one clear line
        proc = cli("train", "--config", str(TINY_CONFIG), f"run.output_dir={tmp_path / 'w'}", "run.wandb=true",
                   check=False)
        assert proc.returncode == 2 and "run.wandb is true but the wandb package is not installed" in proc.stderr
        assert not (tmp_path / "w").exists()
