"""Exercises of notebook 05_pixel_diffusion. (Written next: see forward_process.py for the pattern.)"""

from __future__ import annotations

from .core import Exercise

EXERCISES: list[Exercise] = []
