"""scikit-learn's handwritten digits (1797 8x8 images, shipped inside the package) as 16x16 tensors.

Both the reference DiT and the judge train on this; pixel values are scaled to [-1, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
CLASSES = 10


def load_digits_tensors(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, size, size] in [-1, 1], labels [N]) in the dataset's own order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0     # 0..16 -> 0..1
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    return images, torch.tensor(data.target, dtype=torch.long)


def split(n: int, holdout: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, held-out) index split."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(round(n * (1 - holdout)))
    return order[:cut], order[cut:]
