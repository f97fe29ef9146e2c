"""Exercises of notebook 08, text to image: prompts into token ids, and classifier-free guidance.

Notation as in ldm.py and text.py: ε_u = ε_θ(z_t, t, τ("")) the unconditional prediction, ε_c = ε_θ(z_t, t, τ(y))
the conditional one, s the guidance scale (s = 1: the conditional model alone); a prompt becomes
<bos> word ... word <eos> <pad> ... of max_length ids. Each solution below is the code of the notebook's solution
cell (between # BEGIN SOLUTION and # END SOLUTION); each Mistake is a wrong answer students write, with the hint
it earns.
"""

from __future__ import annotations

import torch

from ..text import SPECIAL_TOKENS, Tokenizer, split_words
from .core import Exercise, Mistake

SOURCE_CFG = "Ho & Salimans 2022 (arXiv:2207.12598), eq. (6), written with s = 1 + w"


# ---- classifier-free guidance ---------------------------------------------------------------------------------------


def classifier_free_guidance(noise_uncond, noise_cond, guidance_scale):
    # BEGIN SOLUTION
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)  # ε̂ = ε_u + s (ε_c - ε_u)
    # END SOLUTION


def _guidance_cases(seed):
    g = torch.Generator().manual_seed(700 + seed)
    cases = []
    scales = (1.0, 3.0 + seed, 7.5, 0.0)  # 1: the conditional model alone; 0: the unconditional one
    for shape, guidance_scale in zip(((3, 4, 5, 2), (3, 4, 5, 2), (2, 1, 3, 5), (2, 1, 3, 5)), scales):
        noise_uncond = torch.randn(shape, generator=g, dtype=torch.float64)
        noise_cond = torch.randn(shape, generator=g, dtype=torch.float64)
        cases.append({"noise_uncond": noise_uncond, "noise_cond": noise_cond, "guidance_scale": guidance_scale})
    return cases


CLASSIFIER_FREE_GUIDANCE = Exercise(
    name="classifier_free_guidance", notebook="08_text_to_image",
    task="classifier_free_guidance(noise_uncond, noise_cond, guidance_scale) -> ε̂ (B, c, h, w): the guided noise "
         "prediction, from the network's unconditional and conditional predictions; scale 1 gives the conditional "
         "one.",
    source=SOURCE_CFG,
    solution=classifier_free_guidance, cases=_guidance_cases,  # LatentDiffusion.guided_model_output: own tests
    mistakes=(
        Mistake("the sign is flipped: that pushes away from the prompt; ε̂ = ε_u + s (ε_c - ε_u) moves from the "
                "unconditional prediction towards the conditional one",
                lambda noise_uncond, noise_cond, guidance_scale: noise_uncond
                + guidance_scale * (noise_uncond - noise_cond)),
        Mistake("that scales the conditional prediction alone: s · ε_c is not a guidance; extrapolate from ε_u "
                "towards ε_c, ε̂ = ε_u + s (ε_c - ε_u)",
                lambda noise_uncond, noise_cond, guidance_scale: guidance_scale * noise_cond),
        Mistake("that is the paper's w-form with w = s, i.e. scale 1 + s: with s = 1 + w, ε̂ = ε_u + s (ε_c - ε_u), "
                "so that s = 1 gives the conditional model",
                lambda noise_uncond, noise_cond, guidance_scale: noise_uncond
                + (1 + guidance_scale) * (noise_cond - noise_uncond)),
        Mistake("the unconditional and conditional predictions are swapped: start from ε_u and move towards ε_c",
                lambda noise_uncond, noise_cond, guidance_scale: noise_cond
                + guidance_scale * (noise_uncond - noise_cond)),
    ),
)


# ---- debug this: guidance from one batched call ----------------------------------------------------------------------


def guided_prediction(model_output, guidance_scale):
    # BEGIN SOLUTION
    noise_uncond, noise_cond = model_output.chunk(2)  # (2B, c, h, w) -> 2 x (B, c, h, w): the batch was [uncond, cond]
    return noise_uncond + guidance_scale * (noise_cond - noise_uncond)  # ε̂ = ε_u + s (ε_c - ε_u)
    # END SOLUTION


GUIDED_PREDICTION_STUB = """\
noise_uncond, noise_cond = model_output.chunk(2)  # (2B, c, h, w) -> 2 x (B, c, h, w): the batch was [uncond, cond]
return noise_uncond + guidance_scale * (noise_uncond - noise_cond)"""


def _batched_cases(seed):
    return [{"model_output": torch.cat([case["noise_uncond"], case["noise_cond"]]),
             "guidance_scale": case["guidance_scale"]} for case in _guidance_cases(seed)]


def _halves(model_output):
    return model_output.chunk(2)


