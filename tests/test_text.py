"""Tests for minildm/text.py: word splitting, the tokenizer (specials, <unk>, <bos>/<eos>, padding,
truncation, the empty prompt), its errors, and the text encoder (shapes, positions, the layer formula)."""

import pytest
import torch
from torch import nn

from minildm.text import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    TextEncoder,
    TextEncoderConfig,
    Tokenizer,
    split_words,
)

WORDS = ["a", "blue", "circle", "red", "square", ","]
VOCAB = list(SPECIAL_TOKENS) + WORDS


def ids_of(*tokens):
    return [VOCAB.index(t) for t in tokens]


# --- split_words -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,words",
    [
        ("Top left: a RED circle", ["top", "left", ":", "a", "red", "circle"]),
        ("two, blue squares!", ["two", ",", "blue", "squares", "!"]),
        ("  a\tred\n circle  ", ["a", "red", "circle"]),
        ("3 dots", ["3", "dots"]),
        ("red-ish", ["red", "-", "ish"]),
        ("", []),
        ("   ", []),
    ],
)
def test_split_words(text, words):
    assert split_words(text) == words


# --- Tokenizer ---------------------------------------------------------------------------------


def test_special_tokens_come_first():
    tok = Tokenizer(VOCAB, max_length=8)
    assert SPECIAL_TOKENS == (PAD, UNK, BOS, EOS)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert len(tok) == len(VOCAB)


def test_ids_are_bos_words_eos_then_padding():
    tok = Tokenizer(VOCAB, max_length=8)
    ids = tok("a red circle")
    assert ids.dtype == torch.long and ids.shape == (1, 8)
    assert ids[0].tolist() == ids_of(BOS, "a", "red", "circle", EOS, PAD, PAD, PAD)


def test_unknown_words_and_punctuation():
    tok = Tokenizer(VOCAB, max_length=10)
    assert tok.tokenize("a red hexagon") == [BOS, "a", "red", UNK, EOS]
    assert tok.tokenize("red, blue. circle") == [BOS, "red", ",", "blue", UNK, "circle", EOS]
    assert tok("red, blue")[0].tolist() == ids_of(BOS, "red", ",", "blue", EOS, PAD, PAD, PAD, PAD, PAD)


def test_case_insensitive():
    tok = Tokenizer(VOCAB, max_length=8)
    torch.testing.assert_close(tok("A RED Circle"), tok("a red circle"), rtol=0, atol=0)


def test_empty_prompt_is_bos_eos_padding():
    tok = Tokenizer(VOCAB, max_length=5)
    expected = ids_of(BOS, EOS, PAD, PAD, PAD)
    assert tok("")[0].tolist() == expected
    assert tok("   ")[0].tolist() == expected


def test_truncation_keeps_bos_and_eos():
    tok = Tokenizer(VOCAB, max_length=4)
    assert tok.tokenize("a red blue circle") == [BOS, "a", "red", EOS]
    assert tok("a red blue circle")[0].tolist() == ids_of(BOS, "a", "red", EOS)
    exact = Tokenizer(VOCAB, max_length=5)  # exactly max_length - 2 words: no truncation, no padding
    assert exact("a red circle")[0].tolist() == ids_of(BOS, "a", "red", "circle", EOS)
    assert Tokenizer(VOCAB, max_length=3)("a red")[0].tolist() == ids_of(BOS, "a", EOS)


def test_batch_of_prompts():
    tok = Tokenizer(VOCAB, max_length=6)
    ids = tok(["a red circle", "", "blue square"])
    assert ids.shape == (3, 6)
    assert ids[1].tolist() == ids_of(BOS, EOS, PAD, PAD, PAD, PAD)
    assert ids[2].tolist() == ids_of(BOS, "blue", "square", EOS, PAD, PAD)
    assert tok([]).shape == (0, 6)


def test_decode_round_trip():
    tok = Tokenizer(VOCAB, max_length=8)
    prompt = "A red, blue square"
    tokens = tok.decode(tok(prompt)[0])
    assert tokens == [BOS, "a", "red", ",", "blue", "square", EOS, PAD]
    assert [t for t in tokens if t not in SPECIAL_TOKENS] == split_words(prompt)


def test_from_captions_builds_sorted_vocab_and_max_length():
    captions = ["a red circle", "Two blue squares, left", "red"]
    tok = Tokenizer.from_captions(captions)
    assert tok.vocab == list(SPECIAL_TOKENS) + sorted({",", "a", "red", "circle", "two", "blue", "squares", "left"})
    assert tok.max_length == 5 + 2  # longest caption has 5 words (the comma counts)
    for caption in captions:
        assert UNK not in tok.tokenize(caption) and len(tok.tokenize(caption)) <= tok.max_length
    assert Tokenizer.from_captions(captions, max_length=4).max_length == 4


