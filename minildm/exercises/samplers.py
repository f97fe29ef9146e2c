"""Exercises of notebook 07_samplers. (Written next: see forward_process.py for the pattern.)"""

from __future__ import annotations

from .core import Exercise

EXERCISES: list[Exercise] = []
