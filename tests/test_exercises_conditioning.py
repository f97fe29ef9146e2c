"""The exercises of notebook 13 (conditioning by concatenation and by class), beyond the generic checks of
test_exercises.py: each checker accepts its solution and other correct answers and rejects every listed mistake with
its own hint, and more wrong answers; the solutions are minildm's code (InpaintingCondition, ClassEmbedder)."""


import torch
import torch.nn.functional as F

from minildm import AutoencoderConfig, AutoencoderKL, ClassEmbedder, ClassEmbedderConfig, InpaintingCondition, exercises

NOTEBOOK = "13_conditioning_by_concatenation"
NAMES = exercises.names(NOTEBOOK)


def test_the_notebook_has_its_two_exercises():
    assert NAMES == ["inpainting_input", "class_condition"]

def test_more_wrong_answers_are_rejected(capsys):
    solution = exercises.solution("inpainting_input")

    def without_z_t(noisy_latents, image, mask_image, first_stage):  # the condition alone, not beside z_t
        return solution(noisy_latents, image, mask_image, first_stage)[:, noisy_latents.shape[1]:]

    assert not exercises.check("inpainting_input", without_z_t)
    assert "shape" in capsys.readouterr().out

    def max_pooled_mask(noisy_latents, image, mask_image, first_stage):  # "any masked pixel": not SD's choice
        out = solution(noisy_latents, image, mask_image, first_stage)
        c = noisy_latents.shape[1]
        out[:, c:c + 1] = F.max_pool2d(mask_image, first_stage.downsampling_factor)
        return out

    assert not exercises.check("inpainting_input", max_pooled_mask)
    capsys.readouterr()

    def sampled_latents(noisy_latents, image, mask_image, first_stage):  # a posterior sample, not its mode
        out = solution(noisy_latents, image, mask_image, first_stage)
        c = noisy_latents.shape[1]
        masked = (image * 2 - 1) * (1 - mask_image)
        g = torch.Generator().manual_seed(0)
        out[:, c + 1:] = first_stage.encode(masked).sample(g) * first_stage.scaling_factor
        return out

    assert not exercises.check("inpainting_input", sampled_latents)
    capsys.readouterr()

    def labels_as_rows_always(class_labels, dropped, embedding_weight):  # (B, D): no token axis
        rows = torch.where(dropped, embedding_weight.shape[0] - 1, class_labels)
        return embedding_weight[rows]

    assert not exercises.check("class_condition", labels_as_rows_always)
    assert "shape" in capsys.readouterr().out

    def mean_for_null(class_labels, dropped, embedding_weight):  # the mean class, not the learned null row
        out = embedding_weight[class_labels][:, None].clone()
        out[dropped] = embedding_weight[:-1].mean(0)
        return out

    assert not exercises.check("class_condition", mean_for_null)
    capsys.readouterr()


def test_other_correct_answers_pass():
    def by_interpolate(noisy_latents, image, mask_image, first_stage):
        h, w = noisy_latents.shape[2:]
        small = F.interpolate(mask_image, size=(h, w), mode="nearest")  # diffusers' own call
        masked = (2 * image - 1) * (mask_image < 0.5)  # diffusers' init_image * (mask_condition < 0.5)
        latents = first_stage.encode(masked).mean * first_stage.scaling_factor  # the mode of a Gaussian: its mean
        return torch.cat([noisy_latents, small, latents], dim=1)

    def by_one_hot(class_labels, dropped, embedding_weight):
        rows = class_labels.masked_fill(dropped, embedding_weight.shape[0] - 1)
        one_hot = F.one_hot(rows, embedding_weight.shape[0]).to(embedding_weight.dtype)  # (B, K + 1)
        return (one_hot @ embedding_weight).unsqueeze(1)

    assert exercises.check("inpainting_input", by_interpolate, verbose=False)
    assert exercises.check("class_condition", by_one_hot, verbose=False)


# ---- the solutions are minildm's code ---------------------------------------------------------------------------


def test_the_inpainting_solution_is_minildms_condition_on_a_float32_autoencoder():
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(AutoencoderConfig(3, 4, (8, 8, 8), norm_num_groups=4, scaling_factor=0.3)).eval()
    image = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 3:11, 2:9] = 1
    mask[1, :, 8:, :] = 1
    noisy = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        mine = exercises.solution("inpainting_input")(noisy, image, mask, autoencoder)
    theirs = InpaintingCondition().model_input(autoencoder, (4, 4), image=image, mask_image=mask)
    torch.testing.assert_close(mine, torch.cat([noisy, theirs], dim=1))


def test_the_class_solution_is_minildms_class_embedder():
    embedder = ClassEmbedder(ClassEmbedderConfig(10, 8))
    labels, dropped = torch.tensor([3, 0, 9, 5]), torch.tensor([False, True, False, True])
    mine = exercises.solution("class_condition")(labels, dropped, embedder.embedding.weight.detach())
    theirs = embedder.encode(["3", "", "9", ""]).detach()
    assert torch.equal(mine, theirs)
