"""Tiny Stable-Diffusion-shaped text encoder and tokenizer folders, built locally (no download).

They have the layout of a diffusers folder's `text_encoder/` and `tokenizer/` (transformers' CLIPTextModel and
CLIPTokenizer files) and the real SD 1.5 and SD 2.1 configurations, shrunk in width only:

    variant  real model                    layers  heads  hidden (real)  activation  eps    pad token
    sd15     CLIP ViT-L/14 text tower      12      12     48 (768)       quick_gelu  1e-5   <|endoftext|>
    sd21     OpenCLIP ViT-H text tower     23      16     64 (1024)      gelu        1e-5   !

SD 2.x uses the penultimate of OpenCLIP's 24 layers: diffusers' folders (and its single-file conversion) keep
23 of them, so the last layer of the folder is the penultimate one. The tokenizer's vocabulary is a real CLIP
byte-level BPE vocabulary in miniature: the 256 byte symbols, the same with the end-of-word mark "</w>", the
merges of the few words in WORDS, then <|startoftext|> and <|endoftext|> last (as in CLIP's 49408-entry
vocabulary, where they are 49406 and 49407). Every text tokenizes, word by word or byte by byte.

Used by the tests (tests/test_clip.py, the whole-pipeline tests that compare with diffusers; tests/sd_tiny.py
re-exports this module) and by notebooks/15_your_code_real_weights.ipynb when no real weights are at hand.
Needs transformers to build the random text encoder and diffusers for the UNet and the VAE
(write_tiny_sd_folder); the tokenizer files are plain JSON and text. The weights are random: a folder
written here generates noise-like images, it only has the shapes (and the code paths) of the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Words that become one token each; any other text falls apart into byte-level pieces.
WORDS = ("a", "photo", "of", "an", "astronaut", "riding", "horse", "on", "mars", "red", "circle", "blue",
         "square", "cat", "dog", "the", "top", "left", "in", "center", "green", "triangle", "small", "large")

VARIANTS = {
    # hidden_size is the UNet's cross_attention_dim: the pipeline tests build their UNet to it.
    "sd15": {"hidden_act": "quick_gelu", "hidden_size": 48, "intermediate_size": 192, "num_attention_heads": 12,
             "num_hidden_layers": 12, "projection_dim": 48, "pad_token": "<|endoftext|>"},
    "sd21": {"hidden_act": "gelu", "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 16,
             "num_hidden_layers": 23, "projection_dim": 32, "pad_token": "!"},
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's and CLIP's reversible map from the 256 byte values to printable characters (bytes that are not
    printable are moved to code points from 256 up), in the order CLIP's vocabulary lists them."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, [chr(c) for c in chars]))


def tiny_vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary (token -> id) and its merges, in CLIP's order, that make each of `words` one token.

    Each word is merged left to right: "cat" -> "c a", "ca t</w>"; a merge another word already made is kept once.
    """
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = f"{merged} {piece}"
            merged = merged + piece
            if merge not in merges:
                merges.append(merge)
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def _special(content: str) -> dict:
    # How transformers 4 wrote special tokens into the SD folders' tokenizer files.
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tiny_tokenizer(path, pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `path` (created), as
    an SD folder's tokenizer/ holds them. pad_token: "<|endoftext|>" (SD 1.x) or "!" (SD 2.x). Returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges()
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    bos, eos = _special("<|startoftext|>"), _special("<|endoftext|>")
    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad_token, "unk_token": eos}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {"add_prefix_space": False, "bos_token": {"__type": "AddedToken", **bos}, "do_lower_case": True,
              "eos_token": {"__type": "AddedToken", **eos}, "errors": "replace", "model_max_length": model_max_length,
              "pad_token": pad_token, "special_tokens_map_file": "./special_tokens_map.json",
              "tokenizer_class": "CLIPTokenizer", "unk_token": {"__type": "AddedToken", **eos}}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def text_encoder_config(variant: str = "sd15", num_hidden_layers: int | None = None) -> dict:
    """The config.json of the tiny `variant` text encoder, with the fields the real SD folders' files have."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    shape = {k: v for k, v in VARIANTS[variant].items() if k != "pad_token"}
    if num_hidden_layers is not None:
        shape["num_hidden_layers"] = num_hidden_layers
    vocab, _ = tiny_vocab_and_merges()
    # bos 0 / eos 2 / pad 1 are the values in the SD folders (from before transformers PR #24773): with
    # eos_token_id 2, CLIPTextModel pools at the highest id, <|endoftext|>.
    return {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "eos_token_id": 2, "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "model_type": "clip_text_model", "pad_token_id": 1,
            "torch_dtype": "float32", "transformers_version": "4.25.0.dev0", "vocab_size": len(vocab), **shape}


def tiny_transformers_text_encoder(variant: str = "sd15", seed: int = 0, num_hidden_layers: int | None = None):
    """A random transformers CLIPTextModel of the tiny `variant` shape (needs transformers), in eval mode.

    Its weights are drawn wider than transformers' init (std 0.02) would: with std 0.02 every layer is close to
    the identity and a comparison could not tell the layers apart."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = {k: v for k, v in text_encoder_config(variant, num_hidden_layers).items()
              if k not in ("architectures", "dropout", "model_type", "torch_dtype", "transformers_version")}
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias") or "norm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
    return model


