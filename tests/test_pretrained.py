"""Stable Diffusion's diffusers folders in minildm's modules (minildm/pretrained.py), on tiny random models.

The models are the real SD 1.5 and SD 2.1 configurations shrunk in width only (tests/sd_tiny.py: 8 heads per level,
1x1-conv projections and norm eps 1e-5 for 1.5; 64-wide heads shrunk to 8, linear projections, upcast attention
and v-prediction for 2.1; SD's VAE with its (0, 1, 0, 1) padding), built and saved by diffusers itself, then
read by minildm and compared with diffusers' own forward passes.
"""

import json
import shutil

import pytest
import torch

from minildm import LatentDiffusion, pretrained
from minildm.autoencoder import AutoencoderConfig, AutoencoderKL
from minildm.samplers import DDIMSampler, DPMSolverMultistepSampler
from minildm.schedule import NoiseSchedule
from minildm.unet import UNet2DConditionModel, UNetConfig

diffusers = pytest.importorskip("diffusers", reason='diffusers is not installed: pip install "minildm[dev]"')
sd_tiny = pytest.importorskip("sd_tiny")


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    models = sd_tiny.write_tiny_sd_folder(path, request.param)
    return request.param, path, models


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unet_inputs(variant, B=2):
    return randn(B, 4, 8, 8), torch.tensor([10, 900][:B]), randn(B, 77, sd_tiny.VARIANTS[variant]["hidden_size"],
                                                                  seed=1)


def test_unet_config_is_read_with_diffusers_meaning(folder):
    variant, path, _ = folder
    config = pretrained.load_unet(path / "unet").config
    assert config.block_out_channels == (32, 64, 128, 128)
    assert config.attention_levels == (True, True, True, False)
    if variant == "sd15":  # diffusers' attention_head_dim=8 is 8 heads: widths 32/8 ... 128/8
        assert config.attention_head_dim == (4, 8, 16, 16)
        assert [config.heads(level) for level in range(4)] == [8, 8, 8, 8]
        assert (config.use_linear_projection, config.upcast_attention) == (False, False)
    else:
        assert config.attention_head_dim == 8
        assert (config.use_linear_projection, config.upcast_attention) == (True, True)
    assert config.norm_eps == 1e-5


def test_unet_matches_diffusers(folder):
    variant, path, models = folder
    unet = pretrained.load_unet(path / "unet")
    x, t, text = unet_inputs(variant)
    with torch.no_grad():
        ours, theirs = unet(x, t, text), models["unet"](x, t, text).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert theirs.abs().max() > 0.1  # a real output, not zeros on both sides


def test_norm_eps_is_what_makes_sd_weights_agree(folder):
    # The same weights with minildm's former fixed eps (1e-6) give another output: the setting is needed. (Latents
    # of small variance, as near t = 0, make the eps visible in the first GroupNorm.)
    variant, path, models = folder
    unet = pretrained.load_unet(path / "unet")
    wrong = UNet2DConditionModel(UNetConfig(**{**vars(unet.config), "norm_eps": 1e-6}))
    wrong.load_state_dict(unet.state_dict())
    x, t, text = unet_inputs(variant)
    x = x * 0.01
    with torch.no_grad():
        theirs = models["unet"](x, t, text).sample
        torch.testing.assert_close(unet(x, t, text), theirs, rtol=0, atol=1e-5)
        assert (wrong.eval()(x, t, text) - theirs).abs().max() > 1e-3


def test_vae_matches_diffusers(folder):
    _, path, models = folder
    vae = pretrained.load_vae(path / "vae")
    assert vae.config.downsample_padding == 0 and vae.scaling_factor == 0.18215
    images = randn(2, 3, 32, 32, seed=2)
    latents = randn(2, 4, 4, 4, seed=3)
    with torch.no_grad():
        ours, theirs = vae.encode(images), models["vae"].encode(images).latent_dist
        torch.testing.assert_close(ours.mean, theirs.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.logvar, theirs.logvar, rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.decode(latents), models["vae"].decode(latents).sample, rtol=0, atol=1e-5)
        # With minildm's symmetric padding the same weights encode differently: the padding is needed.
        symmetric = AutoencoderKL(AutoencoderConfig(**{**vars(vae.config), "downsample_padding": 1}))
        symmetric.load_state_dict(vae.state_dict())
        assert (symmetric.eval().encode(images).mean - theirs.mean).abs().max() > 1e-3


