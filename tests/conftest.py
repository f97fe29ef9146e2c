"""Shared fixtures: tiny models that run in milliseconds, so the suite stays fast on 2 cores."""

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from minildm.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from minildm.flow import FlowMatchSchedule  # noqa: E402
from minildm.ldm import LatentDiffusion  # noqa: E402
from minildm.schedule import NoiseSchedule  # noqa: E402
from minildm.text import TextEncoder  # noqa: E402
from minildm.unet import UNet2DConditionModel, UNetConfig  # noqa: E402

CAPTIONS = ["a large red circle at the top left", "a small blue square in the center", "top left: a green triangle"]


def make_tiny_ldm(prediction_type: str = "epsilon", seed: int = 0, schedule=None) -> LatentDiffusion:
    """f = 4 autoencoder (16x16 images -> 4x4x4 latents), a two-level UNet, a one-layer text encoder.
    "flow_prediction" makes a rectified flow (a FlowMatchSchedule); `schedule` overrides the default one."""
    torch.manual_seed(seed)
    autoencoder = AutoencoderKL(AutoencoderConfig(block_out_channels=(8, 16, 16), norm_num_groups=4))
    text_encoder = TextEncoder.from_captions(CAPTIONS, hidden_size=16, num_layers=1, num_heads=2)
    unet = UNet2DConditionModel(UNetConfig(block_out_channels=(16, 16), attention_levels=(False, True),
                                           cross_attention_dim=16, attention_head_dim=8, norm_num_groups=4))
    if schedule is None:
        schedule = FlowMatchSchedule() if prediction_type == "flow_prediction" else NoiseSchedule()
    return LatentDiffusion(autoencoder, unet, schedule, text_encoder, prediction_type, image_size=16).eval()


@pytest.fixture
def tiny_ldm() -> LatentDiffusion:
    return make_tiny_ldm()
