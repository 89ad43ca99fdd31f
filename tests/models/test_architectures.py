"""The shapes people compress, written here (no torchvision): ResNet-18 at ImageNet shapes, a
MobileNetV2 inverted-residual stack, VGG-11 with batch norm. For each, the layers tdsearch
replaces and the ones it leaves dense (with the reason), and that compressing every replaced
layer at full rank reproduces the dense model's output. (ResNeXt, a 1-D conv net, an aliased
MLP and an embedding + LSTM text model have tests of their own in tests/tensor/.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tdsearch.tensor import LayerRanks, RankTable, compress, survey
from tdsearch.tensor.compress import make_spec, rank_limits


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """He et al. 2016, ImageNet: 7x7 stem, max-pool, four stages of two basic blocks."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 (Sandler et al. 2018): 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 6):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden))
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = nn.functional.relu6(self.expand(x))
        y = self.project(nn.functional.relu6(self.depthwise(y)))
        return x + y if self.residual else y


class MobileNetV2Stack(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32))
        self.blocks = nn.Sequential(
            InvertedResidual(32, 16, 1, expand=1),
            InvertedResidual(16, 24, 2),
            InvertedResidual(24, 24, 1),
            InvertedResidual(24, 32, 2),
        )
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.blocks(nn.functional.relu6(self.stem(x))).mean((2, 3)))


class VGG11BN(nn.Module):
    """VGG-11 with batch norm (Simonyan & Zisserman 2015) at CIFAR shapes."""

    def __init__(self, classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def full_rank_table(layers, conv_format: str) -> RankTable:
    entries = []
    for info in layers:
        fmt = conv_format if info.kind == "conv" else "svd"
        spec = make_spec(info, fmt)
        entries.append((info.name, LayerRanks(fmt, rank_limits(info, spec), spec.modes)))
    return RankTable(entries)


CASES = {
    "resnet18": (ResNet18, (3, 224, 224), 21, 0, "tt"),
    "mobilenetv2": (MobileNetV2Stack, (3, 32, 32), 10, 4, "tucker2"),
    "vgg11bn": (VGG11BN, (3, 32, 32), 11, 0, "svd"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_model_compresses_every_layer_it_lists_and_equals_itself_at_full_rank(name):
    cls, shape, replaced, skipped_count, conv_format = CASES[name]
    torch.manual_seed(0)
    model = cls().double().eval()
    layers, skipped = survey(model, shape)
    assert len(layers) == replaced and len(skipped) == skipped_count
    assert all("depthwise" in s.reason for s in skipped)
    compact = compress(model, full_rank_table(layers, conv_format))
    x = torch.randn(1 if name == "resnet18" else 2, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert (compact(x) - model(x)).norm() / model(x).norm() < 1e-10
