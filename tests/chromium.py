"""Headless Chromium driven over the DevTools protocol, for checking HTML pages in tests.

Debian's ``chromium`` package, installed with apt-get where it is missing and we may (root),
and ``websocket-client`` (a test extra). :func:`find_chromium` says why a browser cannot be
had, so a test can skip with that reason.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def find_chromium(install: bool = True) -> tuple[str | None, str]:
    """``(path, "")`` of a Chromium binary, or ``(None, reason)``.

    Where none is on PATH and we are root on a Debian-like system, ``apt-get install -y
    chromium`` is tried once (about 30 s on a fresh machine).
    """
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path, ""
    if not install:
        return None, "no chromium on PATH"
    if not shutil.which("apt-get"):
        return None, "no chromium on PATH and no apt-get to install Debian's chromium package"
    if os.geteuid() != 0:
        return None, "no chromium on PATH and not root, so apt-get install chromium is not possible"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            proc = subprocess.run(["nice", "-n", "10", *cmd], env=env, capture_output=True, text=True,
                                  timeout=600)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                return None, f"`{' '.join(cmd)}` failed: {tail[0]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"installing chromium failed: {e}"
    path = shutil.which("chromium")
    return (path, "") if path else (None, "apt-get install chromium left no chromium on PATH")


@dataclass
class PageCheck:
    """What a page did in the browser."""

    console_errors: list[str] = field(default_factory=list)   # console.error, uncaught exceptions, load errors
    videos: list[dict] = field(default_factory=list)          # per <video>: src, readyState, error, duration
    images: list[dict] = field(default_factory=list)          # per <img>: src, complete, naturalWidth
    screenshot: bytes = b""
    content_width: float = 0.0                                # the page's CSS width: over the window = side-scrolling


_MEDIA_JS = """
(() => ({
  videos: [...document.querySelectorAll('video')].map(v => ({
    src: v.currentSrc || v.src, readyState: v.readyState, networkState: v.networkState,
    error: v.error ? v.error.code : null, duration: v.duration, width: v.videoWidth})),
  images: [...document.querySelectorAll('img')].map(i => ({
    src: i.currentSrc || i.src, complete: i.complete, naturalWidth: i.naturalWidth})),
}))()
"""


class _Cdp:
    def __init__(self, ws_url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str, timeout: float) -> bool:
        deadline = time.time() + timeout
        if any(e["method"] == method for e in self.events):
            return True
        while time.time() < deadline:
            self.ws.settimeout(max(0.05, deadline - time.time()))
            try:
                msg = json.loads(self.ws.recv())
            except Exception:
                break
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return True
        self.ws.settimeout(30)
        return False


def check_page(chromium: str, page: Path, width: int = 1280, height: int = 900,
               media_timeout: float = 20.0) -> PageCheck:
    """Load ``page`` (a local file) in headless Chromium; collect console errors, the state of
    every ``<video>`` and ``<img>`` once the videos have loaded (or failed, or timed out), and a
    full-page PNG screenshot."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    port_file = Path(profile) / "DevToolsActivePort"
    proc = subprocess.Popen(
        [chromium, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--mute-audio",
         "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", f"--window-size={width},{height}",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()) and time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode} before opening DevTools")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = [t for t in json.load(r) if t.get("type") == "page"]
        cdp = _Cdp(targets[0]["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            cdp.call(f"{domain}.enable")
        cdp.call("Page.navigate", url=page.resolve().as_uri())
        if not cdp.wait_event("Page.loadEventFired", 30):
            raise RuntimeError(f"{page} did not finish loading in 30 s")
        out = PageCheck()
        deadline = time.time() + media_timeout
        while True:   # until every video has its first frame (readyState >= 2) or an error
            state = cdp.call("Runtime.evaluate", expression=_MEDIA_JS, returnByValue=True)["result"]["value"]
            if all(v["readyState"] >= 2 or v["error"] is not None for v in state["videos"]) \
                    or time.time() > deadline:
                break
            time.sleep(0.2)
        out.videos, out.images = state["videos"], state["images"]
        metrics = cdp.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        out.content_width = float(size["width"])
        shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                        clip={"x": 0, "y": 0, "width": min(size["width"], 4000),
                              "height": min(size["height"], 12000), "scale": 1})
        out.screenshot = base64.b64decode(shot["data"])
        cdp.wait_event("__drain__", 0.3)   # collect late events
        for e in cdp.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                out.console_errors.append(p["exceptionDetails"].get("text", "exception"))
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.console_errors.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        cdp.ws.close()
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
