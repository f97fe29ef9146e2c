"""CLIP's text encoder, the frozen τ_θ of Stable Diffusion, and the conditioner that feeds it prompts.

CLIP's text side (Radford et al. 2021, arXiv:2103.00020, section 2.4) is "a Transformer with the architecture
modifications described in Radford et al. (2019)" (GPT-2: layer norm before each sub-block and after the last),
on "a lower-cased byte pair encoding", its sequence "bracketed with [SOS] and [EOS] tokens", with "masked
self-attention". Stable Diffusion takes all 77 output states (not only the [EOS] one CLIP's loss uses) as the
keys and values of the UNet's cross-attention:

    prompt -> CLIPTokenizer (transformers' byte-level BPE) -> <|startoftext|> pieces <|endoftext|> pad... (B, 77)
           -> token embedding + learned position embedding                            (B, 77, D)
           -> N x [x = x + Attn_causal(LN1(x));  x = x + fc2(act(fc1(LN2(x))))]       pre-LN layers
           -> final LayerNorm -> last_hidden_state                                    (B, 77, D)

    SD 1.x: OpenAI's CLIP ViT-L/14 text tower, 12 layers, D = 768, 12 heads, act = quick-GELU x·σ(1.702x)
            (the sigmoid approximation of GELU, Hendrycks & Gimpel 2016, section 2; OpenAI's clip/model.py)
    SD 2.x: OpenCLIP ViT-H/14 (Cherti et al. 2023), 24 layers, D = 1024, 16 heads, act = GELU, and it reads the
            *penultimate* layer (Stability AI's FrozenOpenCLIPEmbedder, layer="penultimate"): the output of layer
            23, then the final LayerNorm. diffusers' SD 2.x folders keep only those 23 layers, so their last
            layer is the penultimate one; `clip_skip` reads earlier layers of any folder the way diffusers'
            StableDiffusionPipeline.encode_prompt does: hidden_states[-(clip_skip + 1)], then final_layer_norm.

There is no padding mask, as in SD (diffusers passes none to its text encoder): the causal mask alone keeps each
real token blind to the padding after it, while the pad positions, which the UNet also attends to, see the whole
prompt. So the pad token matters: SD 1.x pads with <|endoftext|>, SD 2.x with "!" (each folder's tokenizer
files say which).

Module and parameter names are transformers' (text_model.embeddings.token_embedding, ...encoder.layers.N.self_attn.
q_proj, ..., text_model.final_layer_norm), so the `text_encoder/model.safetensors` of a diffusers folder loads
strictly. The attention is written here rather than taken from attention.py: CLIP's has biases on q, k and v, a
causal mask, and transformers' names, and the UNet's needs none of them. The tokenizer is transformers'
CLIPTokenizer, needed only by CLIPTextConditioner (a well-kept BPE beats one of our own); CLIPTextModel needs
torch and safetensors. Shapes: B batch, L = 77 positions, D hidden_size, N layers. Depends on checkpoint.py.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import check_state_dict, load_weights, safetensors_in, stored_dtype

ACTIVATIONS = ("quick_gelu", "gelu")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x·σ(1.702x), OpenAI CLIP's activation (Hendrycks & Gimpel 2016, section 2: GELU(x) ≈ x·σ(1.702x))."""
    return x * torch.sigmoid(1.702 * x)


