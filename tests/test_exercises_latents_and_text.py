"""The exercises of notebooks 02, 06 and 08 against minildm's own code, where the checker's reference is the
solution: the posterior's sample and KL, the scaling factor, z_0 = s · E(x), guidance, the tokenizer; and the
"debug this" stubs are the bugs their tasks describe."""

import inspect

import torch
from conftest import CAPTIONS

from minildm import exercises
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.exercises.student import strip_solutions
from minildm.text import Tokenizer, split_words


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _tiny_autoencoder(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4)).eval()


def _images(shape=(5, 3, 8, 12), seed=1):
    return torch.rand(shape, generator=_generator(seed)) * 2 - 1  # in [-1, 1]


# ---- notebook 02 ---------------------------------------------------------------------------------------------------


def test_reparameterize_gives_the_posteriors_own_sample():
    autoencoder = _tiny_autoencoder()
    with torch.no_grad():
        posterior = autoencoder.encode(_images())
        sample = posterior.sample(_generator(7))
    noise = torch.randn(posterior.mean.shape, generator=_generator(7))  # the noise sample() draws
    mine = exercises.solution("reparameterize")(posterior.mean, posterior.logvar, noise)
    torch.testing.assert_close(mine, sample)


def test_kl_divergence_is_torch_distributions_kl_summed_per_image():
    mean = torch.randn(3, 4, 5, 2, dtype=torch.float64)
    logvar = torch.randn(3, 4, 5, 2, dtype=torch.float64)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, prior).sum(dim=(1, 2, 3))
    torch.testing.assert_close(exercises.solution("kl_divergence")(mean, logvar), expected)


def test_scale_latents_uses_estimate_scaling_factors_factor():
    autoencoder = _tiny_autoencoder()
    images = _images((6, 3, 8, 8))
    scaling_factor = autoencoder.estimate_scaling_factor(images, generator=_generator(3))
    with torch.no_grad():
        latents = autoencoder.encode(images).sample(_generator(3))  # the same posterior samples
    scaled = exercises.solution("scale_latents")(latents)
    torch.testing.assert_close(scaled, scaling_factor * latents)
    assert abs(scaled.std().item() - 1) < 1e-5


# ---- notebook 06 ---------------------------------------------------------------------------------------------------


def test_encode_to_latents_is_encode_images(tiny_ldm):
    tiny_ldm.first_stage.config.scaling_factor = 0.3
    images = _images((3, 3, 16, 16))
    latents = tiny_ldm.encode_images(images, generator=_generator(5))
    with torch.no_grad():
        posterior = tiny_ldm.first_stage.encode(images)
    noise = torch.randn(posterior.mean.shape, generator=_generator(5))  # the noise encode_images draws
    mine = exercises.solution("encode_to_latents")(posterior.mean, posterior.std, noise, 0.3)
    torch.testing.assert_close(mine, latents)


def test_decode_latents_and_latents_to_uint8_agree_with_the_ldm(tiny_ldm):
    tiny_ldm.first_stage.config.scaling_factor = 0.4
    latents = torch.randn(3, 4, 4, 4, generator=_generator(6))
    expected = tiny_ldm.decode_latents(latents)  # (B, C, H, W) in [0, 1]
    with torch.no_grad():
        mine = exercises.solution("decode_latents")(latents, 0.4, tiny_ldm.first_stage.decode)
        pictures = exercises.solution("latents_to_uint8")(latents, 0.4, tiny_ldm.first_stage.decode)
    torch.testing.assert_close(mine, expected)
    assert pictures.dtype == torch.uint8 and pictures.shape == (3, 16, 16, 3)
    levels = (expected * 255).round().permute(0, 2, 3, 1)
    assert (pictures.float() - levels).abs().max() <= 1  # float32 rounding may move a level by one


def test_the_decoding_cases_leave_the_global_random_state_alone():
    state = torch.get_rng_state()
    for name in ("decode_latents", "latents_to_uint8"):
        exercises.EXERCISES[name].cases(1)
    assert torch.equal(torch.get_rng_state(), state)


# ---- notebook 08 ---------------------------------------------------------------------------------------------------


