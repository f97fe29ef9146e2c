"""benchmarks/latent_vs_pixel.py --quick: every f on both datasets, end to end (the targets are in RESULTS.md)."""

import pytest

from benchmarks import latent_vs_pixel
from minildm.mnist import load_mnist


def test_latent_vs_pixel_quick():
    try:
        load_mnist("test", progress=False)
    except FileNotFoundError:
        pytest.skip("MNIST files not found: set MINILDM_DATA to a folder holding mnist/ (CI uses ../shared/data)")
    result = latent_vs_pixel.main(["--quick"])
    for dataset in ("mnist", "shapes"):
        rows = result["results"][dataset]
        assert [row["f"] for row in rows] == [1, 2, 4, 8]
        assert [row["latent_shape"][1] for row in rows] == [32, 16, 8, 4]
        for row in rows:
            assert row["steps"] >= 1 and 0.0 <= row["final_quality"] <= 1.0
            assert row["curve"][-1]["ema"] and len(row["curve"]) >= 1
        # the same UNet design at every f: parameter counts within 1% (only conv_in/conv_out differ)
        params = [row["unet_params"] for row in rows]
        assert max(params) - min(params) < 0.01 * max(params)
    assert "fid" not in result["results"]["shapes"][0] and "final_fid" in result["results"]["mnist"][0]


def test_latent_vs_pixel_rejects_unknown_factors():
    with pytest.raises(SystemExit):
        latent_vs_pixel.main(["--quick", "--factors", "3"])
