"""minildm: Latent Diffusion Models (Rombach et al. 2022) from scratch, small enough to read and to train
on a laptop CPU. Each piece lives in its own module; the names most people need are gathered here:

    from minildm import LatentDiffusion, ShapesDataset, viz
"""

from . import interfaces, viz
from .attention import Attention, BasicTransformerBlock, Transformer2DModel
from .autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussianDistribution
from .class_embedder import ClassEmbedder, ClassEmbedderConfig
from .classifier import ClassifierConfig, SmallClassifier
from .clip import CLIPTextConditioner, CLIPTextConfig, CLIPTextModel
from .concat_conditioning import InpaintingCondition, LowResCondition
from .data import LabeledImages
from .demo import DemoConfig, run_demo
from .discriminator import PatchDiscriminator
from .distributed import is_main_process, pick_device
from .dit import DiTConfig, DiTTransformer2DModel
from .ema import EMAModel
from .fid import (
    KIDResult,
    dataset_classifier,
    fid,
    frechet_distance,
    kernel_inception_distance,
    kid,
    label_accuracy,
    proportion_ci,
    psnr,
)
from .flow import FlowMatchSchedule, time_shift
from .image_datasets import load_image_dataset
from .ldm import GenerationOutput, LatentDiffusion
from .loss_weighting import min_snr_weights
from .metrics import ShapesChecker
from .mnist import load_fashion_mnist, load_mnist
from .pixel_space import PixelSpace
from .samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverMultistepSampler,
    FlowMatchEulerSampler,
    FlowMatchHeunSampler,
    SamplerOutput,
    randn_tensor,
)
from .schedule import NoiseSchedule
from .shapes import HELD_OUT, ShapeAttributes, ShapesDataset
from .text import TextEncoder, TextEncoderConfig, Tokenizer
from .train import TrainingConfig, train_autoencoder, train_ldm
from .unet import UNet2DConditionModel, UNetConfig
from .vq import VectorQuantizer, VQModel, VQModelConfig, codebook_perplexity

__version__ = "0.2.0"

__all__ = [
    "interfaces", "viz", "PixelSpace", "is_main_process", "randn_tensor", "TrainingConfig", "EMAModel",
    "AutoencoderConfig", "AutoencoderKL", "DiagonalGaussianDistribution", "Attention", "BasicTransformerBlock",
    "Transformer2DModel", "ClassifierConfig", "SmallClassifier", "LabeledImages", "load_fashion_mnist",
    "load_image_dataset", "load_mnist", "DemoConfig", "run_demo", "PatchDiscriminator", "dataset_classifier",
    "fid", "frechet_distance", "label_accuracy", "psnr", "GenerationOutput", "LatentDiffusion", "ShapesChecker",
    "DDIMSampler", "DDPMSampler", "SamplerOutput", "NoiseSchedule", "HELD_OUT", "ShapeAttributes", "ShapesDataset",
    "TextEncoder", "TextEncoderConfig", "Tokenizer", "pick_device", "train_autoencoder", "train_ldm",
    "UNet2DConditionModel", "UNetConfig", "DiTConfig", "DiTTransformer2DModel",
    "KIDResult", "kernel_inception_distance", "kid", "proportion_ci",
    "FlowMatchSchedule", "time_shift", "min_snr_weights", "DPMSolverMultistepSampler", "FlowMatchEulerSampler",
    "FlowMatchHeunSampler", "VQModel", "VQModelConfig", "VectorQuantizer", "codebook_perplexity",
    "ClassEmbedder", "ClassEmbedderConfig", "InpaintingCondition", "LowResCondition",
    "CLIPTextConditioner", "CLIPTextConfig", "CLIPTextModel",
]