def write_tiny_text_encoder(path, variant: str = "sd15", seed: int = 0, num_hidden_layers: int | None = None,
                            legacy_keys: bool = True):
    """Write config.json and model.safetensors of a random tiny `variant` text encoder into `path`; return the
    transformers model. legacy_keys=True writes the keys as the SD folders hold them (transformers 4:
    `text_model.` before every name, and the int64 `text_model.embeddings.position_ids` buffer (1, 77));
    False writes transformers 5's save_pretrained names (no prefix, no buffer)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = tiny_transformers_text_encoder(variant, seed, num_hidden_layers)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if legacy_keys:
        state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
        state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(text_encoder_config(variant, num_hidden_layers), indent=2))
    return model


def write_tiny_text_side(path, variant: str = "sd15", seed: int = 0) -> Path:
    """text_encoder/ and tokenizer/ of a tiny `variant` model under `path` (a diffusers folder's root)."""
    path = Path(path)
    write_tiny_text_encoder(path / "text_encoder", variant, seed)
    write_tiny_tokenizer(path / "tokenizer", VARIANTS[variant]["pad_token"])
    return path


# ---- the UNet, the VAE, the scheduler and a whole folder (tests/test_pretrained.py, notebook 15) ----------------

def _real_unet_config(variant: str) -> dict:
    """unet/config.json of the real SD 1.5 / SD 2.1 folders (the keys those files hold)."""
    config = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
              "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
              "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
              "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
              "out_channels": 4, "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
    if variant == "sd21":  # 64-wide heads counted per level, linear projections, attention in float32, 768 px
        config.update({"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "dual_cross_attention":
                       False, "num_class_embeds": None, "only_cross_attention": False, "resnet_time_scale_shift":
                       "default", "sample_size": 96, "upcast_attention": True, "use_linear_projection": True})
    return config


def tiny_unet_config(variant: str = "sd15") -> dict:
    """The real `variant` UNet config shrunk in width only: channels / 10 (32, 64, 128, 128), the text width of
    the tiny text encoder; SD 1.5 keeps its 8 heads per level (head widths 4, 8, 16, 16), SD 2.1 its constant
    head width, shrunk from 64 to 8 (heads 4, 8, 16, 16). Everything else (layers, groups, eps, projections,
    upcast) as in the real file."""
    config = _real_unet_config(variant)
    config["block_out_channels"] = [c // 10 for c in config["block_out_channels"]]
    config["cross_attention_dim"] = VARIANTS[variant]["hidden_size"]
    if variant == "sd21":
        config["attention_head_dim"] = [c // 8 for c in config["block_out_channels"]]
    config["sample_size"] = 8
    return config


def tiny_vae_config() -> dict:
    """SD's vae/config.json (the same for 1.5 and 2.1) with channels / 4: (32, 64, 128, 128), groups 32."""
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [32, 64, 128, 128],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
            "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 64,
            "up_block_types": ["UpDecoderBlock2D"] * 4}


def scheduler_config(variant: str = "sd15") -> dict:
    """scheduler/scheduler_config.json of the real folders: PNDM (ε) for SD 1.5, Euler (v) for SD 2.1."""
    config = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
              "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
              "trained_betas": None}
    if variant == "sd21":
        return {"_class_name": "EulerDiscreteScheduler", **config, "prediction_type": "v_prediction"}
    return {"_class_name": "PNDMScheduler", **config}


def randomize_(model, seed: int = 0):
    """Every parameter of `model` drawn anew (norm weights near 1, biases and norm shifts near 0, other weights of
    std 1/sqrt(fan-in)): diffusers' zero biases and unit norms would let a swapped norm or bias go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p[0].numel() ** 0.5)
    return model.eval()


def tiny_diffusers_unet(variant: str = "sd15", seed: int = 0):
    """A random diffusers UNet2DConditionModel of tiny_unet_config(variant) (needs diffusers), in eval mode."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in tiny_unet_config(variant).items() if not k.startswith("_")}
    return randomize_(UNet2DConditionModel(**config), seed)


def tiny_diffusers_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    return randomize_(AutoencoderKL(**{k: v for k, v in tiny_vae_config().items() if not k.startswith("_")}), seed)


def write_tiny_sd_folder(path, variant: str = "sd15", seed: int = 0) -> dict:
    """A whole diffusers StableDiffusionPipeline folder of the tiny `variant` at `path`: model_index.json, unet/,
    vae/ (diffusers' save_pretrained, safetensors), text_encoder/, tokenizer/, scheduler/. Returns the diffusers
    and transformers models written: {"unet", "vae", "text_encoder"}. The same `seed` writes the same weights.
    Raises ValueError for an unknown variant (before writing anything)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    path = Path(path)
    unet, vae = tiny_diffusers_unet(variant, seed), tiny_diffusers_vae(seed + 1)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text_encoder = write_tiny_text_encoder(path / "text_encoder", variant, seed + 2)
    write_tiny_tokenizer(path / "tokenizer", VARIANTS[variant]["pad_token"])
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(variant), indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", scheduler_config(variant)["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}
