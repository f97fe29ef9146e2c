"""The benchmarks' --quick runs: they work end to end (the targets themselves are in benchmarks/RESULTS.md)."""

from benchmarks import demo_target, latent_step


def test_latent_step_quick():
    result = latent_step.main(["--quick", "--batch-size", "8"])
    assert abs(result["latent_unet_params"] - result["pixel_unet_params"]) < 0.01 * result["pixel_unet_params"]
    # 16x fewer positions: even a noisy 3-repeat run of batch 8 shows the latent step is cheaper.
    assert result["speedup"] > 1.5


def test_demo_target_quick(tmp_path):
    report = demo_target.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "report.json").is_file()
    assert 0.0 <= report["adherence_best"] <= 1.0


def test_mnist_ldm_quick():
    import os
    from pathlib import Path

    import pytest

    from benchmarks import mnist_ldm
    from minildm.data import cache_root, load_mnist

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
