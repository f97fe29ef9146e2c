"""VQModel and its VectorQuantizer (vq.py): the nearest code against a brute-force argmin, the straight-through
gradient against the gradient taken at the code, the codebook and commitment terms of VQ-VAE eq. (3) and their
gradients by hand, the EMA codebook against eqs. (6)-(8) by hand, dead-code restarts, the perplexity against a
hand count; the first-stage slot; a LatentDiffusion on a VQModel trains, generates, saves and loads; training the
VQModel resumes exactly (codebook state included) and agrees across 2 processes; bad settings are refused."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minildm.interfaces import FirstStage, LatentDistribution, check_slot
from minildm.ldm import LatentDiffusion
from minildm.model_folder import SLOT_CLASSES
from minildm.schedule import NoiseSchedule
from minildm.text import TextEncoder
from minildm.train import TrainingConfig, encode_dataset, train_autoencoder, train_ldm
from minildm.unet import UNet2DConditionModel, UNetConfig
from minildm.vq import VectorQuantizer, VQModel, VQModelConfig, codebook_perplexity

CAPTIONS = ["a large red circle at the top left", "a small blue square in the center", "top left: a green triangle"]


def tiny_vq(seed=0, **codebook) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(VQModelConfig(block_out_channels=(8, 16, 16), norm_num_groups=4, num_vq_embeddings=16,
                                 **codebook))


def tiny_images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = -torch.ones(n, 3, 16, 16)
    for i in range(n):  # a bright square at a random place
        x, y = torch.randint(0, 10, (2,), generator=g).tolist()
        images[i, :, y : y + 6, x : x + 6] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return images


def ae_cfg(**changes) -> TrainingConfig:
    return TrainingConfig.for_autoencoder(**{"device": "cpu", "progress": False, **changes})


def quantizer_with(codebook: torch.Tensor, **settings) -> VectorQuantizer:
    q = VectorQuantizer(codebook.shape[0], codebook.shape[1], **settings)
    with torch.no_grad():
        q.embedding.weight.copy_(codebook)
    if q.uses_ema:
        q.ema_embed_sum.copy_(codebook)
    return q


def brute_force_codes(z: torch.Tensor, codebook: torch.Tensor):
    """For each position of z (B, c, h, w), the index of the nearest row of codebook by a loop over the codes."""
    B, c, h, w = z.shape
    best = torch.zeros(B, h, w, dtype=torch.long)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                distances = [float(((z[b, :, i, j] - e) ** 2).sum()) for e in codebook]
                best[b, i, j] = min(range(len(distances)), key=distances.__getitem__)
    return best, codebook[best].permute(0, 3, 1, 2)  # (B, h, w), (B, c, h, w)


# ---- the lookup and the straight-through estimator --------------------------------------------------------------


def test_the_nearest_code_is_the_brute_force_argmin():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(7, 3, generator=g)
    z = torch.randn(2, 3, 4, 5, generator=g) * 1.5
    out = quantizer_with(codebook)(z)
    indices, codes = brute_force_codes(z, codebook)
    assert torch.equal(out.indices, indices)
    assert torch.allclose(out.quantized, codes, atol=1e-6)  # forward: the codes themselves
    assert len(out.indices.unique()) > 3  # the case tests a real choice among codes


def test_the_straight_through_gradient_is_the_gradient_at_the_code():
    g = torch.Generator().manual_seed(1)
    codebook = torch.randn(6, 4, generator=g)
    weight = torch.randn(4, 4, 1, 1, generator=g)

    def downstream(q):  # a nonlinear "decoder", so that the gradient depends on where it is taken
        return (torch.nn.functional.conv2d(q, weight).tanh() ** 2).sum()

    z = torch.randn(3, 4, 3, 3, generator=g).requires_grad_(True)
    downstream(quantizer_with(codebook)(z).quantized).backward()
    _, codes = brute_force_codes(z.detach(), codebook)
    at_code = codes.clone().requires_grad_(True)
    downstream(at_code).backward()  # ∂L/∂z_q, evaluated at z_q = e_k
    assert torch.allclose(z.grad, at_code.grad, atol=1e-6)  # copied to z_e unchanged
    z_only = z.detach().clone().requires_grad_(True)
    downstream(z_only).backward()  # and not the gradient at z_e itself
    assert not torch.allclose(z.grad, z_only.grad, atol=1e-3)


def test_the_codebook_and_commitment_terms_follow_eq_3_by_hand():
    g = torch.Generator().manual_seed(2)
    codebook = torch.randn(5, 3, generator=g)
    z = torch.randn(2, 3, 2, 3, generator=g)
    q = quantizer_with(codebook)
    indices, codes = brute_force_codes(z, codebook)
    by_hand = sum(float((z[b, k, i, j] - codes[b, k, i, j]) ** 2) for b in range(2) for k in range(3)
                  for i in range(2) for j in range(3)) / z.numel()
    z_leaf = z.clone().requires_grad_(True)
    out = q(z_leaf)
    assert out.codebook_loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert out.commitment_loss.item() == pytest.approx(by_hand, rel=1e-5)
    # ||sg[z_e] - e||² moves only the codes: d/de_i = Σ over the positions given code i of 2 (e_i - z) / (B c h w)
    out.codebook_loss.backward(retain_graph=True)
    assert z_leaf.grad is None or torch.all(z_leaf.grad == 0)
    expected = torch.zeros_like(codebook)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                k = indices[b, i, j]
                expected[k] += 2 * (codebook[k] - z[b, :, i, j]) / z.numel()
    assert torch.allclose(q.embedding.weight.grad, expected, atol=1e-6)
    # β ||z_e - sg[e]||² moves only the encoder: d/dz = 2 (z - e) / (B c h w)
    q.embedding.weight.grad = None
    out.commitment_loss.backward()
    assert q.embedding.weight.grad is None or torch.all(q.embedding.weight.grad == 0)
    assert torch.allclose(z_leaf.grad, 2 * (z - codes) / z.numel(), atol=1e-6)


def test_the_model_loss_adds_the_terms_with_beta():
    vq = tiny_vq(beta=0.4)
    x = tiny_images(4)
    vq.eval()  # no codebook update: the terms can be recomputed from the same weights
    loss, reconstruction, parts = vq.training_loss(x)
    z = vq.encode(x).mean
    out = vq.quantize(z)
    error = x - reconstruction
    expected = error.abs().mean() + error.pow(2).mean() + out.codebook_loss + 0.4 * out.commitment_loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["reconstruction"].item() == pytest.approx(error.abs().mean().item(), rel=1e-6)
    ema = tiny_vq(beta=0.4, codebook_ema_decay=0.9).eval()  # an EMA codebook: no codebook term in the loss
    loss, reconstruction, parts = ema.training_loss(x)
    error = x - reconstruction
    expected = error.abs().mean() + error.pow(2).mean() + 0.4 * parts["commitment"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---- the codebook's updates -------------------------------------------------------------------------------------


def test_the_ema_update_follows_eqs_6_to_8_by_hand():
    g = torch.Generator().manual_seed(3)
    K, c, gamma, eps = 4, 2, 0.8, 1e-5
    codebook = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [20.0, 20.0]])  # code 3 is far from everything
    q = quantizer_with(codebook, ema_decay=gamma, epsilon=eps)
    N, m = torch.ones(K, dtype=torch.float64), codebook.double().clone()
    for _ in range(3):
        z = torch.randn(2, c, 3, 3, generator=g) * 2
        indices, _ = brute_force_codes(z, q.embedding.weight.detach().clone())
        counts = q.update(z, q(z).indices)
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).double()
        n = torch.tensor([float((indices == i).sum()) for i in range(K)], dtype=torch.float64)
        sums = torch.stack([flat[indices.reshape(-1) == i].sum(0) for i in range(K)])
        N = gamma * N + (1 - gamma) * n  # eq. (6)
        m = gamma * m + (1 - gamma) * sums  # eq. (7)
        total = N.sum()
        smoothed = (N + eps) / (total + K * eps) * total
        assert torch.equal(counts, n.float())
        assert torch.allclose(q.ema_cluster_size.double(), N, atol=1e-6)
        assert torch.allclose(q.ema_embed_sum.double(), m, atol=1e-5)
        assert torch.allclose(q.embedding.weight.double(), m / smoothed[:, None], atol=1e-5)  # eq. (8)
    assert n[3] == 0 and not torch.allclose(q.embedding.weight[:3], codebook[:3])  # the used codes moved
    # the unused code keeps e = m / N (both decayed alike), up to the smoothing
    assert torch.allclose(q.embedding.weight[3], codebook[3], rtol=1e-3)


def test_an_ema_codebook_is_not_a_parameter_and_a_learned_one_is():
    ema, learned = tiny_vq(codebook_ema_decay=0.99), tiny_vq()
    assert "quantize.embedding.weight" not in dict(ema.named_parameters())
    assert "quantize.embedding.weight" in dict(ema.state_dict())
    assert "quantize.embedding.weight" in dict(learned.named_parameters())
    ema.requires_grad_(True)  # train_autoencoder unfreezes everything: the EMA codebook stays out of the optimizer
    assert "quantize.embedding.weight" not in dict(ema.named_parameters())


def test_dead_codes_are_counted_and_restarted_with_encoder_outputs():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0], [-50.0, 50.0]])  # codes 2 and 3 never picked
    q = quantizer_with(codebook, dead_code_steps=2, restart_dead_codes=True)
    g = torch.Generator().manual_seed(4)
    z = torch.rand(2, 2, 3, 3, generator=g)
    q.update(z, q(z).indices, torch.Generator().manual_seed(0))
    assert q.steps_unused.tolist()[2:] == [1, 1] and q.dead_codes() == 0 and q.restarted == 0
    assert torch.equal(q.embedding.weight.detach(), codebook)  # not yet: dead only after 2 steps
    q.update(z, q(z).indices, torch.Generator().manual_seed(0))
    assert q.restarted == 2 and q.dead_codes() == 0 and q.steps_unused.tolist()[2:] == [0, 0]
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in (2, 3):  # each restarted code is one of the batch's encoder outputs
        assert ((flat - q.embedding.weight[k].detach()).abs().sum(1) == 0).any()
    assert torch.equal(q.embedding.weight[:2].detach(), codebook[:2])  # the live codes are left alone
    counting = quantizer_with(codebook, dead_code_steps=2)  # without restarts, they are only counted
    for _ in range(3):
        counting.update(z, counting(z).indices)
    assert counting.dead_codes() == 2 and counting.steps_unused.tolist() == [0, 0, 3, 3]


def test_the_perplexity_is_exp_entropy_of_a_hand_count():
    counts = torch.tensor([2.0, 1.0, 1.0, 0.0])  # p = 1/2, 1/4, 1/4, 0
    expected = math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))  # = 2^1.5
    assert codebook_perplexity(counts).item() == pytest.approx(expected, rel=1e-6)
    assert codebook_perplexity(torch.ones(8)).item() == pytest.approx(8.0)  # all codes alike: K
    assert codebook_perplexity(torch.tensor([0.0, 5.0])).item() == pytest.approx(1.0)  # one code takes all
    with pytest.raises(ValueError, match="at least one"):
        codebook_perplexity(torch.zeros(3))
    vq = tiny_vq().eval()  # the model's reported perplexity is the hand count of its batch's codes
    x = tiny_images(8)
    _, _, parts = vq.training_loss(x)
    indices = vq.quantize(vq.encode(x).mean).indices.reshape(-1).tolist()
    p = [indices.count(k) / len(indices) for k in set(indices)]
    assert parts["perplexity"].item() == pytest.approx(math.exp(-sum(v * math.log(v) for v in p)), rel=1e-5)


# ---- the first-stage slot ---------------------------------------------------------------------------------------


def test_it_fills_the_first_stage_slot_and_decode_quantises():
    vq = tiny_vq().eval()
    assert isinstance(vq, FirstStage)
    check_slot(vq, FirstStage, "first_stage")
    assert SLOT_CLASSES["first_stage"]["VQModel"] is VQModel
    assert (vq.in_channels, vq.latent_channels, vq.downsampling_factor) == (3, 4, 4)
    x = tiny_images(2)
    posterior = vq.encode(x)
    assert isinstance(posterior, LatentDistribution) and posterior.mean.shape == (2, 4, 4, 4)
    assert torch.equal(posterior.std, torch.zeros_like(posterior.mean))
    assert torch.equal(posterior.sample(torch.Generator()), posterior.mean)
    z = posterior.mean
    with torch.no_grad():
        images = vq.decode(z)
        codes = vq.quantize.embedding.weight[vq.quantize(z).indices].permute(0, 3, 1, 2)  # (B, c, h, w)
        assert torch.allclose(images, vq.decode(codes, force_not_quantize=True), atol=1e-5)  # z + (e - z) rounds
        assert not torch.allclose(images, vq.decode(z, force_not_quantize=True), atol=1e-4)
        assert torch.equal(images, vq(x))
    assert images.shape == x.shape


def test_a_vq_model_alone_saves_and_loads(tmp_path):
    vq = tiny_vq(codebook_ema_decay=0.9, restart_dead_codes=True)
    vq.train()
    vq.training_loss(tiny_images(4))  # move the EMA state and the counters off their start
    vq.save(tmp_path / "vq")
    loaded = VQModel.load(tmp_path / "vq")
    assert loaded.config == vq.config
    for (name, a), b in zip(vq.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def tiny_vq_ldm(vq):
    torch.manual_seed(1)
    text = TextEncoder.from_captions(CAPTIONS, hidden_size=16, num_layers=1, num_heads=2)
    unet = UNet2DConditionModel(UNetConfig(block_out_channels=(16, 16), attention_levels=(False, True),
                                           cross_attention_dim=16, attention_head_dim=8, norm_num_groups=4))
    return LatentDiffusion(vq, unet, NoiseSchedule(), text, image_size=16)


def test_a_latent_diffusion_on_a_vq_model_trains_generates_saves_and_loads(tmp_path):
    vq = tiny_vq(codebook_ema_decay=0.9)
    images = tiny_images(12)
    train_autoencoder(vq, images, ae_cfg(steps=2, batch_size=4))
    ldm = tiny_vq_ldm(vq)
    means, stds = encode_dataset(ldm, images)
    assert torch.equal(stds, torch.zeros_like(means))  # a point mass: the LDM diffuses the pre-quantisation z_e
    before = [p.detach().clone() for p in ldm.backbone.parameters()]
    codebook = vq.quantize.embedding.weight.clone()
    history = train_ldm(ldm, images, [CAPTIONS[i % 3] for i in range(12)],
                        TrainingConfig(steps=2, batch_size=4, device="cpu", progress=False, ema_decay=0.0))
    assert len(history["loss"]) == 2 and all(math.isfinite(v) for v in history["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, ldm.backbone.parameters()))
    assert torch.equal(vq.quantize.embedding.weight, codebook)  # the frozen first stage's codebook stays
    out = ldm.generate(CAPTIONS[:2], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16) and 0 <= out.min() and out.max() <= 1
    ldm.save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["first_stage"]["class"] == "VQModel"
    loaded = LatentDiffusion.load(tmp_path / "model")
    assert isinstance(loaded.first_stage, VQModel) and loaded.first_stage.config == vq.config
    again = loaded.generate(CAPTIONS[:2], num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


# ---- training ---------------------------------------------------------------------------------------------------


def test_train_autoencoder_trains_a_vq_model_and_reports_codebook_usage():
    vq = tiny_vq(restart_dead_codes=True, dead_code_steps=3)
    codebook = vq.quantize.embedding.weight.detach().clone()
    history = train_autoencoder(vq, tiny_images(), ae_cfg(steps=30, batch_size=8, lr=3e-3))
    for key in ("loss", "reconstruction", "codebook", "commitment", "perplexity", "dead_codes", "restarted_codes"):
        assert len(history[key]) == 30, key
    assert "kl" not in history
    assert all(1 <= p <= 16 for p in history["perplexity"])
    assert sum(history["restarted_codes"]) > 0  # most of a fresh codebook goes unused at first
    assert sum(history["reconstruction"][-5:]) < sum(history["reconstruction"][:5])
    assert not torch.equal(vq.quantize.embedding.weight, codebook)  # the codebook term (and restarts) moved it
    assert not vq.training and vq.scaling_factor != 1.0
    latents = vq.encode(tiny_images()[:16]).mean
    assert latents.flatten().std().item() * vq.scaling_factor == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("codebook", [{"codebook_ema_decay": 0.9, "restart_dead_codes": True, "dead_code_steps": 2},
                                      {"restart_dead_codes": True, "dead_code_steps": 2}])
def test_vq_training_resumes_bit_identically_with_the_codebook_state(tmp_path, codebook):
    settings = {"steps": 6, "batch_size": 4}
    straight = tiny_vq(**codebook)
    straight_history = train_autoencoder(straight, tiny_images(), ae_cfg(**settings))
    assert sum(straight_history["restarted_codes"][3:]) > 0  # restarts after the checkpoint: the state matters

    def crash(step):
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        train_autoencoder(tiny_vq(**codebook), tiny_images(), ae_cfg(**settings, checkpoint_dir=tmp_path,
                                                                     checkpoint_every=3, callback_every=3),
                          callback=crash)
    saved = load_file(tmp_path / "autoencoder.safetensors")
    assert {"quantize.steps_unused", "quantize.embedding.weight"} <= saved.keys()
    resumed = tiny_vq(**codebook)
    history = train_autoencoder(resumed, tiny_images(), ae_cfg(**settings, checkpoint_dir=tmp_path, resume=True))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for key in ("loss", "perplexity", "dead_codes", "restarted_codes"):
        assert history[key] == straight_history[key], key


WORKER = Path(__file__).parent / "vq_distributed_worker.py"


def test_two_processes_keep_the_codebook_of_one(tmp_path):
    """EMA statistics and restarts agree on 2 processes with half batches and 1 with the whole batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2"]):
        result = subprocess.run([*launcher, str(WORKER), str(tmp_path)], capture_output=True, text=True,
                                timeout=240, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = load_file(tmp_path / "vq_1.safetensors"), load_file(tmp_path / "vq_2.safetensors")
    histories = [json.loads((tmp_path / f"vq_{n}.json").read_text()) for n in (1, 2)]
    assert sum(histories[0]["restarted_codes"]) > 0
    assert histories[0]["perplexity"] == pytest.approx(histories[1]["perplexity"], rel=1e-4)
    assert histories[0]["restarted_codes"] == histories[1]["restarted_codes"]
    assert torch.equal(one["quantize.steps_unused"], two["quantize.steps_unused"])
    for key in ("quantize.ema_cluster_size", "quantize.ema_embed_sum", "quantize.embedding.weight"):
        # a mean over the batch taken in two halves rounds differently; one process's batch statistics alone
        # (not summed over both) would differ by far more
        assert torch.allclose(one[key], two[key], atol=1e-4, rtol=1e-4), key


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, match", [
    ({"num_vq_embeddings": 0}, "num_vq_embeddings must be an integer >= 1"),
    ({"num_vq_embeddings": 2.5}, "num_vq_embeddings must be an integer >= 1"),
    ({"dead_code_steps": 0}, "dead_code_steps must be an integer >= 1"),
    ({"beta": -0.1}, "beta"),
    ({"beta": float("nan")}, "beta"),
    ({"codebook_ema_decay": 1.0}, r"codebook_ema_decay must be in \[0, 1\)"),
    ({"codebook_ema_decay": -0.5}, r"codebook_ema_decay must be in \[0, 1\)"),
    ({"restart_dead_codes": "yes"}, "restart_dead_codes must be True or False"),
    ({"latent_channels": 0}, "latent_channels"),
])
def test_bad_settings_are_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        VQModelConfig(**{"block_out_channels": (8, 16), "norm_num_groups": 4, **changes})


