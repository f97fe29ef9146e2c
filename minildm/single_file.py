"""Original single-file Stable Diffusion checkpoints (the CompVis layout) in minildm's modules, and back.

The files Stability AI and most fine-tuners publish (`v1-5-pruned-emaonly.safetensors`, `v2-1_768-ema-pruned
.safetensors`) hold one state dict of the original LatentDiffusion class, under three prefixes:

    model.diffusion_model.   the UNet (openaimodel.py's names: input_blocks, middle_block, output_blocks)
    first_stage_model.       the autoencoder (encoder.down.0.block.1, mid.attn_1, ...; 1x1-conv attention)
    cond_stage_model.        SD 1.x: transformer.text_model.* (transformers' CLIPTextModel, as diffusers' text_encoder/)
                             SD 2.x: model.* (OpenCLIP: transformer.resblocks.N with fused in_proj q/k/v)

plus a few other tensors (the schedule's betas and alphas_cumprod, EMA copies as model_ema.*), which are not
read: the schedule is SD's, and the weights under model.diffusion_model. are the ones SD samples with.
The key map is built from the model's own structure (unet_key_map, vae_key_map: minildm name -> CompVis
name), checked in tests/test_single_file.py against diffusers' own conversion (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_open_clip_checkpoint and from_single_file with a local config).

What a file does not say is taken from a diffusers folder given as `config` (its unet/, vae/, text_encoder/
config.json, tokenizer/ and scheduler/, as diffusers' from_single_file(config=...)), or else from the shapes
and SD's published settings: SD 1 vs 2 from the text encoder's layout (OpenCLIP is 2.x) or, without one, the
cross-attention width (1024 is 2.x, as diffusers decides); 8 heads per level (SD 1.x) or 64-wide heads (2.x);
GroupNorm of 32 groups, norm eps 1e-5, scaling factor 0.18215; upcast attention for 2.x (it changes nothing in
float32); and prediction_type "v_prediction" for 2.x, "epsilon" for 1.x, as diffusers guesses: SD 2.x's
512-pixel "base" models predict ε, so give prediction_type="epsilon" for them. Pickled `.ckpt` files are
refused (never unpickled): checkpoint.PICKLE_HELP says how to convert one on a machine you trust.

Depends on checkpoint.py, unet.py, autoencoder.py, clip.py, schedule.py and pretrained.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .autoencoder import AutoencoderConfig, AutoencoderKL
from .checkpoint import PICKLE_HELP, load_weights, save_weights
from .pretrained import (
    DTYPES,
    autoencoder_config_from_diffusers,
    load_state_dict_into,
    read_config,
    schedule_from_diffusers,
    unet_config_from_diffusers,
)
from .schedule import NoiseSchedule
from .unet import UNet2DConditionModel, UNetConfig

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_PREFIX, OPEN_CLIP_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # the other names (norm1, conv1, ...) are the same
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _module_map_to_key_map(module_map: dict[str, tuple[str, dict]], state_keys) -> dict[str, str]:
    """minildm parameter name -> CompVis name, from {minildm module: (CompVis module, renames of its leaves)}."""
    keys = {}
    for key in state_keys:
        module, leaf = key.rsplit(".", 1)  # "down_blocks.0.resnets.1.conv1", "weight"
        for prefix in (module, *[module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)]):
            if prefix in module_map:
                target, renames = module_map[prefix]
                inner = module[len(prefix) + 1:]
                for old, new in renames.items():
                    if inner == old or inner.startswith(old + "."):
                        inner = new + inner[len(old):]
                        break
                keys[key] = ".".join(part for part in (target, inner, leaf) if part)
                break
        else:
            raise KeyError(f"no CompVis name for {key}")
    return keys


def unet_key_map(config: UNetConfig) -> dict[str, str]:
    """Every parameter of UNet2DConditionModel(config) -> its name under model.diffusion_model. in CompVis'
    openaimodel.py: input_blocks.k.0 is a ResNet, .1 its spatial transformer, input_blocks.k.0.op a downsampler;
    the middle block is 0 ResNet, 1 transformer, 2 ResNet; output_blocks.j likewise, the upsampler last."""
    c, levels = config, len(config.block_out_channels)
    modules = {"conv_in": ("input_blocks.0.0", {}), "time_embedding.linear_1": ("time_embed.0", {}),
               "time_embedding.linear_2": ("time_embed.2", {}), "conv_norm_out": ("out.0", {}),
               "conv_out": ("out.2", {}), "mid_block.resnets.0": ("middle_block.0", UNET_RESNET),
               "mid_block.attentions.0": ("middle_block.1", {}), "mid_block.resnets.1": ("middle_block.2", UNET_RESNET)}
    k = 1
    for level in range(levels):
        for i in range(c.layers_per_block):
            modules[f"down_blocks.{level}.resnets.{i}"] = (f"input_blocks.{k}.0", UNET_RESNET)
            modules[f"down_blocks.{level}.attentions.{i}"] = (f"input_blocks.{k}.1", {})
            k += 1
        if level < levels - 1:
            modules[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", {})
            k += 1
    j = 0
    for block, level in enumerate(reversed(range(levels))):
        for i in range(c.layers_per_block + 1):
            modules[f"up_blocks.{block}.resnets.{i}"] = (f"output_blocks.{j}.0", UNET_RESNET)
            modules[f"up_blocks.{block}.attentions.{i}"] = (f"output_blocks.{j}.1", {})
            j += 1
        if level > 0:  # the upsampler follows the level's last ResNet (and its transformer, if any)
            modules[f"up_blocks.{block}.upsamplers.0.conv"] = (
                f"output_blocks.{j - 1}.{2 if c.attention_levels[level] else 1}.conv", {})
    return _module_map_to_key_map(modules, UNet2DConditionModel(config).state_dict())


def vae_key_map(config: AutoencoderConfig) -> dict[str, str]:
    """Every parameter of AutoencoderKL(config) -> its name under first_stage_model.: encoder.down.i.block.j,
    encoder.down.i.downsample, mid.block_1 / attn_1 / block_2, norm_out; the decoder's up.i counts levels from
    the lowest resolution's end (decoder.up_blocks.0 is up.{levels - 1})."""
    levels = len(config.block_out_channels)
    modules = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for part in ("encoder", "decoder"):
        modules.update({f"{part}.conv_in": (f"{part}.conv_in", {}), f"{part}.conv_out": (f"{part}.conv_out", {}),
                        f"{part}.conv_norm_out": (f"{part}.norm_out", {}),
                        f"{part}.mid_block.resnets.0": (f"{part}.mid.block_1", VAE_RESNET),
                        f"{part}.mid_block.resnets.1": (f"{part}.mid.block_2", VAE_RESNET),
                        f"{part}.mid_block.attentions.0": (f"{part}.mid.attn_1", VAE_ATTENTION)})
    for i in range(levels):
        modules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
        modules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{levels - 1 - i}.upsample.conv", {})
        for j in range(config.layers_per_block + 1):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{levels - 1 - i}.block.{j}", VAE_RESNET)
    return _module_map_to_key_map(modules, AutoencoderKL(config).state_dict())


