"""The prompt side: a word-level tokenizer and a small transformer text encoder τ_θ.

The LDM paper's text-to-image model trains its text encoder from scratch, jointly with the UNet
(Rombach et al. 2022, section 4.3.1: "a BERT-tokenizer and ... a transformer to infer a latent code
which is mapped into the UNet via (multi-head) cross-attention"). Stable Diffusion later swapped in
a frozen CLIP encoder; a from-scratch encoder is what fits a laptop and a vocabulary of 30 words.

    prompt -> Tokenizer -> ids (B, L) -> token + position embeddings (B, L, D)
           -> num_layers x [pre-norm self-attention, pre-norm MLP] -> LayerNorm -> (B, L, D)

The empty prompt "" encodes to <bos> <eos> <pad>...: the unconditional input for classifier-free
guidance (Ho & Salimans 2022). Depends on attention.py.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
MAX_LENGTH = 4096  # tokens per prompt; the captions here have about 10


def split_words(text: str) -> list[str]:
    """Lowercase words and punctuation marks: "Top left: a RED circle" -> ["top", "left", ":", "a", "red", "circle"]."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


class Tokenizer:
    """Word-level tokenizer with a vocabulary built from training captions."""

    def __init__(self, vocab: list[str], max_length: int = 16):
        if not isinstance(vocab, (list, tuple)) or not all(isinstance(token, str) for token in vocab):
            raise TypeError(f"vocab must be a list of strings, got {vocab!r:.80}")
        if not isinstance(max_length, int) or isinstance(max_length, bool):
            raise TypeError(f"max_length must be an integer, got {max_length!r}")
        if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ValueError(f"vocab must start with the special tokens {SPECIAL_TOKENS}, got {vocab[:4]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate entries")
        if not 3 <= max_length <= MAX_LENGTH:  # every prompt is padded to max_length: a huge one fills the memory
            raise ValueError(f"max_length must be from 3 (<bos>, one word, <eos>) to {MAX_LENGTH}, got {max_length}")
        self.vocab = list(vocab)
        self.max_length = max_length
        self.token_to_id = {token: i for i, token in enumerate(self.vocab)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (self.token_to_id[t] for t in SPECIAL_TOKENS)

    @classmethod
    def from_captions(cls, captions: list[str], max_length: int | None = None) -> Tokenizer:
        """Every word seen in `captions`, sorted; max_length defaults to the longest caption plus <bos>/<eos>."""
        words = sorted({word for caption in captions for word in split_words(caption)})
        longest = max((len(split_words(c)) for c in captions), default=1)
        return cls(list(SPECIAL_TOKENS) + words, max_length if max_length is not None else longest + 2)

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """Words of `text`, unknown ones replaced by <unk>, wrapped in <bos> ... <eos> and truncated."""
        if not isinstance(text, str):
            raise TypeError(f"prompts must be strings, got {type(text).__name__}")
        words = [w if w in self.token_to_id else UNK for w in split_words(text)]
        return [BOS] + words[: self.max_length - 2] + [EOS]

    def ignored_words(self, text: str) -> dict[str, list[str]]:
        """The words of `text` the model cannot use, by reason: not in the vocabulary (they become <unk>),
        or past max_length (they are cut off). Empty when every word gets through."""
        if not isinstance(text, str):
            raise TypeError(f"prompts must be strings, got {type(text).__name__}")
        words = split_words(text)
        kept = self.max_length - 2  # <bos> and <eos> take two places
        ignored = {"not in the vocabulary": [w for w in words[:kept] if w not in self.token_to_id],
                   f"past the limit of {self.max_length} tokens": words[kept:]}
        return {reason: found for reason, found in ignored.items() if found}

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        """Token ids (B, max_length), padded with <pad>."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        ids = torch.full((len(texts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.tokenize(text)
            ids[row, : len(tokens)] = torch.tensor([self.token_to_id[t] for t in tokens])
        return ids

    def decode(self, ids: torch.Tensor) -> list[str]:
        """The tokens of one row of ids (L,)."""
        if ids.ndim != 1:
            raise ValueError(f"decode takes one row of ids (L,), got shape {tuple(ids.shape)}; decode rows one by one")
        return [self.vocab[i] for i in ids.tolist()]


@dataclass
class TextEncoderConfig:
    vocab_size: int
    max_length: int = 16
    hidden_size: int = 128  # = the UNet's cross_attention_dim
    num_layers: int = 2
    num_heads: int = 4

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_layers" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'num_layers' else 1}, got {value!r}")


class TextEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, None, heads, dim // heads)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))  # (B, L, D)
        return x + self.fc2(F.gelu(self.fc1(self.layer_norm2(x))))


class TextEncoder(nn.Module):
    """τ_θ: prompts -> (B, L, D) hidden states. Holds its tokenizer so prompts go in as strings.

    Fills the conditioner slot (interfaces.Conditioner): the empty prompt "" is the null condition.
    """

    null_condition = ""  # the unconditional input of classifier-free guidance

    def __init__(self, config: TextEncoderConfig, tokenizer: Tokenizer):
        super().__init__()
        if config.vocab_size != len(tokenizer) or config.max_length != tokenizer.max_length:
            raise ValueError(f"config (vocab_size={config.vocab_size}, max_length={config.max_length}) does not match "
                             f"the tokenizer (vocab {len(tokenizer)}, max_length {tokenizer.max_length})")
        if config.hidden_size % config.num_heads != 0:
            raise ValueError(f"hidden_size={config.hidden_size} must divide by num_heads={config.num_heads}")
        self.config = config
        self.tokenizer = tokenizer
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_length, config.hidden_size)
        self.layers = nn.ModuleList([TextEncoderLayer(config.hidden_size, config.num_heads)
                                     for _ in range(config.num_layers)])
        self.final_layer_norm = nn.LayerNorm(config.hidden_size)

    @classmethod
    def from_captions(cls, captions: list[str], hidden_size: int = 128, num_layers: int = 2,
                      num_heads: int = 4) -> TextEncoder:
        tokenizer = Tokenizer.from_captions(captions)
        config = TextEncoderConfig(len(tokenizer), tokenizer.max_length, hidden_size, num_layers, num_heads)
        return cls(config, tokenizer)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def config_dict(self) -> dict:
        """The config with the vocabulary: everything from_config_dict needs to rebuild this encoder."""
        return {**asdict(self.config), "vocab": self.tokenizer.vocab}

    @classmethod
    def from_config_dict(cls, config: dict) -> TextEncoder:
        config = dict(config)
        vocab = config.pop("vocab")
        return cls(TextEncoderConfig(**config), Tokenizer(vocab, config.get("max_length", 16)))

    def tokens(self, prompt: str) -> list[str]:
        """The tokens of `prompt` at positions 0, 1, ... of encode()'s output (<bos> ... <eos>)."""
        return self.tokenizer.tokenize(prompt)

    def ignored_words(self, prompt: str) -> dict[str, list[str]]:
        """The words of `prompt` this encoder cannot use, by reason (Tokenizer.ignored_words)."""
        return self.tokenizer.ignored_words(prompt)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        device = self.token_embedding.weight.device
        if not torch.is_tensor(input_ids) or input_ids.is_floating_point() or input_ids.is_complex() \
                or input_ids.dtype == torch.bool:
            got = f"a {input_ids.dtype} tensor" if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise TypeError(f"input_ids must be an integer tensor of token ids, got {got}")
        if input_ids.device != device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {device}: move one of them")
        if input_ids.ndim != 2 or input_ids.shape[1] != self.config.max_length or input_ids.shape[0] == 0:
            raise ValueError(f"input_ids must have shape (B, {self.config.max_length}) with B >= 1, "
                             f"got {tuple(input_ids.shape)}")
        if input_ids.numel() and not 0 <= input_ids.min() <= input_ids.max() < self.config.vocab_size:
            raise ValueError(f"input_ids must be token ids from 0 to {self.config.vocab_size - 1}, got values from "
                             f"{input_ids.min().item()} to {input_ids.max().item()}")
        return self._hidden_states(input_ids)

    def _hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)  # (B, L, D)

    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """Prompts (strings) -> encoder_hidden_states (B, L, D) on this module's device."""
        if not isinstance(prompts, (str, list, tuple)):
            raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        if not isinstance(prompts, str) and len(prompts) == 0:
            raise ValueError("prompts must hold at least one prompt, got an empty list")
        # The tokenizer's ids are valid by construction: skip forward()'s checks, whose min/max would make a GPU
        # wait for the CPU once per training step.
        return self._hidden_states(self.tokenizer(prompts).to(self.token_embedding.weight.device))
