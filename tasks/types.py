"""Annotated field types shared by the configs of every workflow."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

# A random seed: numpy, torch and Python's random all accept 0 .. 2**32 - 1 (a negative seed fails only
# at compute, in numpy, without naming the field).
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