def test_bad_inputs_are_refused(tmp_path):
    vq = tiny_vq()
    with pytest.raises(TypeError, match="VQModelConfig"):
        VQModel(VQModelConfig.__bases__[0]())
    with pytest.raises(ValueError, match=r"latents must be latents of shape \(B, 4, H, W\)"):
        vq.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="multiples of the downsampling factor f=4"):
        vq.encode(torch.zeros(1, 3, 10, 10))
    with pytest.raises(TypeError, match="x must be images as a torch.float32 tensor"):
        vq.encode(torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        vq.training_loss(tiny_images(2), generator=0)
    with pytest.raises(TypeError, match="an AutoencoderKL or a VQModel"):
        train_autoencoder(torch.nn.Linear(2, 2), tiny_images(), ae_cfg(steps=1))
    vq.save(tmp_path / "vq")
    with pytest.raises(ValueError, match="holds a saved model"):
        train_autoencoder(vq, tiny_images(), ae_cfg(steps=1, checkpoint_dir=tmp_path / "vq"))
    config = json.loads((tmp_path / "vq" / "vq_model.json").read_text())
    (tmp_path / "vq" / "vq_model.json").write_text(json.dumps({**config, "beta": -1}))
    with pytest.raises(ValueError, match="is not a valid VQModelConfig"):
        VQModel.load(tmp_path / "vq")


def test_for_factor_builds_the_autoencoders_layout_with_a_codebook():
    config = VQModelConfig.for_factor(4, in_channels=1, width=16, norm_num_groups=8, num_vq_embeddings=64, beta=0.5)
    assert config.downsampling_factor == 4 and config.block_out_channels == (16, 32, 32)
    assert (config.num_vq_embeddings, config.beta, config.in_channels) == (64, 0.5, 1)
    assert isinstance(config, VQModelConfig)
    with pytest.raises(TypeError):
        VQModelConfig.for_factor(4, codebook_size=3)


def test_the_vq_vs_kl_benchmark_runs_quick(tmp_path):
    from benchmarks import first_stage_vq

    result = first_stage_vq.main(["--quick", "--datasets", "shapes", "--results", str(tmp_path)])
    run = result["datasets"]["shapes"]
    assert set(run["first_stages"]) == {"kl", "vq", "vq_ema_restart"}
    assert "held_out_perplexity" in run["first_stages"]["vq"] and "held_out_perplexity" not in run["first_stages"]["kl"]
    assert set(run["ldm"]) == set(run["ldm_first_stages"]) and run["ldm_first_stages"][0] == "kl"
    for score in run["ldm"].values():
        assert 0 <= score["ci95"][0] <= score["quality"] <= score["ci95"][1] <= 1
    assert (tmp_path / "first_stage_vq_quick.json").is_file() and (tmp_path / "first_stage_vq_quick.png").is_file()


def test_the_course_vq_model_is_trained_once_with_its_history_then_reused(monkeypatch, tmp_path, capsys):
    from minildm import course
    from minildm.data import LabeledImages

    monkeypatch.setenv("MINILDM_PROFILE", "ci")
    images = torch.rand(32, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(32) % 10
    data = LabeledImages(images, labels, [f"digit {k}" for k in labels.tolist()], [str(k) for k in range(10)])
    first = course.mnist_vq_or_train(data, artifacts=tmp_path, minutes=0.02, device="cpu")
    assert "trained the f=4 VQ autoencoder" in capsys.readouterr().out
    assert (tmp_path / "vq_mnist_f4_ci" / "vq_model.json").is_file()
    assert first.config.codebook_ema_decay > 0 and first.config.restart_dead_codes
    again = course.mnist_vq_or_train(data, artifacts=tmp_path, device="cpu")
    assert "reused" in capsys.readouterr().out
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert again.history == first.history and len(again.history["perplexity"]) == again.history["steps"][0]
