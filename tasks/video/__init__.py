"""Video: generated physics clips and video models (issue #9)."""

from .clips import (
    BALL_COLOUR, SCALAR_COLUMNS, VARIABLES, VIOLATIONS, ClipConfig, World, clip_ids, column,
    distractor_colour, make_clips, pixel_values, targets,
)

__all__ = ["BALL_COLOUR", "SCALAR_COLUMNS", "VARIABLES", "VIOLATIONS", "ClipConfig", "World", "clip_ids",
           "column", "distractor_colour", "make_clips", "pixel_values", "targets"]
