"""A small convolutional classifier, the measuring stick for samples.

It reads the shape of a ShapesDataset image, or the digit of an MNIST image, and its penultimate
layer is the feature space of the "domain FID" (Inception weights cannot be downloaded here, and an
ImageNet network means little on 28x28 grayscale digits anyway).

    image (B, C, H, W) -> 2 x [conv3x3, ReLU, conv3x3, ReLU, maxpool] -> average pool to a g x g grid
                       -> flatten -> linear -> features (B, F) -> linear -> logits (B, num_classes)

The grid g (`pool_grid`) decides how much layout the features keep. g = 1 (a global mean) is enough to
tell a circle from a square, but on MNIST it stops near 94.5%: a mean of detectors that each see a
16x16 patch cannot tell where a stroke is. g = 8 keeps the 8x8 map of a 32x32 input and reaches 99.2%.

Depends on checkpoint.py only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_module, save_module


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128
    class_names: list[str] = field(default_factory=list)
    pool_grid: int = 1


class SmallClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.conv1 = nn.Conv2d(config.in_channels, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv4 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.fc = nn.Linear(2 * w * config.pool_grid**2, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim), used by the domain FID."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images of shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = F.max_pool2d(x, 2)  # (B, w, H, W) -> (B, w, H/2, W/2)
        x = F.relu(self.conv4(F.relu(self.conv3(x))))
        x = F.max_pool2d(x, 2)  # (B, 2w, H/2, W/2) -> (B, 2w, H/4, W/4)
        x = F.adaptive_avg_pool2d(x, self.config.pool_grid)  # (B, 2w, H/4, W/4) -> (B, 2w, g, g)
        x = x.flatten(1)  # (B, 2w, g, g) -> (B, 2w g²)
        return F.relu(self.fc(x))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Class indices (N,) for images (N, C, H, W), in the same value range the model was trained on."""
        was_training = self.training
        self.eval()
        out = [self(images[i : i + batch_size]).argmax(dim=1) for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(images) == labels.to(images.device)).float().mean().item()

    def save(self, directory: str | os.PathLike) -> None:
        """classifier.safetensors + classifier.json in `directory`."""
        save_module(self, self.config, directory, "classifier")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SmallClassifier:
        return load_module(cls, ClassifierConfig, directory, "classifier")


def train_classifier(
    model: SmallClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train with AdamW on random batches; returns the loss of every step. images (N, C, H, W)."""
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="classifier", disable=not progress):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(images[idx]), labels[idx].to(images.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses
