"""LatentDiffusion.generate: samplers passed as objects, any number of steps, latents=, height/width, chunks,
words the model cannot use, and the sampler interface (init_noise_sigma, scale_model_input, float timesteps,
two model calls per step, state reset) exercised with the test doubles of doubles.py."""

import warnings

import pytest
import torch
from conftest import CAPTIONS, make_tiny_ldm
from doubles import CountConditioner, HeunLikeSampler, TrueNoiseBackbone

from minildm.ldm import LatentDiffusion
from minildm.samplers import DDIMSampler, DDPMSampler
from minildm.schedule import NoiseSchedule

T = 1000


def perfect_pixel_model(x0: torch.Tensor, schedule=None) -> LatentDiffusion:
    """Pixel space, a backbone that predicts the true noise of x0 (1, 3, h, w) in [-1, 1]."""
    schedule = schedule if schedule is not None else NoiseSchedule()
    backbone = TrueNoiseBackbone(x0, schedule.alphas_cumprod)
    return LatentDiffusion(None, backbone, schedule, CountConditioner(), image_size=x0.shape[-1]).eval()


def clean_sample(h=8, w=8, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8  # inside (-1, 1)


# ---- fault 1: every number of steps works, and the sampler's settings are reachable ---------------------------


def test_default_sampler_takes_every_number_of_steps():
    # The default used to be "leading" with steps_offset=1: n = 1000 raised (timestep 1000), n = 1 visited t = 1.
    sampler = make_tiny_ldm().make_sampler()
    for n in range(1, T + 1):
        sampler.set_timesteps(n)
        visited = sampler.timesteps.tolist()
        assert len(visited) == n and visited[0] == T - 1 and visited[-1] >= 0
        assert all(a > b for a, b in zip(visited, visited[1:]))


def test_thousand_ddim_steps_through_generate_visit_999_to_0():
    ldm = make_tiny_ldm()
    out = ldm.generate(CAPTIONS[:1], 1000, guidance_scale=1.0, return_intermediates=True,
                       generator=torch.Generator().manual_seed(0))
    assert out.timesteps == list(range(999, -1, -1))
    assert torch.isfinite(out.images).all()


def test_one_trailing_ddim_step_with_alpha_to_one_returns_x0_exactly():
    # In float64, so that "exactly" means to the rounding of the float32 images that come back.
    x0 = clean_sample().double()
    ldm = perfect_pixel_model(x0).double()
    sampler = DDIMSampler(ldm.schedule, timestep_spacing="trailing", set_alpha_to_one=True)
    images = ldm.generate(["a b"], 1, sampler=sampler, guidance_scale=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(images, ((x0 + 1) / 2).float(), rtol=0, atol=1e-7)
    assert [int(t) for t in ldm.backbone.timesteps_seen] == [999]  # from the noisiest step, in one jump


def test_default_sampler_with_one_step_leaves_no_noise():
    # The old default visited only t = 1 and returned its starting noise almost unchanged.
    x0 = clean_sample(seed=1).double()
    ldm = perfect_pixel_model(x0).double()
    images = ldm.generate(["a b"], 1, guidance_scale=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(images, ((x0 + 1) / 2).float(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_every_sampler_recovers_x0_from_a_perfect_model(name):
    x0 = clean_sample(seed=2)
    ldm = perfect_pixel_model(x0)
    images = ldm.generate(["a b", "c"], 20, sampler=ldm.make_sampler(name), guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(images, ((x0 + 1) / 2).expand(2, -1, -1, -1), rtol=0, atol=1e-5)


def test_generate_calls_set_timesteps_and_uses_the_samplers_settings():
    ldm = make_tiny_ldm()
    sampler = ldm.make_sampler("ddim", timestep_spacing="leading", steps_offset=0)
    out = ldm.generate(CAPTIONS[:1], 4, sampler=sampler, return_intermediates=True)
    assert out.timesteps == [750, 500, 250, 0] == sampler.timesteps.tolist()


def test_samplers_built_for_another_model_are_refused():
    ldm = make_tiny_ldm()
    with pytest.raises(ValueError, match="prediction_type='v_prediction' but this model predicts 'epsilon'"):
        ldm.generate(CAPTIONS[:1], 2, sampler=DDIMSampler(ldm.schedule, prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="another noise schedule"):
        ldm.generate(CAPTIONS[:1], 2, sampler=DDPMSampler(NoiseSchedule("linear")))
    with pytest.raises(TypeError, match=r"make_sampler\('ddpm'\)"):
        ldm.generate(CAPTIONS[:1], 2, sampler="ddpm")
    with pytest.raises(TypeError, match="Sampler slot.*has no timesteps, init_noise_sigma"):
        ldm.generate(CAPTIONS[:1], 2, sampler=object())
    with pytest.raises(ValueError, match="num_inference_steps must be an integer between 1 and 1000"):
        ldm.generate(CAPTIONS[:1], 1001)


# ---- the sampler interface: what later samplers need ------------------------------------------------------------


def test_a_sigma_space_sampler_with_two_calls_per_step_runs_through_generate():
    # init_noise_sigma, scale_model_input, float timesteps, order 2 and state reset, end to end: with a perfect
    # model, Heun in σ lands on x_0. Any of them mishandled (noise not scaled, model input not scaled, a call
    # skipped or repeated) lands elsewhere.
    x0 = clean_sample(seed=3)
    ldm = perfect_pixel_model(x0)
    sampler = HeunLikeSampler(ldm.schedule)
    out = ldm.generate(["a b", "c", "d e"], 5, sampler=sampler, guidance_scale=1.0, max_batch_size=2,
                       generator=torch.Generator().manual_seed(6), return_intermediates=True)
    torch.testing.assert_close(out.images, ((x0 + 1) / 2).expand(3, -1, -1, -1), rtol=0, atol=1e-5)
    assert sampler.set_timesteps_calls == 1 + 2  # generate's argument check, then once per chunk: state reset
    assert len(out.timesteps) == 9 and out.timesteps == sampler.timesteps.tolist()  # 2 * 5 - 1 model calls
    assert isinstance(out.timesteps[1], float) and out.timesteps[1] == out.timesteps[2]
    assert [float(t) for t in ldm.backbone.timesteps_seen] == sampler.timesteps.tolist() * 2  # two chunks
    assert sampler.scaled_at == sampler.timesteps.tolist() * 2  # every model call sees a scaled input
    # The first model input is the starting noise times init_noise_sigma, then scaled back to unit variance.
    first = ldm.backbone.inputs_seen[0]
    assert 0.9 < first.std() < 1.1


def test_guidance_and_the_sampler_see_the_scaled_latents_only_through_the_interface():
    x0 = clean_sample(seed=4)
    ldm = perfect_pixel_model(x0)
    images = ldm.generate(["a b"], 4, sampler=HeunLikeSampler(ldm.schedule), guidance_scale=3.0,
                          generator=torch.Generator().manual_seed(7))
    # A perfect model predicts the same ε with or without the prompt, so guidance changes nothing.
    torch.testing.assert_close(images, (x0 + 1) / 2, rtol=0, atol=1e-5)


# ---- latents=, height and width, chunks ------------------------------------------------------------------------


def test_latents_argument_is_the_starting_noise():
    ldm = make_tiny_ldm()
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    drawn = ldm.generate(CAPTIONS[:2], 3, generator=torch.Generator().manual_seed(8))
    given = ldm.generate(CAPTIONS[:2], 3, latents=noise.clone())
    assert torch.equal(drawn, given)
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, 4, 4\)"):
        ldm.generate(CAPTIONS[:2], 3, latents=torch.randn(3, 4, 4, 4))
    with pytest.raises(TypeError, match="latents"):
        ldm.generate(CAPTIONS[:2], 3, latents=torch.zeros(2, 4, 4, 4, dtype=torch.long))


def test_height_and_width_any_multiple_of_the_first_stages_factor():
    ldm = make_tiny_ldm()  # f = 4, a two-level UNet
    images = ldm.generate(CAPTIONS[:2], 2, height=24, width=12, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 24, 12)  # 6 x 3 latents: the UNet halves 3 to 2 and comes back to 3
    from_latents = ldm.generate(CAPTIONS[:1], 2, latents=torch.randn(1, 4, 5, 7))
    assert from_latents.shape == (1, 3, 20, 28)
    for bad in ({"height": 18}, {"width": 0}, {"height": 16.0}):
        with pytest.raises(ValueError, match="multiple of the first stage's factor f=4"):
            ldm.generate(CAPTIONS[:1], 2, **bad)


def test_mnist_sized_images_with_an_f4_autoencoder():
    # 28 px with f = 4 gives 7x7 latents, which a two-level UNet used to refuse.
    from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
    from minildm.text import TextEncoder
    from minildm.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(AutoencoderConfig(in_channels=1, block_out_channels=(8, 16, 16), norm_num_groups=4))
    text = TextEncoder.from_captions(["a handwritten seven"], hidden_size=16, num_layers=1, num_heads=2)
    unet = UNet2DConditionModel(UNetConfig(block_out_channels=(16, 16), cross_attention_dim=16, attention_head_dim=8,
                                           norm_num_groups=4))
    ldm = LatentDiffusion(autoencoder, unet, NoiseSchedule(), text, image_size=28).eval()
    assert ldm.latent_shape() == (4, 7, 7)
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    assert torch.isfinite(ldm.training_loss(images, ["a handwritten seven"] * 2))
    assert ldm.generate(["a handwritten seven"], 2).shape == (1, 1, 28, 28)


def test_chunks_equal_one_batch():
    ldm = make_tiny_ldm()
    prompts = [CAPTIONS[i % 3] for i in range(5)]
    whole = ldm.generate(prompts, 3, generator=torch.Generator().manual_seed(9), return_intermediates=True)
    chunked = ldm.generate(prompts, 3, generator=torch.Generator().manual_seed(9), max_batch_size=2,
                           return_intermediates=True)
    torch.testing.assert_close(chunked.images, whole.images, rtol=0, atol=1e-5)
    assert chunked.latents.shape == whole.latents.shape == (4, 5, 4, 4, 4)
    assert chunked.timesteps == whole.timesteps


# ---- fault 3: what the model cannot use is said --------------------------------------------------------------


def test_words_the_model_cannot_use_are_named_once_per_call():
    ldm = make_tiny_ldm()  # max_length 10: <bos>, 8 words, <eos>
    long_prompt = "a large red circle at the top left a small blue square"  # 12 words: 4 cut off
    with pytest.warns(UserWarning) as record:
        ldm.generate([long_prompt, "a purple circle", long_prompt], 2, max_batch_size=1)
    assert len(record) == 1
    message = str(record[0].message)
    assert "past the limit of 10 tokens: 'a', 'small', 'blue', 'square'" in message
    assert "not in the vocabulary: 'purple'" in message
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ldm.generate(CAPTIONS, 2)  # every word known and within the limit: silent


def test_tokenizer_reports_what_it_drops():
    tokenizer = make_tiny_ldm().conditioner.tokenizer
    words = "top left : a green triangle a red circle a blue".split()
    assert tokenizer.tokenize(" ".join(words))[1:-1] == words[:8]  # the 8 that fit
    assert tokenizer.ignored_words(" ".join(words)) == {"past the limit of 10 tokens": ["circle", "a", "blue"]}
    assert tokenizer.ignored_words("a violet circle") == {"not in the vocabulary": ["violet"]}
    assert tokenizer.ignored_words(CAPTIONS[0]) == {}
