"""How big the notebooks' runs are: MINILDM_PROFILE = ci (seconds, for CI), cpu (a laptop, minutes; the
default) or gpu (larger). A notebook asks `pick(ci=..., cpu=..., gpu=...)` for each size it needs."""

from __future__ import annotations

import os

PROFILES = ("ci", "cpu", "gpu")


def current_profile() -> str:
    name = os.environ.get("MINILDM_PROFILE", "cpu")
    if name not in PROFILES:
        raise ValueError(f"MINILDM_PROFILE must be one of {PROFILES}, got {name!r}")
    return name


def pick(ci, cpu, gpu=None):
    """The value for the current profile; gpu defaults to the cpu value."""
    return {"ci": ci, "cpu": cpu, "gpu": gpu if gpu is not None else cpu}[current_profile()]
