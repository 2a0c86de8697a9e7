"""Image models built locally (no torchvision import, no download): torchvision's ResNet and
MobileNetV2 architectures layer for layer, an EfficientNet-Lite0-shaped net (MBConv with ReLU6, no
squeeze-excite), and a small CNN. Random weights with BatchNorm statistics settled on random images
(`settle_batchnorm`), so activations keep a realistic scale through every block; the speed of a
model does not depend on its weights, and fidelity figures on them are labelled as such."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["efficientnet_lite0", "mobilenet_v2", "resnet18", "resnet50", "settle_batchnorm", "small_cnn"]


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU6) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, k: int = 3) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(cin, hidden, 1))
        layers += [conv_bn_act(hidden, hidden, k, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]  # fmt: skip
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _mbnet(settings, stem: int, last: int, num_classes: int, dropout: float) -> nn.Module:
    features: list[nn.Module] = [conv_bn_act(3, stem, 3, 2)]
    cin = stem
    for t, c, n, s, k in settings:
        for i in range(n):
            features.append(InvertedResidual(cin, c, s if i == 0 else 1, t, k))
            cin = c
    features.append(conv_bn_act(cin, last, 1))
    model = nn.Sequential()
    model.features = nn.Sequential(*features)
    model.pool = nn.AdaptiveAvgPool2d(1)
    model.flatten = nn.Flatten(1)
    model.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
    return model


def mobilenet_v2(num_classes: int = 1000) -> nn.Module:
    """torchvision's mobilenet_v2 (width 1.0): 3.5 M parameters, 52 convs (17 depthwise)."""
    settings = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 32, 3, 2, 3), (6, 64, 4, 2, 3),
                (6, 96, 3, 1, 3), (6, 160, 3, 2, 3), (6, 320, 1, 1, 3)]  # fmt: skip
    return _init(_mbnet(settings, 32, 1280, num_classes, 0.2))


def efficientnet_lite0(num_classes: int = 1000) -> nn.Module:
    """EfficientNet-Lite0's shape: MBConv blocks with 3x3 and 5x5 depthwise convs, ReLU6, no
    squeeze-excite, stem 32 and head 1280 (4.7 M parameters)."""
    settings = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
                (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]  # fmt: skip
    return _init(_mbnet(settings, 32, 1280, num_classes, 0.2))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet (v1.5: stride on the 3x3 conv of a bottleneck)."""

    def __init__(self, block, layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, 64, layers[0])
        self.layer2 = self._layer(block, 128, layers[1], 2)
        self.layer3 = self._layer(block, 256, layers[2], 2)
        self.layer4 = self._layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _layer(self, block, planes: int, n: int, stride: int = 1) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))  # fmt: skip
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> nn.Module:
    return _init(ResNet(BasicBlock, [2, 2, 2, 2], num_classes))


def resnet50(num_classes: int = 1000) -> nn.Module:
    return _init(ResNet(Bottleneck, [3, 4, 6, 3], num_classes))


def small_cnn(num_classes: int = 10, channels: int = 1, width: int = 32) -> nn.Module:
    """A small classifier for 8x8..32x32 images (the digits test): 3 conv blocks and a linear head."""
    return nn.Sequential(
        conv_bn_act(channels, width, 3, act=nn.ReLU), conv_bn_act(width, width, 3, act=nn.ReLU),
        nn.MaxPool2d(2), conv_bn_act(width, 2 * width, 3, act=nn.ReLU), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
        nn.Linear(2 * width, num_classes),
    )  # fmt: skip


def _init(model: nn.Module) -> nn.Module:
    """torchvision's initialization: kaiming-normal convs (fan_out), BatchNorm 1/0, small linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


@torch.no_grad()
def settle_batchnorm(model: nn.Module, size: int = 224, batches: int = 3, batch: int = 8, seed: int = 0,
                     residual_scale: float = 0.5) -> nn.Module:  # fmt: skip
    """Gives a random-weight model the activation statistics of a trained one, and returns it in eval
    mode: random images run through it in train mode (BatchNorm momentum None: a plain average) so
    every BatchNorm holds the mean and variance of its real input (torchvision's bare init keeps
    mean 0 / var 1, under which MobileNetV2's logits shrink to ~1e-10); then the last BatchNorm of
    every residual branch has its scale multiplied by residual_scale. At 1.0 each block adds a
    unit-variance branch to the stream and the random net turns chaotic (a 1% change of the input
    changes the logits by tens of percent: int8 SQNR 6-20 dB); trained nets keep their branches a
    fraction of the stream (zero-init-residual training starts them at 0). Measured at 64x64 with
    fastinfer.quantize: residual_scale 0.5 gives 25-33 dB, 0.3 gives 30-36 dB."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in range(batches):
        model(torch.randn(batch, 3, size, size, generator=g))
    for m in bns:
        m.momentum = 0.1
    for m in model.modules():
        last = None
        if isinstance(m, Bottleneck):
            last = m.bn3
        elif isinstance(m, BasicBlock):
            last = m.bn2
        elif isinstance(m, InvertedResidual) and m.use_res_connect:
            last = m.conv[-1]
        if last is not None:
            last.weight.mul_(residual_scale)
    return model.eval()