def test_guidance_is_guided_model_output(tiny_ldm):
    latents = torch.randn(2, 4, 4, 4, generator=_generator(8))
    t = torch.tensor(500)
    with torch.no_grad():
        cond = tiny_ldm.conditioner.encode(["a large red circle at the top left", "a small blue square"])
        uncond = tiny_ldm.conditioner.encode(["", ""])
        both = tiny_ldm.backbone(torch.cat([latents, latents]), t, torch.cat([uncond, cond]))  # (2B, c, h, w)
        for scale in (0.0, 1.0, 3.0, 7.5):
            expected = tiny_ldm.guided_model_output(latents, t, cond, uncond, scale)
            noise_uncond, noise_cond = both.chunk(2)
            torch.testing.assert_close(exercises.solution("classifier_free_guidance")(noise_uncond, noise_cond, scale),
                                       expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(exercises.solution("guided_prediction")(both, scale), expected,
                                       rtol=1e-4, atol=1e-5)


def test_tokenize_is_the_tokenizer_for_every_length():
    tokenizer = Tokenizer.from_captions(CAPTIONS)
    prompts = [*CAPTIONS, "", "A LARGE purple circle, top left: at the bottom right", "a a a a a a a a a a a a a a"]
    for max_length in range(3, 20):
        reference = Tokenizer(tokenizer.vocab, max_length)
        for prompt in prompts:
            mine = exercises.solution("tokenize")(prompt, tokenizer.vocab, max_length)
            assert mine.dtype == torch.int64
            assert torch.equal(mine, reference(prompt)[0]), (prompt, max_length)


def test_the_debug_stubs_are_the_bug_their_task_describes(capsys):
    for name in ("latents_to_uint8", "guided_prediction"):
        exercise = exercises.EXERCISES[name]
        student = strip_solutions(inspect.getsource(exercise.solution), {name: exercise.stub})
        namespace = {"torch": torch}
        exec(student, namespace)  # the cell a student starts from
        assert not exercises.check(name, namespace[name])
        assert exercise.mistakes[0].hint in capsys.readouterr().out


# ---- other correct answers pass ----------------------------------------------------------------------------------


def _tokenize_by_index(prompt, vocab, max_length):
    ids = torch.zeros(max_length, dtype=torch.long)  # <pad> is id 0
    words = ["<bos>"] + [w if w in vocab else "<unk>" for w in split_words(prompt)][: max_length - 2] + ["<eos>"]
    ids[: len(words)] = torch.tensor([vocab.index(w) for w in words])
    return ids


OTHER_CORRECT_ANSWERS = {
    "reparameterize": lambda mean, logvar, noise: mean + torch.sqrt(torch.exp(logvar)) * noise,
    "kl_divergence": lambda mean, logvar: -0.5 * torch.sum(1 + logvar - mean.pow(2) - logvar.exp(), dim=[1, 2, 3]),
    "scale_latents": lambda latents: latents / ((latents - latents.mean()) ** 2).mean().sqrt(),  # the paper's ÷ N
    "encode_to_latents": lambda mean, std, noise, scaling_factor: mean * scaling_factor + std * noise * scaling_factor,
    "decode_latents": lambda latents, scaling_factor, decoder: torch.clamp(
        decoder(latents * (1 / scaling_factor)) * 0.5 + 0.5, 0, 1),
    "latents_to_uint8": lambda latents, scaling_factor, decoder: torch.clamp(
        decoder(latents * (1 / scaling_factor)) * 127.5 + 127.5, 0, 255).round().byte().permute(0, 2, 3, 1),
    "classifier_free_guidance": lambda noise_uncond, noise_cond, guidance_scale: (1 - guidance_scale) * noise_uncond
    + guidance_scale * noise_cond,  # eq. (6)'s own form, (1 + w) ε_c - w ε_u
    "guided_prediction": lambda model_output, guidance_scale: guidance_scale * model_output[len(model_output) // 2:]
    + (1 - guidance_scale) * model_output[: len(model_output) // 2],
    "tokenize": _tokenize_by_index,
}


def test_other_correct_answers_pass(capsys):
    for name, answer in OTHER_CORRECT_ANSWERS.items():
        assert exercises.check(name, answer), capsys.readouterr().out
