"""Built-in models with an early-exit head after every stage.

Each forward returns a tuple of logits, one per exit, shallow -> deep; the last is the
backbone's own classifier. AlexNet and VGG16 are chains (the paper's models), ResNet-18
and the Inception net are DAGs. All take `width` (channel multiplier), `in_channels` and
`num_classes`; any input of at least 28x28 works (pools are ceil-mode / adaptive).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _c(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


def exit_head(in_ch: int, num_classes: int, hidden: int) -> nn.Sequential:
    """A small conv-pool-linear classifier (BranchyNet-style side branch)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(hidden, num_classes),
    )


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    ]


class AlexNet(nn.Module):
    """CIFAR-size AlexNet (5 conv + 3 fc) with exits after conv stages 1, 2 and 3."""

    def __init__(self, width: float = 1.0, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (_c(c, width) for c in (64, 192, 384, 256, 256))
        fc = _c(1024, width)
        self.stage1 = nn.Sequential(*_conv_bn_relu(in_channels, c1, 5), nn.MaxPool2d(2, ceil_mode=True))
        self.stage2 = nn.Sequential(*_conv_bn_relu(c1, c2, 5), nn.MaxPool2d(2, ceil_mode=True))
        self.stage3 = nn.Sequential(*_conv_bn_relu(c2, c3), *_conv_bn_relu(c3, c4))
        self.stage4 = nn.Sequential(*_conv_bn_relu(c4, c5), nn.MaxPool2d(2, ceil_mode=True))
        self.exit1 = exit_head(c1, num_classes, _c(32, width))
        self.exit2 = exit_head(c2, num_classes, _c(64, width))
        self.exit3 = exit_head(c4, num_classes, _c(64, width))
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(c5 * 4, fc),
            nn.ReLU(inplace=False),
            nn.Linear(fc, fc),
            nn.ReLU(inplace=False),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stage1(x)
        e1 = self.exit1(x)
        x = self.stage2(x)
        e2 = self.exit2(x)
        x = self.stage3(x)
        e3 = self.exit3(x)
        x = self.stage4(x)
        return e1, e2, e3, self.classifier(x)


class VGG16(nn.Module):
    """CIFAR-size VGG16 with BatchNorm; exits after each of the first four of five stages."""

    CFG = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(self, width: float = 1.0, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        stages, heads = [], []
        cin = in_channels
        for i, stage in enumerate(self.CFG):
            layers: list[nn.Module] = []
            for c in stage:
                layers += _conv_bn_relu(cin, _c(c, width))
                cin = _c(c, width)
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            stages.append(nn.Sequential(*layers))
            if i < len(self.CFG) - 1:
                heads.append(exit_head(cin, num_classes, _c(64, width)))
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(heads)
        fc = _c(512, width)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(cin, fc),
            nn.ReLU(inplace=False),
            nn.Linear(fc, num_classes),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.exits):
                outs.append(self.exits[i](x))
        outs.append(self.classifier(x))
        return tuple(outs)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (residual DAG) with exits after layer1, layer2 and layer3.

    stem="cifar" (3x3 conv, for 28-32 px inputs) or "imagenet" (7x7/2 conv + max-pool, for
    camera-size inputs such as 224 px, where mid-network tensors become smaller than the input).

    stem="patch4" (camera frames, built to be partitioned): a 4x4 stride-4 patchify conv, and the
    stages downsample early (strides 2, 2, 2, 1 instead of 1, 2, 2, 2; the same output stride 32
    as "imagenet", so 224 px ends at 7x7). Every stage then halves its output tensor (channels x2,
    area /4), so each boundary up to layer3 is smaller than the one before, while layer4 keeps
    the 7x7 map and holds the compute a late cut saves the device; `tail` widens layer4 further
    (channels = 512 · width · tail; default 1, any stem).
    """

    STEMS = ("cifar", "imagenet", "patch4")

    def __init__(
        self, width: float = 1.0, in_channels: int = 3, num_classes: int = 10, stem: str = "cifar", tail: float = 1.0
    ) -> None:
        super().__init__()
        if stem not in self.STEMS:
            raise ValueError(f"stem: expected one of {', '.join(map(repr, self.STEMS))}, got {stem!r}")
        if not isinstance(tail, (int, float)) or not tail > 0:
            raise ValueError(f"tail: expected a number > 0 (layer4 width factor), got {tail!r}")
        chans = [_c(c, width) for c in (64, 128, 256)] + [_c(512, width * tail)]
        strides = (1, 2, 2, 2)
        if stem == "cifar":
            self.stem = nn.Sequential(*_conv_bn_relu(in_channels, chans[0]))
        elif stem == "imagenet":
            self.stem = nn.Sequential(*_conv_bn_relu(in_channels, chans[0], 7, stride=2), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(*_conv_bn_relu(in_channels, chans[0], 4, stride=4, padding=0))
            strides = (2, 2, 2, 1)
        layers, cin = [], chans[0]
        for c, stride in zip(chans, strides, strict=True):
            layers.append(nn.Sequential(BasicBlock(cin, c, stride), BasicBlock(c, c, 1)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.exit1 = exit_head(chans[0], num_classes, _c(32, width))
        self.exit2 = exit_head(chans[1], num_classes, _c(64, width))
        self.exit3 = exit_head(chans[2], num_classes, _c(64, width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans[3], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.layer1(self.stem(x))
        e1 = self.exit1(x)
        x = self.layer2(x)
        e2 = self.exit2(x)
        x = self.layer3(x)
        e3 = self.exit3(x)
        x = self.layer4(x)
        return e1, e2, e3, self.fc(torch.flatten(self.pool(x), 1))


class InceptionModule(nn.Module):
    """GoogLeNet inception block: four parallel branches concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn_relu(cin, c1, 1))
        self.b2 = nn.Sequential(*_conv_bn_relu(cin, c3r, 1), *_conv_bn_relu(c3r, c3))
        self.b3 = nn.Sequential(*_conv_bn_relu(cin, c5r, 1), *_conv_bn_relu(c5r, c5), *_conv_bn_relu(c5, c5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_conv_bn_relu(cin, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    """GoogLeNet-style DAG (9 inception modules, CIFAR stem) with exits after 3b, 4c and 4e."""

    SPEC = {
        "a3": (64, 96, 128, 16, 32, 32), "b3": (128, 128, 192, 32, 96, 64),
        "a4": (192, 96, 208, 16, 48, 64), "b4": (160, 112, 224, 24, 64, 64),
        "c4": (128, 128, 256, 24, 64, 64), "d4": (112, 144, 288, 32, 64, 64),
        "e4": (256, 160, 320, 32, 128, 128), "a5": (256, 160, 320, 32, 128, 128),
        "b5": (384, 192, 384, 48, 128, 128),
    }  # fmt: skip

    def __init__(self, width: float = 1.0, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, _c(192, width)))
        cin = _c(192, width)
        mods = {}
        for name, spec in self.SPEC.items():
            m = InceptionModule(cin, *(_c(c, width) for c in spec))
            mods[name] = m
            cin = m.out_channels
        self.a3, self.b3 = mods["a3"], mods["b3"]
        self.a4, self.b4, self.c4, self.d4, self.e4 = (mods[k] for k in ("a4", "b4", "c4", "d4", "e4"))
        self.a5, self.b5 = mods["a5"], mods["b5"]
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.exit1 = exit_head(self.b3.out_channels, num_classes, _c(64, width))
        self.exit2 = exit_head(self.c4.out_channels, num_classes, _c(64, width))
        self.exit3 = exit_head(self.e4.out_channels, num_classes, _c(64, width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.b3(self.a3(self.stem(x)))
        e1 = self.exit1(x)
        x = self.c4(self.b4(self.a4(self.pool(x))))
        e2 = self.exit2(x)
        x = self.e4(self.d4(x))
        e3 = self.exit3(x)
        x = self.b5(self.a5(self.pool(x)))
        return e1, e2, e3, self.head(x)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "alexnet": AlexNet,
    "vgg16": VGG16,
    "resnet18": ResNet18,
    "inception": Inception,
}
