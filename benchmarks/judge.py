"""The judge of the reference benchmark: a small digits classifier and the three numbers it gives.

    accuracy   share of samples the classifier puts in the class they were asked for
    fd         Fréchet distance between generated and real digits in the classifier's 64-d
               penultimate features (our FID; real = all 1797 digits)
    psnr       per-sample PSNR (dB) against the full-compute sample of the same seed

Use:
    from benchmarks.judge import load_judge
    judge = load_judge()
    judge.evaluate(images, labels, reference=full_images)   # {"accuracy", "fd", "psnr"}

Images are [N, 1, 16, 16] in [-1, 1] (what procache_core.reference.sampling.sample returns for the
reference model); values outside are clamped. Train (seconds on a CPU):
    python -m benchmarks.judge --train
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from .digits import CLASSES, IMAGE_SIZE, load_digits_tensors, split

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "judge_digits.safetensors")
FEATURES = 64
PSNR_CAP = 100.0      # identical images (MSE 0) count as 100 dB


class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * (IMAGE_SIZE // 4) ** 2, FEATURES)
        self.head = nn.Linear(FEATURES, CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(A B) = sum sqrt(eig(sqrt(A) B sqrt(A))), a symmetric PSD product
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    mid = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * mid)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[N] PSNR in dB of each image against its reference, both in [-1, 1] (peak-to-peak 2)."""
    mse = (images.clamp(-1, 1) - reference.clamp(-1, 1)).double().square().flatten(1).mean(1)
    out = 10 * torch.log10(4.0 / mse.clamp(min=1e-300))
    return out.clamp(max=PSNR_CAP).float()


class Judge:
    def __init__(self, model: DigitsClassifier):
        self.model = model.eval()
        real, _ = load_digits_tensors()
        self.real_features = self.features(real)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(-1, 1)
        return torch.cat([self.model.features(chunk) for chunk in x.split(1024)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().clamp(-1, 1)
        return torch.cat([self.model(chunk).argmax(1) for chunk in x.split(1024)])

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images) == labels).float().mean())

    def fd(self, images: torch.Tensor) -> float:
        return frechet_distance(self.features(images), self.real_features)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
        out = {"accuracy": self.accuracy(images, labels), "fd": self.fd(images)}
        if reference is not None:
            out["psnr"] = float(psnr(images, reference).mean())
        return out


def load_judge(path: str = WEIGHTS) -> Judge:
    from safetensors.torch import load_file

    model = DigitsClassifier()
    model.load_state_dict(load_file(path))
    return Judge(model)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shifts of up to 1 pixel and a little noise, so generated digits are judged like real ones."""
    n = x.shape[0]
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    noise = torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.3
    return (x + noise).clamp(-1, 1)


def train(seed: int = 0, epochs: int = 40, batch: int = 64, out: str = WEIGHTS) -> dict:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = load_digits_tensors()
    train_idx, held_idx = split(len(labels), seed=0)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    started = time.process_time()
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for chunk in order.split(batch):
            loss = F.cross_entropy(model(_augment(images[chunk], gen)), labels[chunk])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        held = float((model(images[held_idx]).argmax(1) == labels[held_idx]).float().mean())
    report = {"seed": seed, "epochs": epochs, "heldout_accuracy": round(held, 4),
              "cpu_seconds": round(time.process_time() - started, 1)}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out,
              metadata={"report": json.dumps(report)})
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", help="train the classifier and write its weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default=WEIGHTS)
    args = parser.parse_args()
    if args.train:
        print(json.dumps(train(args.seed, args.epochs, out=args.out)))
    judge = load_judge(args.out)
    images, labels = load_digits_tensors()
    _, held_idx = split(len(labels), seed=0)
    print(json.dumps({"heldout_accuracy": round(judge.accuracy(images[held_idx], labels[held_idx]), 4),
                      "fd_heldout_vs_all": round(judge.fd(images[held_idx]), 4)}))


if __name__ == "__main__":
    main()