@dataclass
class CLIPTextConfig:
    """The text encoder's shape, with transformers' CLIPTextConfig field names (its config.json's keys).

    eos_token_id only picks the position of pooler_output: with the value 2 of the SD folders (written before
    transformers PR #24773) CLIPTextModel pools at the highest id in each row, which is <|endoftext|>.
    """

    vocab_size: int = 49408
    hidden_size: int = 768  # D, the UNet's cross_attention_dim
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77  # L: every prompt is padded or cut to it
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP, SD 2.x)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "hidden_act":
                if value not in ACTIVATIONS:
                    raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {value!r}")
            elif f.name == "layer_norm_eps":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                    raise ValueError(f"layer_norm_eps must be a number in (0, 1), got {value!r}")
            else:
                low = 0 if f.name == "eos_token_id" else 1
                if not isinstance(value, int) or isinstance(value, bool) or value < low:
                    raise ValueError(f"{f.name} must be an integer >= {low}, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must divide by num_attention_heads="
                             f"{self.num_attention_heads}")

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        """CLIP ViT-L/14's text tower, Stable Diffusion 1.x's text encoder (123M parameters)."""
        return cls()

    @classmethod
    def sd21(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-H/14's text tower as diffusers' SD 2.x folders hold it: 23 of its 24 layers (340M)."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu")

    @classmethod
    def from_transformers(cls, config: dict, where: str = "config") -> CLIPTextConfig:
        """The fields this model uses from a transformers CLIPTextModel config.json (the rest, such as dropout
        rates and initialisation, do not change a forward pass in eval mode). Raises ValueError for another kind
        of model, a missing field or a value out of range."""
        if not isinstance(config, dict):
            raise ValueError(f"{where} must hold a JSON object, got {type(config).__name__}")
        model_type, architectures = config.get("model_type"), config.get("architectures") or ["CLIPTextModel"]
        if model_type != "clip_text_model" or architectures != ["CLIPTextModel"]:
            raise ValueError(f"{where} describes a {model_type!r} model with architectures {architectures}; "
                             f"expected a transformers CLIPTextModel (model_type 'clip_text_model'), the "
                             f"text_encoder/ of an SD 1.x or 2.x diffusers folder")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in config and n != "eos_token_id"]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        try:
            return cls(**{n: config[n] for n in names if n in config})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e


@dataclass
class CLIPTextModelOutput:
    last_hidden_state: torch.Tensor  # (B, L, D): after the final LayerNorm
    pooler_output: torch.Tensor  # (B, D): last_hidden_state at each row's <|endoftext|>
    hidden_states: tuple[torch.Tensor, ...] | None = None  # N + 1 x (B, L, D): the embeddings, then each layer's
    # output (before the final LayerNorm), when asked for with output_hidden_states=True


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)  # learned

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: softmax(QK^T / sqrt(d) + M) V with M = -inf above the diagonal, so
    position i reads positions 0..i only ("masked self-attention", CLIP section 2.4)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        dim = config.hidden_size
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, L, D = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, L, D) -> (B, h, L, D/h)
        k = self.k_proj(hidden_states).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, h, L, D/h)
        v = self.v_proj(hidden_states).view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, h, L, D/h)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, L, D/h), the mask M applied
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))  # (B, h, L, D/h) -> (B, L, D)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu  # exact (erf) GELU
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))  # (B, L, D) -> (B, L, 4D) -> (B, L, D)


