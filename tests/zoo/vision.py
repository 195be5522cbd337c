"""Zoo: small-config vision networks edge users ship, built in code with seeded weights (no downloads).

Each factory returns (module, example inputs) as an `edgeq convert tests.zoo.vision:NAME` source would. Images
are 1x3x32x32 and channels stay at 8-32 so one conversion takes well under a second of torch time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from tests.zoo.seeding import seeded

IMAGE = (1, 3, 32, 32)


def _image(shape=IMAGE):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(1)),)


def _conv_bn(cin, cout, kernel=3, stride=1, groups=1, act=nn.ReLU6):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """MobileNetV3's SE: global pool -> reduce -> ReLU -> expand -> hard-sigmoid gate."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        gate = F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * gate


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: expand 1x1 -> depthwise 3x3 -> (SE) -> project 1x1, residual when shapes match."""

    def __init__(self, cin, cout, expand, stride=1, act=nn.ReLU6, se=False):
        super().__init__()
        hidden = cin * expand
        self.residual = stride == 1 and cin == cout
        self.expand = _conv_bn(cin, hidden, 1, act=act)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden, max(hidden // 4, 4)) if se else nn.Identity()
        self.project = _conv_bn(hidden, cout, 1, act=None)

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNet(nn.Module):
    def __init__(self, act, se, classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, 2, act=act)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 2, act=act, se=se),  # residual
            InvertedResidual(16, 24, 3, stride=2, act=act, se=se),  # strided, no residual
        )
        self.head = nn.Linear(24, classes)

    def forward(self, pixels):
        return {"logits": self.head(self.blocks(self.stem(pixels)).mean((2, 3)))}


def mobilenet_v2():
    """ReLU6 inverted residuals with depthwise convolutions."""
    return seeded(MobileNet, nn.ReLU6, se=False), _image()


def mobilenet_v3():
    """Hard-swish inverted residuals with squeeze-excite (hard-sigmoid gate)."""
    return seeded(MobileNet, nn.Hardswish, se=True), _image()


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, 3, stride, act=nn.ReLU), _conv_bn(cout, cout, 3, act=None))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else _conv_bn(cin, cout, 1, stride, act=None)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 16, 3, act=nn.ReLU), nn.MaxPool2d(3, 2, 1))
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, pixels):
        return {"logits": self.fc(torch.flatten(self.pool(self.layers(self.stem(pixels))), 1))}


def resnet():
    """Basic residual blocks, max pooling stem, projection shortcut, adaptive average pooling."""
    return seeded(ResNet), _image()


class EfficientNetLite(nn.Module):
    """EfficientNet-lite: MBConv blocks with ReLU6 and no squeeze-excite (the lite variants drop SE and swish
    for integer accelerators), a 5x5 depthwise stage, a 1x1 head conv before pooling."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = _conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(
            _conv_bn(16, 16, 3, groups=16), _conv_bn(16, 8, 1, act=None),  # MBConv1: no expansion
            InvertedResidual(8, 16, 4, stride=2),
            _conv_bn(16, 64, 1), _conv_bn(64, 64, 5, groups=64), _conv_bn(64, 16, 1, act=None),  # 5x5 depthwise
        )
        self.head = _conv_bn(16, 32, 1)
        self.fc = nn.Linear(32, classes)

    def forward(self, pixels):
        return {"logits": self.fc(self.head(self.blocks(self.stem(pixels))).mean((2, 3)))}


def efficientnet_lite():
    return seeded(EfficientNetLite), _image()


class UNet(nn.Module):
    """Two-level encoder-decoder: max-pool down, bilinear and transposed-conv up, skip concatenation."""

    def __init__(self, classes=3):
        super().__init__()
        self.enc1 = _conv_bn(3, 8, act=nn.ReLU)
        self.enc2 = _conv_bn(8, 16, act=nn.ReLU)
        self.bottom = _conv_bn(16, 16, act=nn.ReLU)
        self.up2 = nn.ConvTranspose2d(16, 16, 2, stride=2)
        self.dec2 = _conv_bn(32, 8, act=nn.ReLU)
        self.dec1 = _conv_bn(16, 8, act=nn.ReLU)
        self.out = nn.Conv2d(8, classes, 1)

    def forward(self, pixels):
        e1 = self.enc1(pixels)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        up1 = F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False)
        return {"mask": self.out(self.dec1(torch.cat([up1, e1], dim=1)))}


def unet():
    return seeded(UNet), _image()


class ViT(nn.Module):
    """Patch embedding conv, class token, learned positions, pre-norm encoder blocks written out (no
    nn.MultiheadAttention: the torch-native attention is the zoo's nn.TransformerEncoder entry)."""

    def __init__(self, dim=32, depth=1, heads=2, patch=8, classes=10):
        super().__init__()
        tokens = (IMAGE[-1] // patch) ** 2 + 1
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, pixels):
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return {"logits": self.head(self.norm(x[:, 0]))}


class ViTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attention.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


def vit():
    return seeded(ViT), _image()


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> channels-last LayerNorm -> 4x pointwise MLP (GELU) -> layer scale -> residual."""

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dim=16, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)  # patchify stem
        self.blocks = nn.Sequential(ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, pixels):
        return {"logits": self.head(self.norm(self.blocks(self.stem(pixels)).mean((2, 3))))}


def convnext():
    return seeded(ConvNeXt), _image()
