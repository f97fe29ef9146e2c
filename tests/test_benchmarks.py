"""The benchmarks' --quick runs: they work end to end (the targets themselves are in benchmarks/RESULTS.md)."""

import pytest

from benchmarks import demo_target, latent_step


def test_latent_step_quick():
    result = latent_step.main(["--quick", "--batch-size", "8"])
    assert abs(result["latent_unet_params"] - result["pixel_unet_params"]) < 0.01 * result["pixel_unet_params"]
    # 16x fewer positions: even a noisy 3-repeat run of batch 8 shows the latent step is cheaper.
    assert result["speedup"] > 1.5


def test_objectives_quick(tmp_path):
    from benchmarks import objectives

    result = objectives.main(["--quick", "--models", "unet_eps", "unet_flow", "--points", "2", "--results",
                              str(tmp_path)])
    assert (tmp_path / "objectives_quick.json").is_file() and (tmp_path / "objectives_quick.png").is_file()
    for run in result["objectives"].values():
        assert run["curve"][-1]["weights"] == "ema" and 0 <= run["final"]["quality"] <= 1
    heun = result["nfe"]["runs"]["unet_flow"]["heun"]
    assert [row["evaluations"] for row in heun] == [1, 3]  # Heun's n steps cost 2n - 1 evaluations
    assert set(result["nfe"]["runs"]["unet_eps"]) == {"ddim", "ddpm", "dpm_solver"}


def test_objectives_quick_on_mnist(tmp_path):
    from benchmarks import objectives
    from minildm.mnist import load_mnist

    try:
        load_mnist("test", progress=False)
    except FileNotFoundError:
        pytest.skip("MNIST files not found: set MINILDM_DATA to a folder holding mnist/ (CI uses ../shared/data)")
    result = objectives.main(["--quick", "--dataset", "mnist", "--models", "unet_flow", "--points", "1",
                              "--results", str(tmp_path)])
    final = result["objectives"]["unet_flow"]["final"]
    assert 0 <= final["quality"] <= 1 and final["n"] == 40 and "kid_real_vs_real" in final
    assert (tmp_path / "objectives_mnist_quick.png").is_file()


def test_demo_target_quick(tmp_path):
    report = demo_target.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "report.json").is_file()
    assert 0.0 <= report["adherence_best"] <= 1.0


def test_mnist_ldm_quick():
    import os
    from pathlib import Path

    import pytest

    from benchmarks import mnist_ldm
    from minildm.data import cache_root
    from minildm.mnist import load_mnist

    try:
        load_mnist("test", progress=False)
    except FileNotFoundError:
        pytest.skip("MNIST files not found: set MINILDM_DATA to a folder holding mnist/ (CI uses ../shared/data)")
    cached = Path(cache_root()) / "classifiers" / "mnist_32" / "classifier.safetensors"
    stamp = os.stat(cached).st_mtime_ns if cached.exists() else None
    result = mnist_ldm.main(["--quick"])
    assert set(result["scores"]) == {"1.0", "3.0"}
    assert 0.0 <= result["best_prompt_accuracy"] <= 1.0
    # The quick run's throwaway classifier must not replace (or become) the cached real one.
    assert (os.stat(cached).st_mtime_ns if cached.exists() else None) == stamp


def test_peak_memory_follows_cpu_allocations():
    import torch

    from benchmarks.common import peak_memory

    def allocate():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # 2 MB more: the peak
        del a, b
        torch.empty(250_000)  # 1 MB, after both were freed

    assert 6_000_000 <= peak_memory(allocate, torch.device("cpu")) < 6_100_000


