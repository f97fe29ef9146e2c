"""Exercises of notebook 04_unet. (Written next: see forward_process.py for the pattern.)"""

from __future__ import annotations

from .core import Exercise

EXERCISES: list[Exercise] = []
