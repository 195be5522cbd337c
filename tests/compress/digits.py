"""A small convnet trained on scikit-learn's bundled digits (1,797 8x8 grey images, no download) in a few
seconds, seeded, for the pruning tests, the digits acceptance test and benchmarks/bench_prune.py.

    trained = train_digits()          # cached: every caller gets its own copy of the same trained weights
    trained.model, trained.x_test, trained.y_test, accuracy(trained.model, trained.x_test, trained.y_test)

`convnet()` is the same trained model as an `edgeq convert tests.compress.digits:convnet` source.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SEED = 0
EPOCHS = 8  # 98.7% test accuracy; more epochs add seconds, not points
TEST_SHARE = 0.25


class DigitsNet(nn.Module):
    """conv 1->32 -> BN -> ReLU -> conv 32->64 -> BN -> ReLU -> 2x2 max pool -> flatten -> linear 1024->10.

    Wide enough that halving the channels shows in an artifact's size and latency; the flatten ties conv2's
    channels to the linear layer's input features in blocks of 16 (the pruner must follow that)."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * width * 4 * 4, classes)

    def forward(self, pixels):
        return self.classifier(torch.flatten(self.features(pixels), 1))


@dataclass
class TrainedDigits:
    model: DigitsNet  # eval mode
    x_train: torch.Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = SEED):
    """(x_train, y_train, x_test, y_test): a seeded, stratified split of sklearn's digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=TEST_SHARE, random_state=seed, stratify=digits.target)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train).long(), torch.from_numpy(x_test), torch.from_numpy(y_test).long())


@functools.lru_cache(maxsize=2)
def _trained(seed: int, epochs: int) -> TrainedDigits:
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    torch.manual_seed(seed)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: a second thread only spins on a shared machine (and the bits match anywhere)
    try:
        for _ in range(epochs):
            for batch in torch.randperm(len(x_train), generator=order).split(64):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return TrainedDigits(model.eval(), x_train, y_train, x_test, y_test)


def train_digits(seed: int = SEED, epochs: int = EPOCHS) -> TrainedDigits:
    """The trained convnet and its splits; a fresh copy of the model on every call (training runs once)."""
    trained = _trained(seed, epochs)
    return TrainedDigits(copy.deepcopy(trained.model).eval(), trained.x_train, trained.y_train, trained.x_test, trained.y_test)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of a module returning logits (or a one-tensor tuple of them)."""
    with torch.no_grad():
        logits = model(x)
    logits = logits[0] if isinstance(logits, tuple) else logits
    return float((logits.argmax(-1) == y).float().mean())


def convnet():
    """`edgeq convert tests.compress.digits:convnet`: the trained model and one test image as the example."""
    trained = train_digits()
    return trained.model, (trained.x_test[:1],)
