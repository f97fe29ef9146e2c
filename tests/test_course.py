"""course.py: the notebooks' shared models, built at the profile's size and reused from artifacts/."""

import torch

from minildm import course
from minildm.data import LabeledImages


def tiny_digits(n=32):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 32, 32, generator=generator) * 2 - 1
    labels = torch.arange(n) % 10
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    captions = [f"a handwritten digit {names[k]}" for k in labels.tolist()]
    return LabeledImages(images, labels, captions, [str(k) for k in range(10)])


def test_pixel_and_latent_models_share_the_unet_design(monkeypatch):
    monkeypatch.setenv("MINILDM_PROFILE", "ci")
    captions = tiny_digits().captions
    pixel = course.mnist_model(None, captions)
    latent = course.mnist_model(course.mnist_autoencoder(4), captions)
    assert pixel.latent_shape() == (1, 32, 32)
    assert latent.latent_shape() == (4, 8, 8)
    assert pixel.backbone.config.block_out_channels == latent.backbone.config.block_out_channels
    assert course.mnist_model(course.mnist_autoencoder(8), captions).latent_shape() == (4, 4, 4)


def test_autoencoder_is_trained_once_then_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILDM_PROFILE", "ci")
    data = tiny_digits()
    first = course.mnist_autoencoder_or_train(data, factor=4, artifacts=tmp_path, minutes=0.02, device="cpu")
    assert (tmp_path / "autoencoder_mnist_f4_ci" / "autoencoder.json").is_file()
    again = course.mnist_autoencoder_or_train(data, factor=4, artifacts=tmp_path, device="cpu")
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert again.scaling_factor == first.scaling_factor


def test_pixel_models_are_trained_once_with_their_history_then_reused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINILDM_PROFILE", "ci")
    data = tiny_digits()
    for train_or_reuse, folder in ((course.mnist_pixel_ldm_or_train, "pixel_ddpm_mnist_ci"),
                                   (course.mnist_pixel_equal_time_or_train, "pixel_mnist_ci")):
        first = train_or_reuse(data, artifacts=tmp_path, device="cpu")
        assert "trained" in capsys.readouterr().out
        assert (tmp_path / folder / "config.json").is_file() and (tmp_path / folder / "history.json").is_file()
        assert first.history["steps"][0] == len(first.history["loss"]) > 0
        again = train_or_reuse(data, artifacts=tmp_path, device="cpu")
        said = capsys.readouterr().out
        assert f"reused {tmp_path / folder}" in said and f"it trained {first.history['steps'][0]} steps" in said
        assert again.history == first.history
        for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), name
    # The working pixel model is the small one sized for pixels; the equal-time one is notebook 06's UNet.
    pixel = course.mnist_pixel_model(data.captions)
    assert pixel.backbone.config.attention_levels == (False, False, True)
    assert pixel.latent_shape() == (1, 32, 32)
    design = course.mnist_model(None, data.captions).backbone.config
    assert again.backbone.config.block_out_channels == design.block_out_channels


def test_notebook_11s_models_are_trained_once_with_their_objective_then_reused(monkeypatch, tmp_path, capsys):
    from minildm import DiTTransformer2DModel, NoiseSchedule

    monkeypatch.setenv("MINILDM_PROFILE", "ci")
    data = tiny_digits()
    course.mnist_autoencoder_or_train(data, factor=4, artifacts=tmp_path, minutes=0.02, device="cpu")
    v = course.mnist_objective_ldm_or_train(data, "v_prediction", rescale_betas_zero_snr=True, artifacts=tmp_path,
                                            device="cpu")
    assert "trained the v_prediction model on the scaled_linear schedule rescaled to zero terminal SNR" in \
        capsys.readouterr().out
    assert v.prediction_type == "v_prediction" and v.schedule == NoiseSchedule(rescale_betas_zero_snr=True)
    assert v.schedule.alphas_cumprod[-1] == 0
    eps = course.mnist_objective_ldm_or_train(data, artifacts=tmp_path, device="cpu")
    assert eps.prediction_type == "epsilon" and eps.schedule == NoiseSchedule()
    dit = course.mnist_dit_ldm_or_train(data, artifacts=tmp_path, device="cpu")
    assert isinstance(dit.backbone, DiTTransformer2DModel) and dit.schedule == NoiseSchedule()
    assert dit.latent_shape() == eps.latent_shape() == (4, 8, 8)
    capsys.readouterr()
    for model, folder, again in ((v, "ldm_mnist_v_prediction_zero_snr_ci", lambda: course.mnist_objective_ldm_or_train(
            data, "v_prediction", rescale_betas_zero_snr=True, artifacts=tmp_path, device="cpu")),
            (eps, "ldm_mnist_epsilon_scaled_linear_ci", lambda: course.mnist_objective_ldm_or_train(
                data, artifacts=tmp_path, device="cpu")),
            (dit, "ldm_mnist_dit_ci", lambda: course.mnist_dit_ldm_or_train(data, artifacts=tmp_path, device="cpu"))):
        reused = again()
        assert f"reused {tmp_path / folder}" in capsys.readouterr().out
        assert reused.history == model.history and reused.prediction_type == model.prediction_type
        for (name, a), (_, b) in zip(model.state_dict().items(), reused.state_dict().items()):
            assert torch.equal(a, b), name


def test_the_latent_flow_is_notebook_06s_model_as_a_flow_trained_once_then_reused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINILDM_PROFILE", "ci")
    data = tiny_digits()
    course.mnist_autoencoder_or_train(data, factor=4, artifacts=tmp_path, minutes=0.02, device="cpu")  # reused below
    capsys.readouterr()
    first = course.mnist_flow_or_train(data, artifacts=tmp_path, device="cpu")
    said = capsys.readouterr().out
    assert "reused" in said and "trained the latent flow" in said  # the autoencoder reused, the flow trained
    folder = tmp_path / "flow_mnist_ci"
    assert (folder / "config.json").is_file() and (folder / "history.json").is_file()
    assert first.is_flow and first.prediction_type == "flow_prediction" and first.latent_shape() == (4, 8, 8)
    assert first.history["steps"][0] == len(first.history["loss"]) > 0
    design = course.mnist_model(course.mnist_autoencoder(4), data.captions)
    assert first.backbone.config == design.backbone.config
    assert first.conditioner.config == design.conditioner.config
    again = course.mnist_flow_or_train(data, artifacts=tmp_path, device="cpu")
    assert f"reused {folder}" in capsys.readouterr().out
    assert again.is_flow and again.history == first.history
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    images = again.generate(data.captions[:2], 2, sampler=again.make_sampler("heun"),
                            generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 32, 32)