GUIDED_PREDICTION = Exercise(
    name="guided_prediction", notebook="08_text_to_image",
    task="Debug this: guided_prediction(model_output, guidance_scale) -> ε̂ (B, c, h, w) takes the "
         "backbone's output for the batch [unconditional; conditional] (2B, c, h, w) and returns the guided "
         "prediction. With it, the larger the guidance scale, the less the images look like their prompt: they "
         "avoid it (\"a red circle\" gives anything but a red circle). Find the bug and repair it.",
    source=SOURCE_CFG,
    solution=guided_prediction, cases=_batched_cases, stub=GUIDED_PREDICTION_STUB,
    reference=lambda model_output, guidance_scale: classifier_free_guidance(*model_output.chunk(2), guidance_scale),
    mistakes=(
        Mistake("this is still the code you started from: which way does the difference it scales point, towards "
                "the prompt or away from it?",
                lambda model_output, guidance_scale: _halves(model_output)[0]
                + guidance_scale * (_halves(model_output)[0] - _halves(model_output)[1])),
        Mistake("the halves are swapped: the batch was [unconditional; conditional], so chunk(2) gives ε_u first",
                lambda model_output, guidance_scale: _halves(model_output)[1]
                + guidance_scale * (_halves(model_output)[0] - _halves(model_output)[1])),
        Mistake("that starts from ε_c (scale 1 + s): start from the unconditional prediction, ε̂ = ε_u + s (ε_c - ε_u)",
                lambda model_output, guidance_scale: _halves(model_output)[1]
                + guidance_scale * (_halves(model_output)[1] - _halves(model_output)[0])),
        Mistake("model_output[0] and model_output[1] are the first two samples, not the two halves of the batch: "
                "split it with model_output.chunk(2)",
                lambda model_output, guidance_scale: model_output[0]
                + guidance_scale * (model_output[1] - model_output[0])),
    ),
)


# ---- the tokenizer ---------------------------------------------------------------------------------------------------


def tokenize(prompt, vocab, max_length):
    # BEGIN SOLUTION
    token_to_id = {token: i for i, token in enumerate(vocab)}
    words = split_words(prompt)[: max_length - 2]  # lowercase words and punctuation; room left for <bos> and <eos>
    ids = [token_to_id.get(word, token_to_id["<unk>"]) for word in words]  # an unknown word becomes <unk>
    ids = [token_to_id["<bos>"]] + ids + [token_to_id["<eos>"]]
    ids = ids + [token_to_id["<pad>"]] * (max_length - len(ids))  # padded to max_length
    return torch.tensor(ids, dtype=torch.int64)
    # END SOLUTION


WORDS = ["a", "at", "blue", "bottom", "center", "circle", "green", "in", "large", "left", "red", "right", "small",
         "square", "the", "top", "triangle", "yellow", ":", ","]
PROMPTS = [
    "a small blue square at the top left",  # every word known, room to spare
    "a small purple square",  # an unknown word
    "Top left: a RED circle",  # capitals and punctuation
    "",  # the null condition of classifier-free guidance
    "a large red circle in the center at the bottom left, a small green triangle",  # too long: truncated
    "a mauve hexagon at the top, a small blue circle at the bottom right",  # too long, with unknown words
]


def _tokenize_cases(seed):
    g = torch.Generator().manual_seed(800 + seed)
    vocab = list(SPECIAL_TOKENS) + [WORDS[i] for i in torch.randperm(len(WORDS), generator=g).tolist()]
    return [{"prompt": prompt, "vocab": vocab, "max_length": 12 + seed} for prompt in PROMPTS]


def _mistaken_tokenize(prompt, vocab, max_length, truncate=True, eos_kept=True, pad_before_eos=False, unk=True):
    token_to_id = {token: i for i, token in enumerate(vocab)}
    words = split_words(prompt)
    if truncate and eos_kept:
        words = words[: max_length - 2]
    ids = [token_to_id.get(word, token_to_id["<unk>"]) for word in words if unk or word in token_to_id]
    padding = [token_to_id["<pad>"]] * max(0, max_length - len(ids) - 2)
    if pad_before_eos:
        ids = [token_to_id["<bos>"]] + ids + padding + [token_to_id["<eos>"]]
    else:
        ids = [token_to_id["<bos>"]] + ids + [token_to_id["<eos>"]] + padding
    if truncate and not eos_kept:
        ids = ids[:max_length]
    return torch.tensor(ids, dtype=torch.int64)


TOKENIZE = Exercise(
    name="tokenize", notebook="08_text_to_image",
    task="tokenize(prompt, vocab, max_length) -> ids (max_length,) int64, where vocab is a list of tokens and a "
         "token's id is its position in it (vocab[:4] is <pad>, <unk>, <bos>, <eos>): <bos>, the id of each word of "
         "split_words(prompt) (<unk> for a word not in vocab), <eos>, then <pad> up to max_length; a long prompt "
         "loses its last words, never its <eos>.",
    source="Rombach et al. 2022 (arXiv:2112.10752), section 4.3.1: the prompt is tokenized and encoded by a "
           "transformer τ_θ trained with the UNet (minildm's Tokenizer: word-level, in place of BERT's)",
    solution=tokenize, cases=_tokenize_cases,
    reference=lambda prompt, vocab, max_length: Tokenizer(vocab, max_length)(prompt)[0],
    mistakes=(
        Mistake("a word that is not in the vocabulary becomes <unk>, not nothing: the model should see that a word "
                "was there",
                lambda prompt, vocab, max_length: _mistaken_tokenize(prompt, vocab, max_length, unk=False)),
        Mistake("<pad> goes after <eos>: <eos> closes the prompt, the padding only fills the rest",
                lambda prompt, vocab, max_length: _mistaken_tokenize(prompt, vocab, max_length, pad_before_eos=True)),
        Mistake("a long prompt must be truncated: keep its first max_length - 2 words, then <eos>",
                lambda prompt, vocab, max_length: _mistaken_tokenize(prompt, vocab, max_length, truncate=False)),
        Mistake("truncating cut off <eos>: keep the first max_length - 2 words, so that <bos> and <eos> both fit",
                lambda prompt, vocab, max_length: _mistaken_tokenize(prompt, vocab, max_length, eos_kept=False)),
    ),
)


EXERCISES = [TOKENIZE, CLASSIFIER_FREE_GUIDANCE, GUIDED_PREDICTION]
