"""Zoo: small-config audio and sequence networks (keyword spotters, 1-D conv audio, torch's own Transformer
encoder), built in code with seeded weights. Inputs are short: 16 frames of 10 MFCC-like features, 1,600
audio samples (0.1 s at 16 kHz), 8 tokens of width 32."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tests.zoo.seeding import seeded

FRAMES, FEATURES = 16, 10  # a keyword spotter's MFCC window, shortened


def _noise(*shape, seed=1):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),)


class RecurrentSpotter(nn.Module):
    """Keyword spotting as in "Hello Edge" (Zhang et al. 2017): a recurrent layer over MFCC frames, the last
    step's state classified into keywords."""

    def __init__(self, cell, hidden=32, keywords=12):
        super().__init__()
        self.rnn = cell(FEATURES, hidden, num_layers=1, batch_first=True)
        self.classifier = nn.Linear(hidden, keywords)

    def forward(self, mfcc):  # (1, frames, features)
        states, _ = self.rnn(mfcc)
        return {"logits": self.classifier(states[:, -1])}


def gru_kws():
    return seeded(RecurrentSpotter, nn.GRU), _noise(1, FRAMES, FEATURES)


def lstm_kws():
    return seeded(RecurrentSpotter, nn.LSTM), _noise(1, FRAMES, FEATURES)


class ConvAudio(nn.Module):
    """Raw-waveform 1-D conv classifier (M5-style): strided conv front end, BN + ReLU, max pooling, a dilated
    conv, global average pooling."""

    def __init__(self, classes=8):
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(1, 16, 40, stride=8), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(4))
        self.body = nn.Sequential(nn.Conv1d(16, 32, 3, padding=2, dilation=2), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(2))
        self.fc = nn.Linear(32, classes)

    def forward(self, audio):  # (1, 1, samples)
        return {"logits": self.fc(F.adaptive_avg_pool1d(self.body(self.front(audio)), 1).flatten(1))}


def conv1d_audio():
    return seeded(ConvAudio), _noise(1, 1, 1600)


class TorchTransformer(nn.Module):
    """nn.TransformerEncoder (1 layer, 2 heads, width 32): nn.MultiheadAttention through torch's fused path."""

    def __init__(self, dim=32, classes=4):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):  # (1, 8, 32) embeddings
        return {"logits": self.head(self.encoder(tokens).mean(1))}


def transformer_encoder():
    return seeded(TorchTransformer), _noise(1, 8, 32)
