"""Exercises of notebook 08_text_to_image. (Written next: see forward_process.py for the pattern.)"""

from __future__ import annotations

from .core import Exercise

EXERCISES: list[Exercise] = []
