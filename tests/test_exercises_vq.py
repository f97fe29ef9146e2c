"""The exercises of notebook 12 (the VQ autoencoder), beyond the generic checks of test_exercises.py: each checker
accepts its solution and other correct answers and rejects every listed mistake with its hint, and more wrong
answers; the solutions are minildm's VectorQuantizer (its lookup, straight-through output and loss terms, values
and gradients); the notebook's exercises go through otter's format."""

import json
from pathlib import Path

import pytest
import torch

from minildm import exercises
from minildm.exercises.otter import otter_master
from minildm.vq import VectorQuantizer

NOTEBOOK = "12_vq_autoencoder"
NAMES = exercises.names(NOTEBOOK)
NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_the_notebook_has_its_three_exercises():
    assert NAMES == ["nearest_code", "straight_through", "vq_loss"]

# ---- more wrong answers, and other right ones ---------------------------------------------------------------------


def test_more_wrong_answers_are_rejected(capsys):
    def one_hot_codes(z, codebook):  # the codes instead of their indices
        indices = exercises.solution("nearest_code")(z, codebook)
        return codebook[indices].permute(0, 3, 1, 2)

    assert not exercises.check("nearest_code", one_hot_codes)
    assert "✗ nearest_code" in capsys.readouterr().out

    def l1_distance(z, codebook):  # the nearest code in |.|_1, not in squared Euclidean distance
        B, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        return torch.cdist(flat, codebook, p=1).argmin(1).view(B, h, w)

    assert not exercises.check("nearest_code", l1_distance)
    capsys.readouterr()

    def detached_everything(z, codebook):  # right value, no gradient anywhere
        return exercises.solution("straight_through")(z, codebook).detach()

    assert not exercises.check("straight_through", detached_everything)
    assert "✗ straight_through" in capsys.readouterr().out

    def halved_gradient(z, codebook):  # right value, half the gradient
        q = exercises.solution("straight_through")(z, codebook)
        return q.detach() + 0.5 * (z - z.detach())

    assert not exercises.check("straight_through", halved_gradient)
    capsys.readouterr()

    def codebook_term_only(z, codebook, beta):
        return exercises.solution("vq_loss")(z, codebook, 0.0)

    assert not exercises.check("vq_loss", codebook_term_only)
    capsys.readouterr()

    def returns_two_terms(z, codebook, beta):
        loss = exercises.solution("vq_loss")
        return loss(z, codebook, 0.0), loss(z, codebook, beta) - loss(z, codebook, 0.0)

    assert not exercises.check("vq_loss", returns_two_terms)
    capsys.readouterr()


def test_other_correct_answers_pass():
    def expanded_distance(z, codebook):  # ||z||² - 2 z·e + ||e||², as minildm computes it
        B, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.T + codebook.pow(2).sum(1)
        return distances.argmin(1).view(B, h, w)

    assert exercises.check("nearest_code", expanded_distance, verbose=False)

    def broadcast_distance(z, codebook):  # the (B, K, h, w) differences, no flattening
        return (z[:, None] - codebook[None, :, :, None, None]).pow(2).sum(2).argmin(1)

    assert exercises.check("nearest_code", broadcast_distance, verbose=False)

    def codes_plus_gradient_of_z(z, codebook):  # the same estimator, written the other way round
        B, c, h, w = z.shape
        indices = expanded_distance(z, codebook)
        codes = codebook[indices].permute(0, 3, 1, 2)
        return codes.detach() + z - z.detach()

    assert exercises.check("straight_through", codes_plus_gradient_of_z, verbose=False)

    def mse_loss(z, codebook, beta):
        import torch.nn.functional as F

        codes = codebook[expanded_distance(z, codebook)].permute(0, 3, 1, 2)
        return F.mse_loss(codes, z.detach()) + beta * F.mse_loss(z, codes.detach())

    assert exercises.check("vq_loss", mse_loss, verbose=False)


# ---- the solutions are minildm's -----------------------------------------------------------------------------------


def test_the_solutions_are_minildms_vector_quantizer_values_and_gradients():
    codebook = _randn(9, 4, seed=1) * torch.linspace(0.5, 2, 9)[:, None]
    z = _randn(2, 4, 3, 5, seed=2)
    quantizer = VectorQuantizer(9, 4)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(codebook)
    assert torch.equal(exercises.solution("nearest_code")(z, codebook), quantizer(z).indices)
    theirs_z, ours_z = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    ours_codebook = torch.nn.Parameter(codebook.clone())
    out = quantizer(theirs_z)
    loss = out.codebook_loss + 0.25 * out.commitment_loss + (out.quantized ** 3).sum()
    loss.backward()
    solution = (exercises.solution("vq_loss")(ours_z, ours_codebook, 0.25)
                + (exercises.solution("straight_through")(ours_z, ours_codebook) ** 3).sum())
    solution.backward()
    assert solution.item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(ours_z.grad, theirs_z.grad, atol=1e-6)
    assert torch.allclose(ours_codebook.grad, quantizer.embedding.weight.grad, atol=1e-6)


# ---- the notebook -----------------------------------------------------------------------------------------------


def test_otter_master_fences_the_notebooks_exercises():
    notebook = json.loads((NOTEBOOKS / f"{NOTEBOOK}.ipynb").read_text())
    master = otter_master(notebook, NOTEBOOK)
    cells, names = master["cells"], []
    for i, cell in enumerate(cells):
        text = "".join(cell["source"])
        if cell["cell_type"] == "raw" and text.startswith("# BEGIN QUESTION"):
            names.append(text.split("\n")[1].removeprefix("name: "))
            task = "".join(cells[i + 1]["source"])
            assert cells[i + 1]["cell_type"] == "markdown" and f"`{names[-1]}`" in task, task
    assert names == NAMES


def test_the_notebook_ends_with_what_we_learned_after_its_last_picture():
    cells = json.loads((NOTEBOOKS / f"{NOTEBOOK}.ipynb").read_text())["cells"]
    assert cells[-1]["cell_type"] == "markdown" and "".join(cells[-1]["source"]).startswith("## What we learned")
    assert cells[-2]["cell_type"] == "code"
    assert any("image/png" in output.get("data", {}) for output in cells[-2]["outputs"])