class CLIPEncoderLayer(nn.Module):
    """One pre-LN layer (GPT-2's arrangement): x + Attn(LN1(x)), then x + MLP(LN2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # (B, L, D)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    """Embeddings, the layers, the final LayerNorm: the body of CLIPTextModel (see its forward)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """CLIP's text transformer: token ids (B, L) -> CLIPTextModelOutput (last_hidden_state (B, L, D), ...).

    The body sits in `text_model` because transformers 4 named it so, and the SD folders' weights carry that
    prefix. from_pretrained(folder) loads a diffusers folder's text_encoder/.
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> CLIPTextModelOutput:
        """input_ids: integer ids (B, L), 1 <= L <= max_position_embeddings, on this model's device.
        Raises TypeError or ValueError for ids of another kind, shape, range or device."""
        self._check_ids(input_ids)
        body = self.text_model
        x = body.embeddings(input_ids)  # (B, L, D)
        hidden_states = [x]
        for layer in body.encoder.layers:
            x = layer(x)  # (B, L, D)
            hidden_states.append(x)
        last_hidden_state = body.final_layer_norm(x)  # (B, L, D)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if self.config.eos_token_id == 2:  # the SD folders' value: <|endoftext|> is the highest id of each row
            eos_position = input_ids.argmax(dim=-1)
        else:  # transformers' rule since PR #24773: the first position holding eos_token_id
            eos_position = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return CLIPTextModelOutput(last_hidden_state, last_hidden_state[rows, eos_position],
                                   tuple(hidden_states) if output_hidden_states else None)

    def _check_ids(self, input_ids) -> None:
        device = self.text_model.embeddings.token_embedding.weight.device
        if not torch.is_tensor(input_ids) or input_ids.is_floating_point() or input_ids.is_complex() \
                or input_ids.dtype == torch.bool:
            got = f"a {input_ids.dtype} tensor" if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise TypeError(f"input_ids must be an integer tensor of token ids, got {got}")
        L = self.config.max_position_embeddings
        if input_ids.ndim != 2 or not 1 <= input_ids.shape[1] <= L or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must have shape (B, L) with B >= 1 and 1 <= L <= {L}, "
                             f"got {tuple(input_ids.shape)}")
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}: move one of them")
        if not 0 <= input_ids.min() <= input_ids.max() < self.config.vocab_size:
            raise ValueError(f"input_ids must be token ids from 0 to {self.config.vocab_size - 1}, got values from "
                             f"{input_ids.min().item()} to {input_ids.max().item()}")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None) -> CLIPTextModel:
        """Load a transformers CLIPTextModel folder (config.json + model.safetensors: a diffusers folder's
        text_encoder/), in eval mode and frozen (requires_grad False), as SD uses it.

        Keys may carry the `text_model.` prefix (transformers 4, every SD folder) or not (transformers 5's
        save_pretrained); a `text_model.embeddings.position_ids` buffer, which older files hold, must be
        arange(L) and is dropped. torch_dtype: None or "auto" keeps the file's dtype; a torch dtype converts.
        variant: "fp16" reads model.fp16.safetensors, as diffusers' variant= does.
        Raises FileNotFoundError for a missing folder or file, ValueError for a pickle-only folder (never
        unpickled), another kind of model, or weights whose names, shapes or dtypes do not fit the config.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no text encoder folder at {folder}")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a transformers CLIPTextModel folder: it has no config.json")
        weights_name = "model.safetensors" if variant is None else f"model.{variant}.safetensors"
        if (folder / f"{weights_name}.index.json").is_file() and not (folder / weights_name).is_file():
            raise ValueError(f"{folder} holds sharded weights ({weights_name}.index.json), which this loader "
                             f"does not read: SD text encoders fit in one file")
        weights = safetensors_in(folder, weights_name)  # refuses pickles, never opening them
        config_path = folder / "config.json"
        try:
            config = CLIPTextConfig.from_transformers(json.loads(config_path.read_text(encoding="utf-8")),
                                                      str(config_path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e
        model = cls(config)
        model.load_transformers_state_dict(load_weights(weights), str(weights))
        if torch_dtype is not None and torch_dtype != "auto":
            if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
                raise TypeError(f"torch_dtype must be a floating-point torch.dtype, 'auto' or None, got "
                                f"{torch_dtype!r}")
            model = model.to(torch_dtype)
        return model.eval().requires_grad_(False)

    def load_transformers_state_dict(self, state: dict[str, torch.Tensor], where: str = "the state dict") -> None:
        """Load a transformers CLIPTextModel state dict (either key layout, see from_pretrained) strictly; the
        model takes the file's floating-point dtype. Raises ValueError naming every mismatch."""
        state = dict(state)
        prefixed = [k.startswith("text_model.") for k in state]
        if any(prefixed) and not all(prefixed):
            raise ValueError(f"{where} mixes names with and without the 'text_model.' prefix")
        if not any(prefixed):  # transformers 5's save_pretrained
            state = {f"text_model.{k}": v for k, v in state.items()}
        position_ids = state.pop("text_model.embeddings.position_ids", None)
        L = self.config.max_position_embeddings
        if position_ids is not None and not torch.equal(position_ids.reshape(-1).long(), torch.arange(L)):
            raise ValueError(f"{where}: text_model.embeddings.position_ids must be 0, 1, ..., {L - 1}; minildm "
                             f"computes the positions and cannot use others")
        dtype = stored_dtype(state, where)
        if dtype is not None:
            self.to(dtype)
        check_state_dict(self.state_dict(), state, where)
        self.load_state_dict(state)


# ---- the conditioner --------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
REQUIRED_TOKENIZER_FILES = TOKENIZER_FILES[:3]


def read_tokenizer_files(folder: str | os.PathLike) -> dict[str, str]:
    """The texts of a CLIPTokenizer folder's files (file name -> text): vocab.json, merges.txt,
    tokenizer_config.json and, when there, special_tokens_map.json. Raises FileNotFoundError naming a missing
    one, ValueError for a JSON file that does not parse or a tokenizer_config of another tokenizer class."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no tokenizer folder at {folder}")
    missing = [name for name in REQUIRED_TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        also = " (it has tokenizer.json only: write its vocab.json and merges.txt)" \
            if (folder / "tokenizer.json").is_file() else ""
        raise FileNotFoundError(f"{folder} is not a CLIPTokenizer folder: missing {', '.join(missing)}{also}")
    files = {name: (folder / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
             if (folder / name).is_file()}
    for name in files:
        if name.endswith(".json"):
            try:
                json.loads(files[name])
            except json.JSONDecodeError as e:
                raise ValueError(f"{folder / name} is not valid JSON: {e}") from e
    tokenizer_class = json.loads(files["tokenizer_config.json"]).get("tokenizer_class", "CLIPTokenizer")
    if tokenizer_class not in ("CLIPTokenizer", "CLIPTokenizerFast"):
        raise ValueError(f"{folder / 'tokenizer_config.json'} names tokenizer_class {tokenizer_class!r}; "
                         f"expected CLIPTokenizer")
    return files


def clip_tokenizer(files: dict[str, str]):
    """transformers' CLIPTokenizer built from the texts of its files (read_tokenizer_files), loaded through
    from_pretrained from a temporary folder: the way diffusers loads it, in every transformers version."""
    try:
        from transformers import CLIPTokenizer
    except ImportError as e:
        raise ImportError("CLIPTextConditioner tokenizes prompts with transformers' CLIPTokenizer: "
                          "pip install transformers") from e
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder)


class CLIPTextConditioner(nn.Module):
    """Prompts -> CLIP text states (B, 77, D): Stable Diffusion's conditioner (interfaces.Conditioner).

    text_encoder: a CLIPTextModel; tokenizer_files: the texts of its tokenizer's files (read_tokenizer_files),
    kept so that config_dict() holds them and a saved LatentDiffusion carries its tokenizer; clip_skip: None
    (last_hidden_state) or k >= 1, the output k layers before the last, through the final LayerNorm, as
    diffusers' clip_skip. Every prompt is padded to max_position_embeddings (77) with the tokenizer's pad token,
    or cut to it: ignored_words() names what a cut drops, and LatentDiffusion.generate warns about it.
    The empty prompt "" (<|startoftext|> <|endoftext|> pad...) is the null condition. It is read at the same
    layer as the prompts, as Stability AI's FrozenOpenCLIPEmbedder does; diffusers' encode_prompt (0.42) applies
    clip_skip to the prompt only, not to the negative prompt, so with clip_skip set the two differ in the
    unconditional half of guidance. (SD 2.x diffusers folders need no clip_skip: their last layer is the one.)
    Raises ValueError when the tokenizer does not fit the encoder (its 77 tokens, ids past vocab_size).
    """

    null_condition = ""

    def __init__(self, text_encoder: CLIPTextModel, tokenizer_files: dict[str, str], clip_skip: int | None = None):
        super().__init__()
        if not isinstance(text_encoder, CLIPTextModel):
            raise TypeError(f"text_encoder must be a minildm CLIPTextModel, got {type(text_encoder).__name__}")
        config = text_encoder.config
        if clip_skip is not None and (not isinstance(clip_skip, int) or isinstance(clip_skip, bool)
                                      or not 1 <= clip_skip < config.num_hidden_layers):
            raise ValueError(f"clip_skip must be None or an integer from 1 to {config.num_hidden_layers - 1} "
                             f"(the encoder has {config.num_hidden_layers} layers), got {clip_skip!r}")
        self.tokenizer = clip_tokenizer(tokenizer_files)
        if self.tokenizer.model_max_length != config.max_position_embeddings:
            raise ValueError(f"the tokenizer pads to model_max_length={self.tokenizer.model_max_length} tokens but "
                             f"the text encoder has {config.max_position_embeddings} positions")
        if len(self.tokenizer) > config.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but the text encoder's vocab_size is "
                             f"{config.vocab_size}: a tokenizer of another model?")
        self.text_encoder = text_encoder
        self.tokenizer_files = dict(tokenizer_files)
        self.clip_skip = clip_skip

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        clip_skip: int | None = None, variant: str | None = None) -> CLIPTextConditioner:
        """From a diffusers folder's text_encoder/ and tokenizer/ (`path` is the folder holding both), frozen and
        in eval mode. See CLIPTextModel.from_pretrained and read_tokenizer_files for what is checked."""
        path = Path(path)
        for sub in ("text_encoder", "tokenizer"):
            if not (path / sub).is_dir():
                raise FileNotFoundError(f"{path} has no {sub}/ folder; expected a diffusers Stable Diffusion folder "
                                        f"(model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/)")
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype, variant)
        return cls(text_encoder, read_tokenizer_files(path / "tokenizer"), clip_skip).eval()

    @property
    def hidden_size(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.text_encoder.config.max_position_embeddings

    def config_dict(self) -> dict:
        """The encoder's config, the tokenizer's file texts and clip_skip (written only when set): all that
        from_config_dict needs besides the weights. The files make it about 2 MB for a real SD tokenizer."""
        config = {"text_encoder": asdict(self.text_encoder.config), "tokenizer_files": self.tokenizer_files}
        return {**config, "clip_skip": self.clip_skip} if self.clip_skip is not None else config

    @classmethod
    def from_config_dict(cls, config: dict) -> CLIPTextConditioner:
        """A conditioner with untrained weights built from config_dict()'s output (the folder loader then loads
        the weights), frozen as from_pretrained's."""
        text_encoder = CLIPTextModel(CLIPTextConfig(**config["text_encoder"])).requires_grad_(False)
        return cls(text_encoder, config["tokenizer_files"], config.get("clip_skip"))

    def input_ids(self, prompts: list[str] | str) -> torch.Tensor:
        """Token ids (B, 77) on the CPU: <|startoftext|>, the prompt's first 75 pieces, <|endoftext|>, padding;
        diffusers' tokenizer call (padding="max_length", truncation=True)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a string or a list of strings, got {prompts!r:.80}")
        if len(prompts) == 0:
            raise ValueError("prompts must hold at least one prompt, got an empty list")
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> encoder_hidden_states (B, L, D): last_hidden_state, or with clip_skip = k the
        output of layer N - k through the final LayerNorm (hidden_states[-(k + 1)], as diffusers reads it)."""
        if self.clip_skip is None:
            return self.text_encoder(input_ids).last_hidden_state
        output = self.text_encoder(input_ids, output_hidden_states=True)
        return self.text_encoder.text_model.final_layer_norm(output.hidden_states[-(self.clip_skip + 1)])

    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts (strings) -> encoder_hidden_states (B, 77, D) on the encoder's device and in its dtype."""
        return self(self.input_ids(prompts).to(self.text_encoder.text_model.final_layer_norm.weight.device))

    def _pieces(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
        # verbose=False: transformers would otherwise log that a long prompt exceeds the limit; ignored_words says so.
        return self.tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids

    def tokens(self, prompt: str) -> list[str]:
        """A label for each position of encode()'s output before the padding: "<|startoftext|>", the prompt's
        pieces as text ("cat"; a word the vocabulary splits gives several pieces), "<|endoftext|>"."""
        ids = [self.tokenizer.bos_token_id] + self._pieces(prompt)[: self.max_length - 2] + \
            [self.tokenizer.eos_token_id]
        return [self.tokenizer.decode([i]) for i in ids]

    def ignored_words(self, prompt: str) -> dict[str, list[str]]:
        """The words of `prompt` past the 77-token limit (a word cut in two counts as ignored), as
        {"past the 77-token limit": [...]}; empty when the prompt fits. CLIP's byte-level BPE knows every text."""
        pieces = self._pieces(prompt)
        kept = self.max_length - 2  # <|startoftext|> and <|endoftext|> take two places
        if len(pieces) <= kept:
            return {}
        end_of_word = [self.tokenizer.convert_ids_to_tokens(i).endswith("</w>") for i in pieces]
        start = kept
        while start > 0 and not end_of_word[start - 1]:  # back to the start of a word the cut splits
            start -= 1
        words, word = [], []
        for i, ends in zip(pieces[start:], end_of_word[start:]):
            word.append(i)
            if ends:
                words.append(self.tokenizer.decode(word))
                word = []
        if word:
            words.append(self.tokenizer.decode(word))
        return {f"past the {self.max_length}-token limit": words}