@pytest.mark.parametrize(
    "vocab,max_length,match",
    [
        (WORDS + list(SPECIAL_TOKENS), 8, "special tokens"),
        ([UNK, PAD, BOS, EOS] + WORDS, 8, "special tokens"),
        ([], 8, "special tokens"),
        (VOCAB + ["red"], 8, "duplicate"),
        (VOCAB, 2, "max_length"),
    ],
)
def test_tokenizer_errors(vocab, max_length, match):
    with pytest.raises(ValueError, match=match):
        Tokenizer(vocab, max_length)


@pytest.mark.parametrize("prompt", [None, 3, ["a red circle"], b"a red"])
def test_non_string_prompt_is_a_type_error(prompt):
    tok = Tokenizer(VOCAB, max_length=8)
    with pytest.raises(TypeError, match="strings"):
        tok([prompt])
    with pytest.raises(TypeError, match="strings"):
        tok.tokenize(prompt)


# --- TextEncoder -------------------------------------------------------------------------------

CAPTIONS = ["a red circle", "a blue square", "red square , blue circle"]


def make_encoder(seed=0, num_layers=1):
    torch.manual_seed(seed)
    return TextEncoder.from_captions(CAPTIONS, hidden_size=16, num_layers=num_layers, num_heads=2).eval()


def test_encoder_output_shape_and_empty_prompt():
    encoder = make_encoder(num_layers=2)
    L = encoder.tokenizer.max_length
    assert encoder.config == TextEncoderConfig(len(encoder.tokenizer), L, 16, 2, 2)
    with torch.no_grad():
        states = encoder.encode(["a red circle", "", "blue"])
        assert states.shape == (3, L, 16) and torch.isfinite(states).all()
        empty = encoder.encode("")
    assert empty.shape == (1, L, 16) and torch.isfinite(empty).all()
    torch.testing.assert_close(empty[0], states[1])  # each prompt is encoded on its own
    torch.testing.assert_close(states, encoder(encoder.tokenizer(["a red circle", "", "blue"])))


def test_positions_matter():
    encoder = make_encoder()
    with torch.no_grad():
        forward, backward = encoder.encode(["red circle", "circle red"])
    # <bos> red circle <eos> vs <bos> circle red <eos>: without positions, the states would just swap.
    assert not torch.allclose(forward[1], backward[2], atol=1e-4)
    assert not torch.allclose(forward[2], backward[1], atol=1e-4)
    # Control: with position embeddings zeroed the encoder is permutation-equivariant, and they do swap.
    nn.init.zeros_(encoder.position_embedding.weight)
    with torch.no_grad():
        forward, backward = encoder.encode(["red circle", "circle red"])
    torch.testing.assert_close(forward[1], backward[2])
    torch.testing.assert_close(forward[2], backward[1])


def test_encoder_layer_is_pre_norm_attention_then_mlp():
    encoder = make_encoder(num_layers=2)
    ids = encoder.tokenizer(["a red circle", "blue"])
    x = encoder.token_embedding(ids) + encoder.position_embedding.weight[None]  # (B, L, D)
    for layer in encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x))
        h = layer.fc1(layer.layer_norm2(x))
        x = x + layer.fc2(0.5 * h * (1 + torch.erf(h / 2**0.5)))
    expected = nn.functional.layer_norm(x, (16,), encoder.final_layer_norm.weight, encoder.final_layer_norm.bias)
    torch.testing.assert_close(encoder(ids), expected)


def test_encoder_config_must_match_tokenizer():
    tok = Tokenizer(VOCAB, max_length=8)
    TextEncoder(TextEncoderConfig(len(VOCAB), 8, 16, 1, 2), tok)  # matching: fine
    with pytest.raises(ValueError, match="does not match"):
        TextEncoder(TextEncoderConfig(len(VOCAB) + 1, 8, 16, 1, 2), tok)
    with pytest.raises(ValueError, match="does not match"):
        TextEncoder(TextEncoderConfig(len(VOCAB), 9, 16, 1, 2), tok)
    with pytest.raises(ValueError, match="num_heads"):
        TextEncoder(TextEncoderConfig(len(VOCAB), 8, 18, 1, 4), tok)


def test_encoder_input_shape_errors():
    encoder = make_encoder()
    L = encoder.config.max_length
    for ids in (torch.zeros(2, L + 1, dtype=torch.long), torch.zeros(L, dtype=torch.long)):
        with pytest.raises(ValueError, match="input_ids"):
            encoder(ids)
