"""Reward throughput: optical-flow motion metrics, and the reward server against in-process scoring.

    .venv/bin/python tools/bench/reward_throughput.py                      # section "rewards" of docs/benchmarks.md
    .venv/bin/python tools/bench/reward_throughput.py --repeats 5 --sizes 256x256 480x832
    .venv/bin/python tools/bench/reward_throughput.py --smoke --out /tmp/r.md       # seconds: does it run?

(1) ``motion_quality`` (DIS flow, frames resized to a 128-pixel short side first, see
rewards/motion.py) on batches of 16-frame videos: videos per second, median of ``--repeats``.
(2) The same batch scored by ``score_videos`` in this process and through the ``remote`` reward
against ``serve-rewards``'s app on loopback (a uvicorn thread in this process, binary wire
format): the ratio of medians is the server's overhead (transfer, decoding, batching window).

The table goes into ``--out`` (default ``docs/benchmarks.md``) as its section ``rewards``, between
``<!-- section: rewards -->`` markers; a new file holds the section alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from flowdppo_video.commands.benchmarking import write_section

FPS = 16.0   # the videos' frame rate handed to the reward (speeds scale with it; the work does not)


def moving_videos(b: int, frames: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """``(b, frames, h, w, 3)`` uint8: smooth random texture sliding 2 px per frame."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(b, h // 8 + 1, w // 8 + frames, 3), dtype=np.uint8)
    tex = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)[:, :h]
    out = np.stack([tex[:, :, 2 * f:2 * f + w] for f in range(frames)], axis=1)
    return torch.from_numpy(np.ascontiguousarray(out))


def timed(fn, repeats: int) -> list[float]:
    fn()                                             # warm-up (flow init, connections)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--sizes", nargs="+", default=["256x256", "480x832"])
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"),
                    help="the markdown file whose section 'rewards' this writes")
    ap.add_argument("--smoke", action="store_true",
                    help="one repeat of 2 videos of 4 frames at 32x32 (seconds; the numbers mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        args.repeats, args.batch, args.frames, args.sizes = 1, 2, 4, ["32x32"]
    torch.set_num_threads(2)
    import rewards
    from rewards.server import BackgroundServer, create_app

    rows, server_rows = [], []
    entries = {"motion_quality": 1.0}
    local = rewards.build_rewards(entries)
    app = create_app(entries)
    with BackgroundServer(app) as url:
        remote = rewards.build_rewards({"motion_quality": {"type": "remote", "url": url, "reward": "motion_quality"}})
        for size in args.sizes:
            h, w = (int(x) for x in size.split("x"))
            videos = moving_videos(args.batch, args.frames, h, w)
            prompts = [""] * args.batch
            t_local = timed(lambda: rewards.score_videos(local, videos, prompts, fps=FPS), args.repeats)
            t_remote = timed(lambda: rewards.score_videos(remote, videos, prompts, fps=FPS), args.repeats)
            a, _ = rewards.score_videos(local, videos, prompts, fps=FPS)
            b, _ = rewards.score_videos(remote, videos, prompts, fps=FPS)
            assert torch.equal(a["motion_quality"], b["motion_quality"]), "server and in-process scores differ"
            m_local, m_remote = statistics.median(t_local), statistics.median(t_remote)
            rows.append((size, args.batch / m_local, m_local, t_local))
            server_rows.append((size, videos.numel() / 2 ** 20, m_local, m_remote, m_remote / m_local))
            print(json.dumps({"size": size, "local_s": t_local, "remote_s": t_remote}), flush=True)
    cmd = "  ".join(["`.venv/bin/python tools/bench/reward_throughput.py", f"--repeats {args.repeats}",
                     f"--sizes {' '.join(args.sizes)}`"])
    lines = ["## (e) Rewards: motion-metric throughput and reward-server overhead", "", cmd, "",
             f"- Machine: {platform.processor() or platform.machine()}, torch {torch.__version__} (2 threads), "
             f"{args.repeats} timed repeats after a warm-up, medians; batches of {args.batch} videos of "
             f"{args.frames} frames; `motion_quality` (DIS optical flow on frames resized to a 128-pixel short side, "
             "forward-backward and warp checks; one flow pass serves all three components).", "",
             "| video size | videos/s | median s per batch | all runs (s) |", "|---|---:|---:|---|"]
    for size, vps, med, ts in rows:
        lines.append(f"| {args.frames}×{size} | {vps:.2f} | {med:.3f} | {', '.join(f'{t:.3f}' for t in ts)} |")
    lines += ["", "| video size | MiB per batch | in process s | through the server s | ratio |", "|---|---:|---:|---:|---:|"]
    for size, mib, ml, mr, ratio in server_rows:
        lines.append(f"| {args.frames}×{size} | {mib:.1f} | {ml:.3f} | {mr:.3f} | **{ratio:.3f}x** |")
    lines += ["", "The server's scores equal the in-process ones exactly (checked in the run). Its overhead is "
              "the upload of raw pixels over loopback, their decoding and the batching window (10 ms).", ""]
    write_section(args.out, "rewards", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
