"""BatchNorm outside an nn.Sequential is folded when the exported graph proves the conv feeds it alone."""

import torch
from torch import nn

from edgeq.compress.fold import fold_batchnorm
from tests.zoo.seeding import seeded


class ConvLayer(nn.Module):
    """Hugging Face's shape (MobileViTConvLayer, ResNetConvLayer): attributes called in forward."""

    def __init__(self, residual: bool = False):
        super().__init__()
        self.convolution = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.normalization = nn.BatchNorm2d(4)
        self.residual = residual

    def forward(self, x):
        y = self.convolution(x)
        out = torch.relu(self.normalization(y))
        return out + y if self.residual else out  # a residual read of y forbids folding


def test_attribute_pairs_fold_only_when_the_conv_feeds_the_norm_alone():
    x = torch.randn(1, 4, 8, 8)
    for residual, expected in ((False, ["convolution"]), (True, [])):
        module = seeded(ConvLayer, residual)
        folded_module, folded = fold_batchnorm(module, (x,))
        assert folded == expected
        torch.testing.assert_close(folded_module(x), module(x), atol=1e-5, rtol=1e-5)
    assert fold_batchnorm(seeded(ConvLayer))[1] == []  # without example inputs: Sequential pairs only
