"""The shapes world's prompt grammar: colour, shape, direction, speed, background.

``"a red circle moves left slowly on black"``. 4 x 3 x 4 x 2 x 2 = 192 prompts, split once
into train and held-out sets with a fixed seed so every word appears in both.

Defined in :mod:`rewards.shapes_world` (the shapes-world rewards read it too, and the rewards
package imports nothing from this one); every name stays importable here.
"""

from rewards.shapes_world import (BACKGROUNDS, COLOURS, DIRECTIONS, HELD_OUT_FRACTION, SHAPES, SPEEDS, SPLIT_SEED,
                                  Scene, all_scenes, parse_prompt, split_scenes, vocabulary)

__all__ = ["BACKGROUNDS", "COLOURS", "DIRECTIONS", "HELD_OUT_FRACTION", "SHAPES", "SPEEDS", "SPLIT_SEED", "Scene",
           "all_scenes", "parse_prompt", "split_scenes", "vocabulary"]