def test_vs_diffusers_arguments_describe_the_same_networks():
    # Needs no diffusers: the arguments the benchmark gives diffusers, read against minildm's configs.
    import pytest

    from benchmarks.vs_diffusers import CASES, diffusers_autoencoder_kwargs, diffusers_unet_kwargs
    from minildm.unet import UNetConfig

    unet = diffusers_unet_kwargs(UNetConfig.sd_shaped(), sample_size=16)
    assert unet["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert unet["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3  # the up path runs deepest first
    assert unet["attention_head_dim"] == (2, 4, 8, 8)  # diffusers counts heads: channels / 32 per head
    assert unet["block_out_channels"] == (64, 128, 256, 256) and unet["layers_per_block"] == 2
    assert unet["use_linear_projection"] and unet["norm_eps"] == 1e-6 and unet["cross_attention_dim"] == 256
    small = diffusers_unet_kwargs(CASES["small"].unet, sample_size=8)
    assert small["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert small["attention_head_dim"] == (2, 4)
    autoencoder = diffusers_autoencoder_kwargs(CASES["sd_shaped"].autoencoder, sample_size=128)
    assert autoencoder["down_block_types"] == ("DownEncoderBlock2D",) * 4  # 4 levels: f = 8
    assert autoencoder["block_out_channels"] == (32, 64, 128, 128) and autoencoder["latent_channels"] == 4
    with pytest.raises(ValueError, match="cross-attention"):
        diffusers_unet_kwargs(UNetConfig(cross_attention_dim=None), sample_size=8)


def test_vs_diffusers_skips_without_diffusers(monkeypatch, capsys):
    import sys

    from benchmarks import vs_diffusers

    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    result = vs_diffusers.main(["--quick"])
    assert "skipped" in result and "minildm[bench]" in capsys.readouterr().out


def test_vs_diffusers_quick():
    import pytest

    pytest.importorskip("diffusers", reason='diffusers is not installed: pip install "minildm[bench]"')
    from benchmarks import vs_diffusers

    result = vs_diffusers.main(["--quick"])
    for case in result["cases"].values():
        # The same network: minildm's weights load into diffusers' model and give the same outputs.
        assert case["unet"]["max_abs_difference"] < 1e-4
        assert case["autoencoder"]["decoder_max_abs_difference"] < 1e-4
        assert case["autoencoder"]["encoder_max_abs_difference_with_minildm_padding"] < 1e-4
        for model in ("unet", "autoencoder"):
            assert set(case[model]["ratio"]) == {"forward_s", "train_step_s", "forward_peak_mb", "train_step_peak_mb"}
            assert case[model]["train_step_peak_mb"]["minildm"] > 0
        assert set(case["minildm_options"]["unet"]["forward_s"]) == {"default", "channels_last",
                                                                     "written_out_attention"}
    recheck = vs_diffusers.main(["--quick", "--forward-only", "sd_shaped", "--repeats", "4"])
    assert list(recheck["cases"]) == ["sd_shaped"]
    for model in ("unet", "autoencoder"):
        low, median, high = recheck["cases"]["sd_shaped"][model]["ratio_quartiles"]
        assert 0 < low <= median <= high


def test_sampling_quick():
    from benchmarks import sampling

    result = sampling.main(["--quick"])
    assert [(r["sampler"], r["batch_size"]) for r in result["rows"]] == [("ddim", 1), ("ddim", 4), ("ddpm", 1),
                                                                         ("ddpm", 4)]
    for row in result["rows"]:
        assert row["images_per_s"] > 0 and row["unet_calls_s"] > 0


def test_sampling_only_runs_the_chosen_settings_and_refuses_unknown_ones(capsys):
    from benchmarks import sampling

    result = sampling.main(["--quick", "--only", "ddpm:1", "--repeats", "3"])
    assert [(r["sampler"], r["batch_size"], r["repeats"]) for r in result["rows"]] == [("ddpm", 1, 3)]
    with pytest.raises(SystemExit):
        sampling.main(["--quick", "--only", "ddim:7"])
    assert "ddim:1 ddim:4 ddpm:1 ddpm:4" in capsys.readouterr().err


def test_results_on_a_gpu_get_their_own_file(tmp_path, monkeypatch):
    import torch

    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert common.write_result("sampling", {}, torch.device("cpu")).name == "sampling.json"
    assert common.write_result("sampling", {}, torch.device("cuda")).name == "sampling_cuda.json"


def test_resolution_quick():
    from benchmarks import resolution

    result = resolution.main(["--quick"])
    assert [r["image_size"] for r in result["rows"]] == [32, 64]
    row = result["rows"][1]
    assert row["f1"]["latent_shape"] == [3, 64, 64] and row["f4"]["latent_shape"] == [4, 16, 16]
    # 16x fewer positions: even a 2-repeat run shows the latent model cheaper at 64 px.
    assert row["train_ratio"] > 1.5 and row["sampling_ratio"] > 1.5


def test_spatial_transformer_keeps_the_memory_layout():
    # vs_diffusers found the spatial transformer's output channels-last for an NCHW input, which made every
    # convolution after it reorder its weights on each call (14% of the SD-shaped UNet's forward on CPU).
    import torch

    from minildm.attention import Transformer2DModel

    block = Transformer2DModel(64, heads=2, dim_head=32, cross_attention_dim=None, norm_num_groups=16)
    x = torch.randn(2, 64, 4, 4)
    assert block(x).is_contiguous()
    assert block(x.to(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
