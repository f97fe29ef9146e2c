"""The demo pipeline and the command line, end to end at smoke size."""

import json

import pytest
from PIL import Image

from minildm.__main__ import main
from minildm.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, DemoConfig.smoke(), device="cpu", progress=False)
    return out


def test_demo_writes_everything(demo_dir):
    for name in ("samples.png", "denoising.gif", "report.json", "model/config.json", "model/backbone.safetensors"):
        assert (demo_dir / name).is_file(), name
    report = json.loads((demo_dir / "report.json").read_text())
    assert set(report["adherence"]) == {"1.0", "3.0"}
    for scores in report["adherence"].values():
        assert set(scores) == {"all", "seen", "held_out"}
        assert 0.0 <= scores["all"]["all"] <= 1.0
    assert report["adherence_best"] == max(s["all"]["all"] for s in report["adherence"].values())
    assert report["config"]["ldm_steps"] == 3
    gif = Image.open(demo_dir / "denoising.gif")
    assert gif.n_frames == DemoConfig.smoke().num_inference_steps + 1


def test_sample_command(demo_dir, tmp_path, capsys):
    out = tmp_path / "s.png"
    code = main(["sample", "--model", str(demo_dir / "model"), "--prompt", "a large red circle at the top left",
                 "--num", "2", "--steps", "2", "--out", str(out)])
    assert code == 0
    assert Image.open(out).size[0] > 0


@pytest.mark.parametrize("objective", ["flow", "v_prediction"])
def test_the_demo_trains_each_objective_and_the_sample_command_samples_it(objective, tmp_path):
    out = tmp_path / objective
    assert main(["demo", "--smoke", "--objective", objective, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["objective"] == objective
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["prediction_type"] == ("flow_prediction" if objective == "flow" else "v_prediction")
    sampler = "heun" if objective == "flow" else "dpm_solver"
    assert main(["sample", "--model", str(out / "model"), "--prompt", "a red circle", "--num", "1", "--steps", "2",
                 "--sampler", sampler, "--out", str(tmp_path / "s.png")]) == 0
    wrong = "ddim" if objective == "flow" else "euler"  # a sampler of the other family: a clear error, code 2
    assert main(["sample", "--model", str(out / "model"), "--prompt", "a red circle", "--num", "1", "--steps", "2",
                 "--sampler", wrong, "--out", str(tmp_path / "t.png")]) == 2


def test_sample_command_errors(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "a.png")]) == 2
    assert "no model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--minutes", "0"])


def test_profiles(monkeypatch):
    from minildm.profile import current_profile, pick

    monkeypatch.setenv("MINILDM_PROFILE", "ci")
    assert current_profile() == "ci" and pick(ci=1, cpu=2) == 1
    monkeypatch.setenv("MINILDM_PROFILE", "gpu")
    assert pick(ci=1, cpu=2) == 2 and pick(ci=1, cpu=2, gpu=3) == 3
    monkeypatch.delenv("MINILDM_PROFILE")
    assert current_profile() == "cpu"
    monkeypatch.setenv("MINILDM_PROFILE", "laptop")
    with pytest.raises(ValueError, match="MINILDM_PROFILE"):
        current_profile()
