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
