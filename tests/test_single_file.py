"""Original single-file SD checkpoints (minildm/single_file.py), checked against diffusers' own conversion.

A tiny SD 1.5- or 2.1-shaped diffusers folder (tests/sd_tiny.py) is read into minildm and written as one
CompVis-layout .safetensors file by minildm; diffusers' conversion functions must turn that file back into
exactly the tensors diffusers started from, diffusers' from_single_file (with the folder as its local config)
must give the same outputs, and minildm must read the file back to the same model.
"""

import pytest
import torch
from safetensors.torch import load_file

from minildm import LatentDiffusion, single_file

diffusers = pytest.importorskip("diffusers", reason='diffusers is not installed: pip install "minildm[dev]"')
sd_tiny = pytest.importorskip("sd_tiny")
from diffusers.loaders import single_file_utils  # noqa: E402


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    models = sd_tiny.write_tiny_sd_folder(path / "folder", request.param)
    ldm = LatentDiffusion.from_pretrained(path / "folder")
    single_file.save_single_file(ldm, path / "model.safetensors")
    return request.param, path, models, ldm


def assert_same_tensors(ours: dict, theirs: dict):
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_diffusers_conversion_gives_back_the_unet_and_vae(checkpoint):
    _, path, models, _ = checkpoint
    state = load_file(path / "model.safetensors")
    unet = single_file_utils.convert_ldm_unet_checkpoint(state, dict(models["unet"].config))
    assert_same_tensors(unet, models["unet"].state_dict())
    vae = single_file_utils.convert_ldm_vae_checkpoint(state, dict(models["vae"].config))
    assert_same_tensors(vae, models["vae"].state_dict())
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # CompVis' 1x1 convolutions


def test_diffusers_conversion_gives_back_the_text_encoder(checkpoint):
    variant, path, models, _ = checkpoint
    state = load_file(path / "model.safetensors")
    expected = {k if k.startswith("text_model.") else f"text_model.{k}": v
                for k, v in models["text_encoder"].state_dict().items() if not k.endswith("position_ids")}
    if variant == "sd15":
        text = single_file_utils.convert_ldm_clip_checkpoint(state)
        assert single_file.sd_version(state) == 1
    else:  # OpenCLIP: 24 resblocks in the file; diffusers drops the last (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in state
        text = single_file_utils.convert_open_clip_checkpoint(models["text_encoder"], state)
        assert single_file.sd_version(state) == 2
    assert_same_tensors(text, expected)


def test_diffusers_from_single_file_agrees(checkpoint):
    variant, path, models, _ = checkpoint
    unet = diffusers.UNet2DConditionModel.from_single_file(path / "model.safetensors", config=str(path / "folder"),
                                                           subfolder="unet", local_files_only=True).eval()
    vae = diffusers.AutoencoderKL.from_single_file(path / "model.safetensors", config=str(path / "folder"),
                                                   subfolder="vae", local_files_only=True).eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 800])
    text = torch.randn(2, 77, sd_tiny.VARIANTS[variant]["hidden_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, text).sample, models["unet"](x, t, text).sample, rtol=0, atol=0)
        torch.testing.assert_close(vae.decode(x[:1, :, :4, :4]).sample, models["vae"].decode(x[:1, :, :4, :4]).sample,
                                   rtol=0, atol=0)


def test_minildm_reads_the_file_back(checkpoint):
    variant, path, _, ldm = checkpoint
    again = single_file.load_single_file(LatentDiffusion, path / "model.safetensors", config=path / "folder")
    assert again.prediction_type == ldm.prediction_type and again.image_size == ldm.image_size
    for part in ("backbone", "first_stage", "conditioner"):
        assert_same_tensors(getattr(again, part).state_dict(), getattr(ldm, part).state_dict())


def test_shapes_and_sd_defaults_describe_the_file_without_a_config(checkpoint):
    # Without a diffusers folder: the configs come from the shapes and SD's settings (8 heads per level for 1.x;
    # the tiny 2.1's heads are 8 wide, not SD's 64, so they are given), the tokenizer from its folder.
    variant, path, _, ldm = checkpoint
    state = load_file(path / "model.safetensors")
    head_dim = None if variant == "sd15" else 8
    assert single_file.unet_config_from_checkpoint(state, attention_head_dim=head_dim) == ldm.backbone.config
    assert single_file.autoencoder_config_from_checkpoint(state) == ldm.first_stage.config
    if variant == "sd21":  # v-prediction is guessed for SD 2.x, as diffusers guesses it
        again = single_file.load_single_file(LatentDiffusion, path / "model.safetensors",
                                             tokenizer=path / "folder" / "tokenizer", attention_head_dim=8)
        assert again.prediction_type == "v_prediction"
        assert again.conditioner.text_encoder.config.num_hidden_layers == 23
        given = single_file.load_single_file(LatentDiffusion, path / "model.safetensors", version=1,
                                             tokenizer=path / "folder" / "tokenizer", attention_head_dim=8)
        assert given.prediction_type == "epsilon" and not given.backbone.config.upcast_attention
        with pytest.raises(ValueError, match="version"):
            single_file.load_single_file(LatentDiffusion, path / "model.safetensors", version=3)


def test_pickles_and_other_files_are_refused(tmp_path, checkpoint):
    _, path, _, _ = checkpoint
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="pickle"):
        single_file.load_single_file(LatentDiffusion, tmp_path / "model.ckpt")
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="model.diffusion_model"):
        single_file.load_single_file(LatentDiffusion, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="tokenizer"):
        single_file.load_single_file(LatentDiffusion, path / "model.safetensors", attention_head_dim=8)


def test_what_original_files_carry_besides_the_model_is_passed_over(checkpoint, tmp_path):
    # The schedule's buffers, EMA bookkeeping and the autoencoder's training loss sit in many original files; a tensor
    # the UNet has no place for is refused by name.
    from safetensors.torch import save_file

    _, path, _, ldm = checkpoint
    state = load_file(path / "model.safetensors")
    extra = {"betas": torch.zeros(1000), "model_ema.decay": torch.ones(()), "first_stage_model.loss.logvar":
             torch.zeros(())}
    save_file({**state, **extra}, tmp_path / "full.safetensors")
    again = single_file.load_single_file(LatentDiffusion, tmp_path / "full.safetensors", config=path / "folder")
    assert_same_tensors(again.backbone.state_dict(), ldm.backbone.state_dict())
    save_file({**state, "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="label_emb"):
        single_file.load_single_file(LatentDiffusion, tmp_path / "bad.safetensors", config=path / "folder")
