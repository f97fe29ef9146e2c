"""Samplers: the diffusion process run backwards, one algorithm per file as diffusers does.

    base.py   what they share: set_timesteps (the spacings), SamplerOutput, randn_tensor
    ddpm.py   DDPMSampler, ancestral sampling (Ho et al. 2020, eq. 7)
    ddim.py   DDIMSampler, deterministic or with noise η (Song et al. 2020, eqs. 12 and 16)
    dpm_solver.py  DPMSolverMultistepSampler, DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2)
    flow_match.py  FlowMatchEulerSampler, FlowMatchHeunSampler: a rectified flow's ODE (flow.py)

The interface they fill, which LatentDiffusion.generate relies on, is interfaces.Sampler.
A sampler never imports a network.
"""

from .base import TIMESTEP_SPACINGS, BaseSampler, SamplerOutput, randn_tensor
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverMultistepSampler
from .flow_match import FlowMatchEulerSampler, FlowMatchHeunSampler

__all__ = ["TIMESTEP_SPACINGS", "BaseSampler", "SamplerOutput", "randn_tensor", "DDIMSampler", "DDPMSampler",
           "DPMSolverMultistepSampler", "FlowMatchEulerSampler", "FlowMatchHeunSampler"]
