"""Exercises of notebook 02_autoencoder. (Written next: see forward_process.py for the pattern.)"""

from __future__ import annotations

from .core import Exercise

EXERCISES: list[Exercise] = []