def test_from_pretrained_builds_the_pipeline(folder):
    variant, path, models = folder
    ldm = LatentDiffusion.from_pretrained(path)
    assert ldm.prediction_type == ("v_prediction" if variant == "sd21" else "epsilon")
    assert ldm.image_size == 64  # unet sample_size 8 x the VAE's factor 8
    assert ldm.schedule == NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    assert type(ldm.conditioner).__name__ == "CLIPTextConditioner"
    ids = ldm.conditioner.input_ids(["a photo of an astronaut"])
    with torch.no_grad():
        torch.testing.assert_close(ldm.conditioner(ids), models["text_encoder"](ids).last_hidden_state,
                                   rtol=0, atol=1e-5)
    sampler = pretrained.load_sampler(path, ldm.schedule)
    ldm.check_sampler(sampler)  # built for the model's schedule and prediction type
    images = ldm.generate("a red circle", 2, sampler=sampler, guidance_scale=7.5, height=32, width=32,
                          generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_from_pretrained_in_bfloat16(folder):
    _, path, _ = folder
    ldm = LatentDiffusion.from_pretrained(path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in ldm.parameters()} == {torch.bfloat16}


def test_upcast_attention_computes_in_float32():
    from minildm.attention import Attention

    torch.manual_seed(0)
    plain = Attention(16, 8, heads=2, dim_head=8).to(torch.bfloat16)
    upcast = Attention(16, 8, heads=2, dim_head=8, upcast_attention=True).to(torch.bfloat16)
    upcast.load_state_dict(plain.state_dict())
    x, context = randn(2, 5, 16).bfloat16() * 30, randn(2, 3, 8, seed=1).bfloat16() * 30
    q = upcast.to_q(x).float().view(2, 5, 2, 8).transpose(1, 2)
    k = upcast.to_k(context).float().view(2, 3, 2, 8).transpose(1, 2)
    v = upcast.to_v(context).float().view(2, 3, 2, 8).transpose(1, 2)
    expected = ((q @ k.transpose(-1, -2) / 8**0.5).softmax(-1) @ v).bfloat16().transpose(1, 2).reshape(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(upcast(x, context), upcast.to_out[0](expected), rtol=0, atol=0)
        assert upcast(x, context).dtype == torch.bfloat16


# ---- the scheduler ------------------------------------------------------------------------------------------------

def test_pndm_and_euler_become_ddim_on_the_same_timesteps():
    pndm = pretrained.sampler_from_diffusers(sd_tiny.scheduler_config("sd15"))
    assert isinstance(pndm, DDIMSampler) and (pndm.timestep_spacing, pndm.steps_offset) == ("leading", 1)
    pndm.set_timesteps(50)
    theirs = diffusers.DDIMScheduler.from_config(sd_tiny.scheduler_config("sd15"))
    theirs.set_timesteps(50)
    assert pndm.timesteps.tolist() == theirs.timesteps.tolist()  # 981, 961, ..., 1
    euler = pretrained.sampler_from_diffusers(sd_tiny.scheduler_config("sd21"))
    assert isinstance(euler, DDIMSampler) and euler.set_alpha_to_one and euler.prediction_type == "v_prediction"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_euler_step_is_one_ddim_step(prediction_type):
    # Karras et al. 2022 sec. 4: Euler in σ on x / sqrt(ᾱ) is DDIM. Both loops run on a nonlinear toy model, with
    # integer ("trailing") timesteps where diffusers' Euler and minildm's DDIM visit the same ones.
    config = {**sd_tiny.scheduler_config("sd21"), "prediction_type": prediction_type, "timestep_spacing": "trailing"}
    euler = diffusers.EulerDiscreteScheduler.from_config(config)
    ddim = pretrained.sampler_from_diffusers(config)

    def model(x, t):
        return torch.tanh(x * 0.7 + t / 1000) - 0.3 * x

    noise = randn(2, 4, 4, 4)
    euler.set_timesteps(10)
    # x / sqrt(ᾱ_T) = x sqrt(σ_max² + 1). (diffusers' Euler starts "trailing" and "linspace" runs from σ_max x
    # instead, 0.23% less for SD's schedule: the one place the two runs differ, besides fractional timesteps.)
    x = noise * (euler.sigmas[0] ** 2 + 1) ** 0.5
    for t in euler.timesteps:
        x = euler.step(model(euler.scale_model_input(x, t), t), t, x).prev_sample
    ddim.set_timesteps(10)
    y = noise
    for t in ddim.timesteps:
        y = ddim.step(model(y, t.float()), t, y).prev_sample
    assert ddim.timesteps.tolist() == euler.timesteps.round().long().tolist()
    torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_dpm_solver_config_maps_to_minildm_dpm_solver():
    config = {"_class_name": "DPMSolverMultistepScheduler", **{k: v for k, v in sd_tiny.scheduler_config("sd15").items()
                                                              if k != "_class_name"}, "algorithm_type": "dpmsolver++",
              "solver_order": 2}
    sampler = pretrained.sampler_from_diffusers(config)
    assert isinstance(sampler, DPMSolverMultistepSampler) and sampler.timestep_spacing == "linspace"  # its default
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(config)
    sampler.set_timesteps(20)
    theirs.set_timesteps(20)
    assert sampler.timesteps.tolist() == theirs.timesteps.tolist()
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        pretrained.sampler_from_diffusers({**config, "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="LMSDiscreteScheduler"):
        pretrained.sampler_from_diffusers({**config, "_class_name": "LMSDiscreteScheduler"})


# ---- to_diffusers -------------------------------------------------------------------------------------------------

def small_ldm(use_linear_projection):
    from minildm.text import SPECIAL_TOKENS, TextEncoder, TextEncoderConfig, Tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig(block_out_channels=(32, 64), attention_levels=(True, True),
                                           cross_attention_dim=32, attention_head_dim=(8, 16), norm_eps=1e-5,
                                           use_linear_projection=use_linear_projection))
    vae = AutoencoderKL(AutoencoderConfig(block_out_channels=(32, 32), norm_num_groups=16, downsample_padding=0,
                                          scaling_factor=0.5))
    sd_tiny.randomize_(unet), sd_tiny.randomize_(vae)
    tokenizer = Tokenizer([*SPECIAL_TOKENS, "red", "circle"])
    text = TextEncoder(TextEncoderConfig(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2), tokenizer)
    return LatentDiffusion(vae, unet, NoiseSchedule(), text, "v_prediction", image_size=16)


@pytest.mark.parametrize("use_linear_projection", [True, False])
def test_to_diffusers_round_trip(tmp_path, use_linear_projection):
    ldm = small_ldm(use_linear_projection)
    pretrained.to_diffusers(ldm, tmp_path / "out")
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out", subfolder="vae").eval()
    x, t, text = randn(2, 4, 8, 8), torch.tensor([3, 999]), randn(2, 5, 32, seed=1)
    images = randn(2, 3, 16, 16, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, text).sample, ldm.backbone(x, t, text), rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.encode(images).latent_dist.mean, ldm.first_stage.encode(images).mean,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(vae.decode(x).sample, ldm.first_stage.decode(x), rtol=0, atol=1e-5)
    assert vae.config.scaling_factor == 0.5
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "out", subfolder="scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    # ... and back into minildm, the same tensors
    again = pretrained.load_unet(tmp_path / "out" / "unet")
    assert again.config == ldm.backbone.config
    for name, tensor in ldm.backbone.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_to_diffusers_refuses_what_diffusers_cannot_hold(tmp_path):
    ldm = small_ldm(True)
    ldm.first_stage.config.downsample_padding = 1
    with pytest.raises(ValueError, match="downsample_padding"):
        pretrained.to_diffusers(ldm, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- bad folders --------------------------------------------------------------------------------------------------

def copy_of(folder, tmp_path):
    _, path, _ = folder
    return shutil.copytree(path, tmp_path / "copy")


def edit_json(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("setting, value", [("class_embed_type", "timestep"), ("flip_sin_to_cos", False),
                                            ("freq_shift", 1), ("resnet_time_scale_shift", "scale_shift"),
                                            ("some_future_setting", 3)])
def test_unsupported_unet_settings_are_named(folder, tmp_path, setting, value):
    path = copy_of(folder, tmp_path)
    edit_json(path / "unet" / "config.json", **{setting: value})
    with pytest.raises(ValueError, match=setting):
        pretrained.load_unet(path / "unet")


def test_per_level_flags_must_all_be_off(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    edit_json(path / "unet" / "config.json", only_cross_attention=[False] * 4)
    assert pretrained.load_unet(path / "unet").config.block_out_channels == (32, 64, 128, 128)
    edit_json(path / "unet" / "config.json", only_cross_attention=[True, False, False, False])
    with pytest.raises(ValueError, match="only_cross_attention"):
        pretrained.load_unet(path / "unet")


def test_bad_block_types_and_heads_are_named(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    edit_json(path / "unet" / "config.json", up_block_types=["CrossAttnUpBlock2D"] * 4)
    with pytest.raises(ValueError, match="mirror"):
        pretrained.load_unet(path / "unet")
    edit_json(path / "unet" / "config.json", up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
              attention_head_dim=[3, 8, 8, 8])
    with pytest.raises(ValueError, match="attention_head_dim"):
        pretrained.load_unet(path / "unet")


def test_weights_that_do_not_fit_are_named(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    edit_json(path / "vae" / "config.json", layers_per_block=1)
    with pytest.raises(ValueError, match="unexpected tensors"):
        pretrained.load_vae(path / "vae")


def test_pickled_weights_are_refused(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        pretrained.load_unet(path / "unet")


def test_missing_parts_are_named(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    shutil.rmtree(path / "scheduler")
    with pytest.raises(FileNotFoundError, match="scheduler/"):
        LatentDiffusion.from_pretrained(path)
    (path / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        LatentDiffusion.from_pretrained(path)


def test_legacy_vae_attention_names_load(folder, tmp_path):
    from safetensors.torch import load_file, save_file

    path = copy_of(folder, tmp_path)
    weights = path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v for k, v in state.items()}
    assert legacy.keys() != state.keys()
    save_file(legacy, weights)
    vae = pretrained.load_vae(path / "vae")
    for name, tensor in state.items():
        assert torch.equal(vae.state_dict()[name], tensor), name


def test_the_real_configs_map_to_sd_head_widths():
    sd15 = pretrained.unet_config_from_diffusers(pretrained.SD15_UNET_CONFIG)
    assert sd15.attention_head_dim == (40, 80, 160, 160) and not sd15.use_linear_projection
    sd21 = pretrained.unet_config_from_diffusers(pretrained.SD21_UNET_CONFIG)
    assert sd21.attention_head_dim == 64 and sd21.use_linear_projection and sd21.upcast_attention
    assert pretrained.unet_config_to_diffusers(sd21, 96)["attention_head_dim"] == [5, 10, 20, 20]
    vae = pretrained.autoencoder_config_from_diffusers(pretrained.SD_VAE_CONFIG)
    assert vae.downsampling_factor == 8 and vae.downsample_padding == 0 and vae.scaling_factor == 0.18215


def test_a_loaded_sd_model_saves_and_loads_as_a_minildm_folder(folder, tmp_path):
    variant, path, _ = folder
    ldm = LatentDiffusion.from_pretrained(path)
    ldm.save(tmp_path / "saved")
    again = LatentDiffusion.load(tmp_path / "saved")
    assert again.backbone.config == ldm.backbone.config and again.first_stage.config == ldm.first_stage.config
    x, t, text = unet_inputs(variant)
    with torch.no_grad():
        torch.testing.assert_close(again.backbone(x, t, text), ldm.backbone(x, t, text), rtol=0, atol=0)
        torch.testing.assert_close(again.conditioner.encode(["a red circle"]), ldm.conditioner.encode(["a red circle"]),
                                   rtol=0, atol=0)


def test_a_loaded_sd_model_goes_back_to_a_whole_diffusers_folder(folder, tmp_path):
    variant, path, _ = folder
    ldm = LatentDiffusion.from_pretrained(path)
    pretrained.to_diffusers(ldm, tmp_path / "out")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    ids = ldm.conditioner.input_ids(["a photo of an astronaut", ""])
    assert torch.equal(pipe.tokenizer(["a photo of an astronaut", ""], padding="max_length", max_length=77,
                                      return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, ldm.conditioner(ids), rtol=0, atol=1e-5)
    again = LatentDiffusion.from_pretrained(tmp_path / "out")
    assert again.prediction_type == ldm.prediction_type and again.image_size == ldm.image_size
    for part in ("backbone", "first_stage", "conditioner"):
        for name, tensor in getattr(ldm, part).state_dict().items():
            assert torch.equal(getattr(again, part).state_dict()[name], tensor), name
