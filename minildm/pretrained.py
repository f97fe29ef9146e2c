"""Stable Diffusion's diffusers folders, read into minildm's own modules, and minildm's UNet and VAE written as one.

A diffusers folder (what `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5` gives):

    model_index.json                   which class fills each part (StableDiffusionPipeline)
    unet/config.json                   UNet2DConditionModel's arguments    -> UNetConfig (unet_config_from_diffusers)
    unet/diffusion_pytorch_model.safetensors
    vae/config.json, vae/diffusion_pytorch_model.safetensors      AutoencoderKL   -> AutoencoderConfig
    text_encoder/, tokenizer/          transformers' CLIPTextModel and CLIPTokenizer -> clip.CLIPTextConditioner
    scheduler/scheduler_config.json    -> NoiseSchedule, prediction_type and a minildm sampler (sampler_from_diffusers)

minildm's modules carry diffusers' parameter names, so the weights load by name, strictly (every tensor's
name, shape and dtype checked); only the VAE's attention of older folders (query / key / value / proj_attn)
is renamed. Settings minildm does not implement (class embeddings, other block types, a sin-first time
embedding, ...) are refused with a ValueError naming them, never ignored. Only safetensors files are read:
a folder with `.bin` weights only is refused, as those are pickles (checkpoint.PICKLE_HELP says how to
convert them on a machine you trust).

The Stable Diffusion settings, and where minildm keeps them:

    diffusers unet/config.json            SD 1.5                 SD 2.1                 UNetConfig
    attention_head_dim (counts heads!)    8                      [5, 10, 20, 20]        attention_head_dim = ch / heads
                                                                                        (40, 80, 160, 160) | 64
    use_linear_projection                 false (1x1 conv)       true                   use_linear_projection
    upcast_attention                      false                  true                   upcast_attention
    norm_eps                              1e-5                   1e-5                   norm_eps
    flip_sin_to_cos, freq_shift           true, 0                true, 0                (minildm's only embedding)
    scheduler prediction_type             epsilon                v_prediction           LatentDiffusion.prediction_type
    vae: encoder padding before stride 2  (0, 1, 0, 1)           (0, 1, 0, 1)           downsample_padding = 0

`to_diffusers(model, folder)` goes the other way for a model trained here: unet/ and vae/ that diffusers'
UNet2DConditionModel.from_pretrained and AutoencoderKL.from_pretrained open, and a scheduler/ for its noise
schedule. The original single-file checkpoints are single_file.py's.

Depends on checkpoint.py, atomic.py, unet.py, autoencoder.py, schedule.py, samplers/ and clip.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from .atomic import atomic_directory, atomic_write_json
from .autoencoder import AutoencoderConfig, AutoencoderKL
from .checkpoint import check_state_dict, load_weights, safetensors_in, save_weights, stored_dtype
from .samplers import DDIMSampler, DDPMSampler, DPMSolverMultistepSampler
from .schedule import NoiseSchedule
from .unet import UNet2DConditionModel, UNetConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# unet/config.json keys minildm's UNet has no counterpart for, with the values that leave them unused: any other
# value is refused, naming the key. (Keys starting with "_", such as _diffusers_version, are notes, not settings.)
UNET_FIXED = {
    "center_input_sample": (False,), "flip_sin_to_cos": (True,), "freq_shift": (0,), "act_fn": ("silu",),
    "downsample_padding": (1,), "mid_block_scale_factor": (1, 1.0), "dual_cross_attention": (False,),
    "only_cross_attention": (False,), "class_embed_type": (None,), "addition_embed_type": (None,),
    "num_class_embeds": (None,), "resnet_time_scale_shift": ("default",), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "attention_type": ("default",), "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0),
    "addition_time_embed_dim": (None,), "reverse_transformer_layers_per_block": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "num_attention_heads": (None,),
}
UNET_MAPPED = ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
               "layers_per_block", "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block",
               "norm_num_groups", "norm_eps", "dropout", "use_linear_projection", "upcast_attention", "sample_size",
               "addition_embed_type_num_heads")  # the last is read only with an addition embedding, which is refused
VAE_FIXED = {
    "act_fn": ("silu",), "shift_factor": (None,), "latents_mean": (None,), "latents_std": (None,),
    "use_quant_conv": (True,), "use_post_quant_conv": (True,), "mid_block_add_attention": (True,),
}
VAE_MAPPED = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "down_block_types",
              "up_block_types", "layers_per_block", "norm_num_groups", "scaling_factor", "sample_size",
              "force_upcast")  # force_upcast: a pipeline's choice to run this VAE in float32; the caller's here
# Older diffusers (before 0.14) named the VAE attention's projections so; many SD folders on the hub still do.
LEGACY_VAE_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


# The unet/ and vae/ config.json of the real SD 1.5 and SD 2.1 folders (the keys those files hold), for building
# the networks at their real size without their weights (benchmarks/sd_step_time.py, the notebook).
SD15_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD21_UNET_CONFIG = {**SD15_UNET_CONFIG, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                    "sample_size": 96, "upcast_attention": True, "use_linear_projection": True}
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}


def _check_settings(config: dict, mapped: tuple, fixed: dict, where: str) -> None:
    """Raise ValueError naming every key of `config` minildm does not implement (unknown, or set to a value
    other than the one that leaves it unused)."""
    problems = []
    for key, value in config.items():
        if key.startswith("_") or key in mapped:
            continue
        if key not in fixed:
            problems.append(f"{key}={value!r} (unknown to minildm)")
        elif (not all(v is False for v in value) if isinstance(value, list) and fixed[key] == (False,)
              else value not in fixed[key]):  # a per-level list of flags (only_cross_attention) must be all off
            problems.append(f"{key}={value!r} (minildm implements only {fixed[key][0]!r})")
    if problems:
        raise ValueError(f"{where} uses settings minildm does not implement: {'; '.join(problems)}")


def _per_level(value, levels: int, name: str, where: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"{where}: {name}={value!r} needs one entry per level ({levels})")
    return values


def unet_config_from_diffusers(config: dict, where: str = "unet/config.json") -> UNetConfig:
    """A diffusers UNet2DConditionModel config (its config.json as a dict) as a UNetConfig.

    diffusers' `attention_head_dim` counts heads (its docstring's "dimension" is a known misnomer, diffusers
    issue 2011; `num_attention_heads`, which it means, must be null there): heads h at a level of C channels
    become minildm's head width C / h. Raises ValueError naming any setting minildm does not implement."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{where} describes a {config['_class_name']}, not a UNet2DConditionModel")
    _check_settings(config, UNET_MAPPED, UNET_FIXED, where)
    try:
        channels = list(config["block_out_channels"])
        down, up = list(config["down_block_types"]), list(config["up_block_types"])
    except KeyError as e:
        raise ValueError(f"{where} lacks {e.args[0]}") from e
    levels = len(channels)
    allowed_down, allowed_up = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}, {"CrossAttnUpBlock2D": True,
                                                                                       "UpBlock2D": False}
    if len(down) != levels or any(t not in allowed_down for t in down):
        raise ValueError(f"{where}: down_block_types={down} must be one of {tuple(allowed_down)} per level "
                         f"({levels} levels)")
    attention_levels = [allowed_down[t] for t in down]
    if len(up) != levels or any(t not in allowed_up for t in up) or \
            [allowed_up[t] for t in up] != attention_levels[::-1]:
        raise ValueError(f"{where}: up_block_types={up} must mirror down_block_types={down} (minildm's up path "
                         f"has attention exactly where the down path has)")
    heads = _per_level(config.get("attention_head_dim", 8), levels, "attention_head_dim (heads)", where)
    for level, (ch, h) in enumerate(zip(channels, heads)):
        if not isinstance(h, int) or h < 1 or ch % h:
            raise ValueError(f"{where}: attention_head_dim[{level}]={h!r} heads must divide the level's {ch} "
                             f"channels")
    layers = set(_per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block",
                            where))
    if len(layers) != 1:
        raise ValueError(f"{where}: transformer_layers_per_block={config['transformer_layers_per_block']} differs "
                         f"between levels; minildm uses one number for all")
    cross_attention_dim = config.get("cross_attention_dim", 1280)
    if not isinstance(cross_attention_dim, int):
        raise ValueError(f"{where}: cross_attention_dim={cross_attention_dim!r} per level is not implemented; "
                         f"minildm takes one width")
    head_dims = [ch // h for ch, h in zip(channels, heads)]
    try:
        return UNetConfig(
            in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
            block_out_channels=tuple(channels), attention_levels=tuple(attention_levels),
            layers_per_block=config.get("layers_per_block", 2), cross_attention_dim=cross_attention_dim,
            attention_head_dim=head_dims[0] if len(set(head_dims)) == 1 else tuple(head_dims),
            transformer_layers_per_block=layers.pop(), norm_num_groups=config.get("norm_num_groups", 32),
            dropout=config.get("dropout", 0.0), use_linear_projection=config.get("use_linear_projection", False),
            norm_eps=config.get("norm_eps", 1e-5), upcast_attention=config.get("upcast_attention", False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def unet_config_to_diffusers(config: UNetConfig, sample_size: int) -> dict:
    """UNet2DConditionModel's config for the network `config` describes (the inverse of unet_config_from_diffusers).
    Raises ValueError for an unconditional UNet: diffusers' UNet2DConditionModel always cross-attends."""
    if config.cross_attention_dim is None:
        raise ValueError("diffusers' UNet2DConditionModel always has cross-attention: an unconditional minildm UNet "
                         "(cross_attention_dim=None) has no diffusers counterpart")
    levels = range(len(config.block_out_channels))
    return {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size, "in_channels": config.in_channels,
        "out_channels": config.out_channels, "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels)],
        "layers_per_block": config.layers_per_block, "cross_attention_dim": config.cross_attention_dim,
        "attention_head_dim": [config.heads(level) for level in levels],  # diffusers counts heads here
        "transformer_layers_per_block": config.transformer_layers_per_block,
        "norm_num_groups": config.norm_num_groups, "norm_eps": config.norm_eps, "dropout": config.dropout,
        "use_linear_projection": config.use_linear_projection, "upcast_attention": config.upcast_attention,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "center_input_sample": False,
        "downsample_padding": 1, "mid_block_scale_factor": 1,
    }


def autoencoder_config_from_diffusers(config: dict, where: str = "vae/config.json") -> AutoencoderConfig:
    """A diffusers AutoencoderKL config as an AutoencoderConfig, with the encoder's (0, 1, 0, 1) padding that
    diffusers' AutoencoderKL always uses (downsample_padding=0). Raises ValueError naming what minildm lacks."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{where} describes a {config['_class_name']}, not an AutoencoderKL")
    _check_settings(config, VAE_MAPPED, VAE_FIXED, where)
    channels = list(config.get("block_out_channels", [64]))
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = config.get(key, [kind])
        if list(types) != [kind] * len(channels):
            raise ValueError(f"{where}: {key}={types} must be {kind!r} at each of the {len(channels)} levels")
    in_channels, out_channels = config.get("in_channels", 3), config.get("out_channels", 3)
    if in_channels != out_channels:
        raise ValueError(f"{where}: in_channels={in_channels} and out_channels={out_channels} differ; minildm's "
                         f"autoencoder returns images of the channels it takes")
    try:
        return AutoencoderConfig(in_channels=in_channels, latent_channels=config.get("latent_channels", 4),
                                 block_out_channels=tuple(channels), layers_per_block=config.get("layers_per_block", 1),
                                 norm_num_groups=config.get("norm_num_groups", 32),
                                 scaling_factor=config.get("scaling_factor", 0.18215), downsample_padding=0)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def autoencoder_config_to_diffusers(config: AutoencoderConfig, sample_size: int) -> dict:
    """AutoencoderKL's config for `config`. Raises ValueError for minildm's symmetric encoder padding
    (downsample_padding=1), which diffusers' AutoencoderKL cannot build."""
    if config.downsample_padding != 0:
        raise ValueError("this autoencoder pads its stride-2 convolutions on every side (downsample_padding=1), "
                         "diffusers' AutoencoderKL only (0, 1, 0, 1): its weights would give other images there; "
                         "train with AutoencoderConfig(downsample_padding=0) to export to diffusers")
    levels = len(config.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": config.in_channels, "out_channels": config.in_channels,
            "latent_channels": config.latent_channels, "block_out_channels": list(config.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "layers_per_block": config.layers_per_block, "norm_num_groups": config.norm_num_groups,
            "act_fn": "silu", "sample_size": sample_size, "scaling_factor": config.scaling_factor}


def read_config(path: Path) -> dict:
    """A diffusers config.json as a dict; FileNotFoundError if missing, ValueError if not a JSON object."""
    if not path.is_file():
        raise FileNotFoundError(f"expected a diffusers config at {path}, but there is none")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def _weights_file(folder: Path, variant: str | None) -> Path:
    return safetensors_in(folder, WEIGHTS_NAME if variant is None else
                          WEIGHTS_NAME.replace(".safetensors", f".{variant}.safetensors"))


def load_state_dict_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str,
                         torch_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load `state` into `module` strictly (names, shapes, dtypes; every mismatch named in one ValueError); the
    module takes the file's dtype, then `torch_dtype` if given. Returns the module in eval mode."""
    dtype = stored_dtype(state, where)
    if dtype is not None:
        module.to(dtype)
    check_state_dict(module.state_dict(), state, where)
    module.load_state_dict(state)
    torch_dtype = DTYPES.get(torch_dtype, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    if torch_dtype is not None and torch_dtype != "auto":
        if torch_dtype not in DTYPES.values():
            raise TypeError(f"torch_dtype must be one of {', '.join(f'torch.{n}' for n in DTYPES)}, their names, "
                            f"'auto' or None, got {torch_dtype!r}")
        module.to(torch_dtype)
    return module.eval()


def load_unet(folder: str | os.PathLike, torch_dtype=None, variant: str | None = None) -> UNet2DConditionModel:
    """minildm's UNet2DConditionModel from a diffusers unet/ folder (config.json + diffusion_pytorch_model
    .safetensors; variant="fp16" reads diffusion_pytorch_model.fp16.safetensors). Raises FileNotFoundError for a
    missing file, ValueError for settings minildm does not implement, pickled weights, or weights that do not fit."""
    folder = Path(folder)
    unet = UNet2DConditionModel(unet_config_from_diffusers(read_config(folder / "config.json"),
                                                           str(folder / "config.json")))
    weights = _weights_file(folder, variant)
    return load_state_dict_into(unet, load_weights(weights), str(weights), torch_dtype)


def load_vae(folder: str | os.PathLike, torch_dtype=None, variant: str | None = None) -> AutoencoderKL:
    """minildm's AutoencoderKL from a diffusers vae/ folder, as load_unet; the attention names of older folders
    (query, key, value, proj_attn) are read as today's (to_q, to_k, to_v, to_out.0)."""
    folder = Path(folder)
    vae = AutoencoderKL(autoencoder_config_from_diffusers(read_config(folder / "config.json"),
                                                          str(folder / "config.json")))
    weights = _weights_file(folder, variant)
    state = {}
    for key, tensor in load_weights(weights).items():
        for old, new in LEGACY_VAE_ATTENTION.items():
            if "attentions." in key and old in key:
                key = key.replace(old, new)
        state[key] = tensor
    return load_state_dict_into(vae, state, str(weights), torch_dtype)


# ---- the scheduler ------------------------------------------------------------------------------------------------

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
SCHEDULER_CLASSES = ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                     "DDPMScheduler")


def schedule_from_diffusers(config: dict, where: str = "scheduler/scheduler_config.json"
                            ) -> tuple[NoiseSchedule, str]:
    """(NoiseSchedule, prediction_type) of a diffusers scheduler config. Raises ValueError for trained_betas or
    an unknown beta_schedule."""
    if config.get("trained_betas") is not None:
        raise ValueError(f"{where}: trained_betas (a list of betas) is not implemented; minildm computes them from "
                         f"beta_schedule")
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"{where}: beta_schedule={beta_schedule!r} must be one of {tuple(BETA_SCHEDULES)}")
    schedule = NoiseSchedule(BETA_SCHEDULES[beta_schedule], config.get("num_train_timesteps", 1000),
                             config.get("beta_start", 0.0001), config.get("beta_end", 0.02),
                             rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False))
    return schedule, config.get("prediction_type", "epsilon")


def sampler_from_diffusers(config: dict, schedule: NoiseSchedule | None = None,
                           where: str = "scheduler/scheduler_config.json"):
    """The minildm sampler a diffusers scheduler config asks for, on `schedule` (default: the config's own):

        DDIMScheduler                 DDIMSampler with the config's spacing, steps_offset, set_alpha_to_one, clip_sample
        DDPMScheduler                 DDPMSampler
        DPMSolverMultistepScheduler   DPMSolverMultistepSampler (DPM-Solver++, order 1 or 2)
        PNDMScheduler (SD 1.x)        DDIMSampler, same leading spacing and steps_offset: see below
        EulerDiscreteScheduler (2.x)  DDIMSampler with set_alpha_to_one=True: see below

    PNDM (Liu et al. 2022, arXiv:2202.09778) with skip_prk_steps, as SD uses it, is PLMS: a 4th-order linear
    multistep method (their eq. 12, the Adams-Bashforth weights 55, -59, 37, -9 over 24) on the probability-flow
    ODE whose first-order step is exactly DDIM's (their eq. 11 is DDIM's transfer). minildm has no PLMS, so
    PNDM becomes DDIM on the same ODE and the same timesteps ("leading", steps_offset): a lower-order method,
    whose images are close to PNDM's at 50 steps but not equal; use DPM-Solver++ (make_sampler("dpm_solver"))
    for a higher-order one. Euler (Karras et al. 2022, Algorithm 2 without churn) steps x/sqrt(ᾱ) in
    σ = sqrt((1 - ᾱ)/ᾱ), and one Euler step there is DDIM's deterministic step exactly (Karras et al. sec. 4;
    Song et al. 2020 eq. 14); Euler ends at σ = 0, a clean x_0, which is DDIM's set_alpha_to_one=True. The one
    differences: Euler's default "linspace" timesteps are fractional, minildm's rounded; and diffusers' Euler
    starts those runs from σ_max · noise where x_T / sqrt(ᾱ_T) = sqrt(σ_max² + 1) · noise would be exact
    (0.23% more for SD's schedule), which DDIM's unit-variance start is.

    Returns the sampler. Raises ValueError for another scheduler class or a setting minildm does not implement
    (Karras sigmas, an SDE or a third-order DPM-Solver, ...), naming it."""
    own_schedule, prediction_type = schedule_from_diffusers(config, where)
    schedule = schedule if schedule is not None else own_schedule
    name = config.get("_class_name")
    if name not in SCHEDULER_CLASSES:
        raise ValueError(f"{where}: _class_name={name!r}; minildm maps {', '.join(SCHEDULER_CLASSES)}")
    # Each class's own defaults, for configs that leave a setting out.
    linspace_by_default = name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler")
    spacing = config.get("timestep_spacing", "linspace" if linspace_by_default else "leading")
    common = {"timestep_spacing": spacing, "prediction_type": prediction_type}
    refuse = {"thresholding": (False, None), "use_karras_sigmas": (False, None),
              "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
              "variance_type": ("fixed_small", None), "interpolation_type": ("linear", None),
              "timestep_type": ("discrete", None), "sigma_min": (None,), "sigma_max": (None,),
              "final_sigmas_type": ("zero", None)}
    if name == "DPMSolverMultistepScheduler":
        refuse.update({"algorithm_type": ("dpmsolver++", None), "solver_type": ("midpoint", None),
                       "lower_order_final": (True, None), "euler_at_final": (False, None),
                       "use_lu_lambdas": (False, None), "lambda_min_clipped": (-float("inf"), None),
                       "variance_type": (None,), "final_sigmas_type": ("zero", "sigma_min", None)})
    problems = [f"{key}={config[key]!r}" for key, allowed in refuse.items() if key in config
                and config[key] not in allowed]
    if problems:
        raise ValueError(f"{where}: {name} with {', '.join(problems)} is not implemented in minildm")
    try:
        if name in ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"):
            set_alpha_to_one = {"EulerDiscreteScheduler": True, "PNDMScheduler": config.get("set_alpha_to_one", False),
                                "DDIMScheduler": config.get("set_alpha_to_one", True)}[name]
            clip_sample = config.get("clip_sample", True) if name == "DDIMScheduler" else False  # PNDM, Euler: none
            return DDIMSampler(schedule, steps_offset=config.get("steps_offset", 0),
                               set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample, **common)
        if name == "DDPMScheduler":
            return DDPMSampler(schedule, steps_offset=config.get("steps_offset", 0),
                               clip_sample=config.get("clip_sample", True), **common)
        return DPMSolverMultistepSampler(schedule, solver_order=config.get("solver_order", 2),
                                         steps_offset=config.get("steps_offset", 0),
                                         final_sigmas_type=config.get("final_sigmas_type", "zero"), **common)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def load_sampler(path: str | os.PathLike, schedule: NoiseSchedule | None = None):
    """The sampler of a diffusers folder's scheduler/scheduler_config.json (sampler_from_diffusers)."""
    config_path = Path(path) / "scheduler" / "scheduler_config.json"
    return sampler_from_diffusers(read_config(config_path), schedule, str(config_path))


# ---- a whole folder -----------------------------------------------------------------------------------------------

def check_folder(path: Path) -> dict:
    """model_index.json of a diffusers StableDiffusionPipeline folder, after checking that its parts are there."""
    if not path.is_dir():
        raise FileNotFoundError(f"no diffusers folder at {path}")
    index = read_config(path / "model_index.json") if (path / "model_index.json").is_file() else None
    if index is None:
        single = sorted(p.name for p in path.iterdir() if p.suffix in {".safetensors", ".ckpt"})
        hint = f" (it holds {', '.join(single)}: a single-file checkpoint is read by minildm.single_file)" \
            if single else ""
        raise FileNotFoundError(f"{path} is not a diffusers folder: it has no model_index.json{hint}")
    pipeline = index.get("_class_name")
    if pipeline not in ("StableDiffusionPipeline", None):
        raise ValueError(f"{path / 'model_index.json'} describes a {pipeline}; minildm reads "
                         f"StableDiffusionPipeline folders (SD 1.x and 2.x)")
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path} lacks {', '.join(p + '/' for p in missing)}; a Stable Diffusion folder has "
                                f"unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    return index


def load_pipeline(model_class, path: str | os.PathLike, torch_dtype=None, variant: str | None = None,
                  clip_skip: int | None = None):
    """A LatentDiffusion (`model_class`) from a diffusers Stable Diffusion folder: the UNet as its backbone, the
    VAE as its first stage, CLIPTextConditioner as its conditioner, the scheduler's noise schedule and
    prediction_type, image_size = unet sample_size x the VAE's factor. In eval mode, on the CPU. The folder's
    own sampler is load_sampler(path, model.schedule). See LatentDiffusion.from_pretrained."""
    from .clip import CLIPTextConditioner  # needs transformers' tokenizer only when a folder is read

    path = Path(path)
    check_folder(path)
    unet = load_unet(path / "unet", torch_dtype, variant)
    vae = load_vae(path / "vae", torch_dtype, variant)
    conditioner = CLIPTextConditioner.from_pretrained(path, DTYPES.get(torch_dtype, torch_dtype)
                                                      if isinstance(torch_dtype, str) else torch_dtype,
                                                      clip_skip=clip_skip, variant=variant)
    schedule, prediction_type = schedule_from_diffusers(read_config(path / "scheduler" / "scheduler_config.json"))
    sample_size = read_config(path / "unet" / "config.json").get("sample_size", 64)
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return model_class(vae, unet, schedule, conditioner, prediction_type,
                       image_size=sample_size * vae.downsampling_factor).eval()


def to_diffusers(model, folder: str | os.PathLike) -> None:
    """Write `model`'s (a LatentDiffusion) UNet and autoencoder as diffusers' unet/ and vae/ (config.json +
    diffusion_pytorch_model.safetensors, in the model's dtype) and its noise schedule as scheduler/ (a
    DDIMScheduler config with the model's prediction_type), replacing `folder` as a whole. diffusers'
    UNet2DConditionModel.from_pretrained(folder, subfolder="unet") and AutoencoderKL.from_pretrained(folder,
    subfolder="vae") then open them. With a CLIPTextConditioner (a model read from SD files) it also writes
    text_encoder/ (transformers' CLIPTextModel files), tokenizer/ and model_index.json: a whole folder that
    diffusers' StableDiffusionPipeline.from_pretrained opens; minildm's word-level TextEncoder has no diffusers
    counterpart, so a model trained here gets no model_index.json. Raises ValueError for a part diffusers cannot
    hold (a DiT, pixel space, an unconditional UNet, an autoencoder with minildm's symmetric padding, a flow)."""
    if not isinstance(model.backbone, UNet2DConditionModel):
        raise ValueError(f"to_diffusers writes a UNet2DConditionModel backbone, got {type(model.backbone).__name__}")
    if not isinstance(model.first_stage, AutoencoderKL):
        raise ValueError(f"to_diffusers writes an AutoencoderKL first stage, got {type(model.first_stage).__name__}")
    if not isinstance(model.schedule, NoiseSchedule):
        raise ValueError("to_diffusers writes a diffusion model's schedule; a rectified flow has none for "
                         "diffusers' StableDiffusionPipeline schedulers")
    f = model.first_stage.downsampling_factor
    unet_config = unet_config_to_diffusers(model.backbone.config, model.image_size // f)
    vae_config = autoencoder_config_to_diffusers(model.first_stage.config, model.image_size)
    s = model.schedule
    beta_schedule = {v: k for k, v in BETA_SCHEDULES.items()}[s.beta_schedule]
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": s.num_train_timesteps,
                 "beta_schedule": beta_schedule, "beta_start": s.beta_start, "beta_end": s.beta_end,
                 "rescale_betas_zero_snr": s.rescale_betas_zero_snr, "prediction_type": model.prediction_type,
                 "timestep_spacing": "trailing", "set_alpha_to_one": True, "steps_offset": 0, "clip_sample": False}
    with atomic_directory(folder) as out:
        for name, module, config in (("unet", model.backbone, unet_config), ("vae", model.first_stage, vae_config)):
            (out / name).mkdir()
            save_weights(module.state_dict(), out / name / WEIGHTS_NAME)
            atomic_write_json(out / name / "config.json", config)
        (out / "scheduler").mkdir()
        atomic_write_json(out / "scheduler" / "scheduler_config.json", scheduler)
        if type(model.conditioner).__name__ == "CLIPTextConditioner":
            _write_text_side(model.conditioner, out)


def _write_text_side(conditioner, out: Path) -> None:
    """text_encoder/ (config.json + model.safetensors, transformers 4's key names as SD folders hold them),
    tokenizer/ (its files' texts) and model_index.json of a StableDiffusionPipeline folder."""
    config = conditioner.text_encoder.config
    (out / "text_encoder").mkdir()
    (out / "tokenizer").mkdir()
    save_weights(conditioner.text_encoder.state_dict(), out / "text_encoder" / "model.safetensors")
    atomic_write_json(out / "text_encoder" / "config.json", {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "bos_token_id": 0, "pad_token_id": 1,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
        "projection_dim": config.hidden_size, **asdict(config)})
    for name, text in conditioner.tokenizer_files.items():
        (out / "tokenizer" / name).write_text(text, encoding="utf-8")
    atomic_write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
