"""The tiny Stable-Diffusion-shaped folders the tests build: now in minildm/tiny_sd.py (importable from notebooks)."""

from minildm.tiny_sd import *  # noqa: F401,F403
from minildm.tiny_sd import _real_unet_config, _special  # noqa: F401
