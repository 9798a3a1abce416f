"""The embedded shapes world: a prompt grammar and ground-truth videos for each prompt."""

from .grammar import (BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, SPEEDS, Scene, all_scenes, parse_prompt,
                      split_scenes, vocabulary)
from .render import FRAMES, SIZE, render, render_batch

__all__ = ["BACKGROUNDS", "COLOURS", "DIRECTIONS", "FRAMES", "SHAPES", "SIZE", "SPEEDS", "Scene", "all_scenes",
           "parse_prompt", "render", "render_batch", "split_scenes", "vocabulary"]