# ---- the text encoder: transformers' names <-> OpenCLIP's ----------------------------------------------------------

OPEN_CLIP_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_transformers(state: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict:
    """SD 2.x's OpenCLIP text tower (keys under `prefix`) in transformers' CLIPTextModel names, without its last
    layer: SD 2.x reads the penultimate one (as diffusers' folders and convert_open_clip_checkpoint keep it).
    The fused attention projection in_proj (3D, D) splits into q, k and v, in that order."""
    out = {"text_model.embeddings.token_embedding.weight": state[prefix + "token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": state[prefix + "positional_embedding"],
           "text_model.final_layer_norm.weight": state[prefix + "ln_final.weight"],
           "text_model.final_layer_norm.bias": state[prefix + "ln_final.bias"]}
    blocks = prefix + "transformer.resblocks."
    layers = 1 + max(int(k[len(blocks):].split(".")[0]) for k in state if k.startswith(blocks))
    for key, tensor in state.items():
        if not key.startswith(blocks):
            continue
        index, name = key[len(blocks):].split(".", 1)
        if int(index) == layers - 1:
            continue  # the last layer: SD 2.x never runs it
        layer = f"text_model.encoder.layers.{index}."
        if name.startswith("attn.in_proj_"):
            q, k, v = tensor.chunk(3, dim=0)  # (3D, ...) -> 3 x (D, ...)
            kind = name.rsplit("_", 1)[1]  # weight or bias
            out.update({f"{layer}self_attn.{p}_proj.{kind}": t.clone() for p, t in zip("qkv", (q, k, v))})
        else:
            for new, old in OPEN_CLIP_NAMES.items():
                name = name.replace(old, new)
            out[layer + name] = tensor
    return out


def transformers_to_open_clip(state: dict[str, torch.Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict:
    """The inverse of open_clip_to_transformers, plus the last layer SD 2.x does not run, written as zeros
    (an OpenCLIP ViT-H text tower has one layer more than SD 2.x reads; minildm has no weights for it)."""
    out = {prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"]}
    layer_keys = [k for k in state if k.startswith("text_model.encoder.layers.")]
    layers = 1 + max(int(k.split(".")[3]) for k in layer_keys)
    for index in range(layers + 1):
        source = index if index < layers else layers - 1  # the shapes of the unused last layer
        layer, block = f"text_model.encoder.layers.{source}.", f"{prefix}transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            qkv = torch.cat([state[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"])  # 3 x (D, ...) -> (3D, ...)
            out[f"{block}attn.in_proj_{kind}"] = qkv
        for key in layer_keys:
            if key.startswith(layer) and "self_attn." not in key.replace("self_attn.out_proj", "out_proj"):
                name = key[len(layer):]
                for new, old in OPEN_CLIP_NAMES.items():
                    name = name.replace(new, old)
                out[block + name] = state[key]
        if index == layers:
            out.update({k: torch.zeros_like(v) for k, v in out.items() if k.startswith(block)})
    return out


# ---- reading and writing a file ------------------------------------------------------------------------------------

def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint: safetensors only; a .ckpt / .pt pickle is refused."""
    path = Path(path)
    if path.suffix in {".ckpt", ".pt", ".pth", ".bin"}:
        raise ValueError(f"refusing to load {path}: {path.suffix} checkpoints are pickles, and unpickling can run "
                         f"any code. Use the .safetensors version of the model (most are published as both), or "
                         f"convert it yourself: {PICKLE_HELP}")
    state = load_weights(path)
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise ValueError(f"{path} is not an original Stable Diffusion checkpoint: no {UNET_PREFIX}* tensors "
                         f"(a diffusers unet/ file is read by minildm.pretrained.load_unet)")
    return state


def sd_version(state: dict[str, torch.Tensor]) -> int:
    """1 or 2: OpenCLIP text weights (or, without text weights, a cross-attention width of 1024) mean SD 2.x."""
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in state):
        return 2
    if any(k.startswith(CLIP_PREFIX) for k in state):
        return 1
    to_k = next(v for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    return 2 if to_k.shape[1] == 1024 else 1


def unet_config_from_checkpoint(state: dict[str, torch.Tensor], version: int | None = None,
                                attention_head_dim: int | tuple | None = None) -> UNetConfig:
    """A UNetConfig read off the shapes under model.diffusion_model. (channels, levels, layers, attention levels,
    text width, projection kind), with SD's settings for what shapes do not show: 8 heads per level for SD 1,
    64-wide heads for SD 2 (or `attention_head_dim`, minildm's head width), 32 groups, eps 1e-5."""
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    version = version if version is not None else sd_version(state)
    channels, attention_levels, layers_per_block, k = [], [], None, 1
    while f"input_blocks.{k}.0.in_layers.2.weight" in unet:  # one level: its ResNets, then a downsampler or the end
        count = 0
        has_attention = f"input_blocks.{k}.1.proj_in.weight" in unet
        while f"input_blocks.{k}.0.in_layers.2.weight" in unet:
            count += 1
            out_ch = unet[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0]
            k += 1
        channels.append(out_ch)
        attention_levels.append(has_attention)
        layers_per_block = count if layers_per_block is None else layers_per_block
        if f"input_blocks.{k}.0.op.weight" not in unet:
            break
        k += 1
    attn = next(k for k in unet if k.endswith("attn2.to_k.weight"))
    proj_in = unet[attn.split("transformer_blocks")[0] + "proj_in.weight"]
    depth = len({k.split("transformer_blocks.")[1].split(".")[0] for k in unet
                 if k.startswith(attn.split("transformer_blocks")[0] + "transformer_blocks.")})
    if attention_head_dim is None:
        attention_head_dim = tuple(ch // 8 for ch in channels) if version == 1 else 64
    return UNetConfig(in_channels=unet["input_blocks.0.0.weight"].shape[1], out_channels=unet["out.2.weight"].shape[0],
                      block_out_channels=tuple(channels), attention_levels=tuple(attention_levels),
                      layers_per_block=layers_per_block, cross_attention_dim=unet[attn].shape[1],
                      attention_head_dim=attention_head_dim, transformer_layers_per_block=depth, norm_num_groups=32,
                      use_linear_projection=proj_in.ndim == 2, norm_eps=1e-5, upcast_attention=version == 2)


def autoencoder_config_from_checkpoint(state: dict[str, torch.Tensor]) -> AutoencoderConfig:
    """An AutoencoderConfig read off the shapes under first_stage_model., with SD's 32 groups and 0.18215."""
    vae = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    levels = 1 + max(int(k.split(".")[2]) for k in vae if k.startswith("encoder.down."))
    channels = tuple(vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels))
    layers = 1 + max(int(k.split(".")[4]) for k in vae if k.startswith("encoder.down.0.block."))
    return AutoencoderConfig(in_channels=vae["encoder.conv_in.weight"].shape[1],
                             latent_channels=vae["post_quant_conv.weight"].shape[0], block_out_channels=channels,
                             layers_per_block=layers, norm_num_groups=32, scaling_factor=0.18215, downsample_padding=0)


def _take(state: dict, prefix: str, key_map: dict[str, str], target: dict, where: str) -> dict:
    """minildm's state dict from the tensors under `prefix`, reshaping 1x1 convolutions <-> linear layers where
    the two layouts differ (the VAE's attention); every tensor under the prefix must be used."""
    out = {}
    for ours, theirs in key_map.items():
        tensor = state.get(prefix + theirs)
        if tensor is None:
            raise ValueError(f"{where} lacks {prefix + theirs} (for minildm's {ours})")
        if tensor.ndim == 4 and target[ours].ndim == 2:
            tensor = tensor[:, :, 0, 0]  # (out, in, 1, 1) -> (out, in)
        out[ours] = tensor
    # The autoencoder's training loss (LPIPS and discriminator weights, first_stage_model.loss.*) rides along in
    # some files; it is not part of the model.
    unused = sorted(set(k for k in state if k.startswith(prefix) and not k.startswith(prefix + "loss."))
                    - {prefix + v for v in key_map.values()})
    if unused:
        raise ValueError(f"{where} has tensors this configuration does not use: {', '.join(unused[:8])}"
                         + (" ..." if len(unused) > 8 else ""))
    return out


def load_single_file(model_class, path: str | os.PathLike, config: str | os.PathLike | None = None,
                     tokenizer: str | os.PathLike | None = None, prediction_type: str | None = None,
                     torch_dtype=None, attention_head_dim=None, version: int | None = None):
    """A LatentDiffusion (`model_class`) from an original single-file SD 1.x / 2.x .safetensors checkpoint.

    config: a diffusers folder whose unet/, vae/, text_encoder/ config.json, tokenizer/ and scheduler/ describe
        the model (as diffusers' from_single_file(config=...)); None reads the shapes (see the module docstring).
    tokenizer: a CLIPTokenizer folder (vocab.json, merges.txt, ...) when `config` is None: a single file holds
        none (the SD 1.x and 2.x tokenizers are those of their diffusers folders).
    prediction_type: "epsilon" or "v_prediction"; None is the scheduler's of `config`, else v for SD 2.x.
    attention_head_dim: minildm's head width, for a file whose heads are not SD's (without `config`).
    version: 1 or 2 to say which SD the file is, instead of detecting it (sd_version).
    Raises ValueError for a pickle, a file that is not an SD checkpoint, or tensors that do not fit."""
    from .clip import CLIPTextConditioner, CLIPTextConfig, CLIPTextModel, read_tokenizer_files

    path = Path(path)
    state = read_checkpoint(path)
    if version not in (None, 1, 2):
        raise ValueError(f"version must be 1 (SD 1.x), 2 (SD 2.x) or None (detect it), got {version!r}")
    version = version if version is not None else sd_version(state)
    where = str(path)
    if config is not None:
        config = Path(config)
        unet_config = unet_config_from_diffusers(read_config(config / "unet" / "config.json"))
        vae_config = autoencoder_config_from_diffusers(read_config(config / "vae" / "config.json"))
        text_config = CLIPTextConfig.from_transformers(read_config(config / "text_encoder" / "config.json"))
        schedule, folder_prediction = schedule_from_diffusers(
            read_config(config / "scheduler" / "scheduler_config.json"))
        tokenizer = config / "tokenizer" if tokenizer is None else tokenizer
    else:
        unet_config = unet_config_from_checkpoint(state, version, attention_head_dim)
        vae_config = autoencoder_config_from_checkpoint(state)
        text_config, schedule, folder_prediction = None, NoiseSchedule(), None
    if tokenizer is None:
        raise ValueError("a single-file checkpoint holds no tokenizer: give tokenizer= a CLIPTokenizer folder (the "
                         "tokenizer/ of the model's diffusers folder) or config= a diffusers folder that has one")
    unet, vae = UNet2DConditionModel(unet_config), AutoencoderKL(vae_config)
    unet_state = _take(state, UNET_PREFIX, unet_key_map(unet_config), unet.state_dict(), where)
    vae_state = _take(state, VAE_PREFIX, vae_key_map(vae_config), vae.state_dict(), where)
    open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in state)  # the layout decides, not the version
    if open_clip:
        text_state = open_clip_to_transformers(state)
    else:
        text_state = {k[len(CLIP_PREFIX):]: v for k, v in state.items() if k.startswith(CLIP_PREFIX)}
    if text_config is None:
        hidden = text_state["text_model.embeddings.token_embedding.weight"].shape
        text_config = CLIPTextConfig(
            vocab_size=hidden[0], hidden_size=hidden[1], num_attention_heads=hidden[1] // 64,
            intermediate_size=text_state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=len({k.split(".")[3] for k in text_state if k.startswith("text_model.encoder.layers.")}),
            max_position_embeddings=text_state["text_model.embeddings.position_embedding.weight"].shape[0],
            hidden_act="gelu" if open_clip else "quick_gelu")
    text_encoder = CLIPTextModel(text_config)
    text_encoder.load_transformers_state_dict(text_state, where)
    if torch_dtype is not None and torch_dtype != "auto":
        text_encoder.to(DTYPES.get(torch_dtype, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype)
    conditioner = CLIPTextConditioner(text_encoder.eval().requires_grad_(False), read_tokenizer_files(tokenizer))
    prediction_type = prediction_type if prediction_type is not None else (
        folder_prediction if folder_prediction is not None else ("v_prediction" if version == 2 else "epsilon"))
    image_size = (768 if version == 2 and prediction_type == "v_prediction" else 512) if config is None else \
        read_config(config / "unet" / "config.json").get("sample_size", 64) * vae.downsampling_factor
    return model_class(load_state_dict_into(vae, vae_state, where, torch_dtype),
                       load_state_dict_into(unet, unet_state, where, torch_dtype), schedule,
                       conditioner.eval(), prediction_type, image_size).eval()


def save_single_file(model, path: str | os.PathLike) -> None:
    """Write a LatentDiffusion with SD's parts (UNet, AutoencoderKL, CLIPTextConditioner) as one original-layout
    .safetensors file: UNet and VAE under their CompVis names (the VAE's attention as 1x1 convolutions, as CompVis
    stores it), the text encoder as SD 1.x (OpenAI CLIP, quick-GELU) or SD 2.x (OpenCLIP, GELU) files hold it."""
    parts = (type(model.backbone).__name__, type(model.first_stage).__name__, type(model.conditioner).__name__)
    if parts != ("UNet2DConditionModel", "AutoencoderKL", "CLIPTextConditioner"):
        raise ValueError(f"a single-file SD checkpoint holds a UNet2DConditionModel, an AutoencoderKL and a "
                         f"CLIPTextConditioner; this model has {', '.join(parts)}")
    text = model.conditioner.text_encoder
    state = {}
    for prefix, module, key_map in ((UNET_PREFIX, model.backbone, unet_key_map(model.backbone.config)),
                                    (VAE_PREFIX, model.first_stage, vae_key_map(model.first_stage.config))):
        weights = module.state_dict()
        for ours, theirs in key_map.items():
            tensor = weights[ours]
            if prefix == VAE_PREFIX and ".mid.attn_1." in theirs and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # (out, in) -> (out, in, 1, 1): CompVis' 1x1 convolutions
            state[prefix + theirs] = tensor
    text_state = text.state_dict()
    if text.config.hidden_act == "gelu":
        state.update(transformers_to_open_clip(text_state))
    else:
        state.update({CLIP_PREFIX + k: v for k, v in text_state.items()})
    save_weights(state, path)
