"""Small CNNs for the distillation experiments: the paper's DenseNet-style teacher
and AllCNN-style student, and CIFAR-style ResNets; and a user's own models,
named by the function that builds them.

Every model here exposes ``feature_stages``, the module paths of its stage
outputs (finest grid first); the default SRM layer pairs match these in order.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable

import torch
from torch import Tensor, nn

from .config import ConfigError, error_line

__all__ = [
    "DenseNet",
    "AllCNN",
    "ResNet",
    "ARCHITECTURES",
    "build_model",
    "default_layer_pairs",
]


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _scaled(channels: int, width: float) -> int:
    return max(4, int(round(channels * width)))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (bottleneck) then BN-ReLU-Conv3x3, concatenated to the input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.AvgPool2d(2),
        )


class DenseNet(nn.Module):
    """DenseNet-BC: three dense blocks (``block1..3``) joined by compressing
    transitions that halve the grid, like the paper's DenseNet teacher."""

    feature_stages = ("block1", "block2", "block3")

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        growth: int = 12,
        block_layers: tuple[int, int, int] = (6, 6, 6),
    ) -> None:
        super().__init__()
        channels = 2 * growth
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        for i, layers in enumerate(block_layers, start=1):
            block = nn.Sequential()
            for j in range(layers):
                block.add_module(f"layer{j + 1}", _DenseLayer(channels, growth))
                channels += growth
            self.add_module(f"block{i}", block)
            if i < len(block_layers):
                self.add_module(f"transition{i}", _Transition(channels, channels // 2))
                channels //= 2
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, num_classes),
        )
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.transition1(self.block1(x))
        x = self.transition2(self.block2(x))
        return self.head(self.block3(x))


# --------------------------------------------------------------------------- AllCNN


class AllCNN(nn.Module):
    """All-convolutional net (Springenberg et al.) with BatchNorm: strided
    convolutions instead of pooling, a 1x1-conv classifier and global pooling.
    ``channels`` are the widths of the three stages (96, 192, 192 at full width)."""

    feature_stages = ("stage1", "stage2", "stage3")

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        channels: tuple[int, int, int] = (96, 192, 192),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.stage1 = nn.Sequential(_conv_bn_relu(in_channels, c1), _conv_bn_relu(c1, c1))
        self.stage2 = nn.Sequential(
            _conv_bn_relu(c1, c2, stride=2), _conv_bn_relu(c2, c2), _conv_bn_relu(c2, c2)
        )
        self.stage3 = nn.Sequential(
            _conv_bn_relu(c2, c3, stride=2), _conv_bn_relu(c3, c3), _conv_bn_relu(c3, c3, 1)
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Conv2d(c3, num_classes, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stage3(self.stage2(self.stage1(x))))


# --------------------------------------------------------------------------- ResNet


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): three stages
    ``layer1..3`` of ``blocks_per_stage`` basic blocks at widths w, 2w, 4w."""

    feature_stages = ("layer1", "layer2", "layer3")

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        blocks_per_stage: int = 3,
        base_width: int = 16,
    ) -> None:
        super().__init__()
        widths = (base_width, 2 * base_width, 4 * base_width)
        self.stem = _conv_bn_relu(in_channels, widths[0])
        cin = widths[0]
        for i, cout in enumerate(widths, start=1):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(_BasicBlock(cin, cout, stride=2 if (i > 1 and j == 0) else 1))
                cin = cout
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(x)


# --------------------------------------------------------------------------- registry

ModelBuilder = Callable[[int, int, float], nn.Module]


def _resnet(depth: int) -> ModelBuilder:
    def build(num_classes: int, in_channels: int, width: float) -> nn.Module:
        return ResNet(num_classes, in_channels, (depth - 2) // 6, _scaled(16, width))

    return build


#: name -> builder(num_classes, in_channels, width multiplier)
ARCHITECTURES: dict[str, ModelBuilder] = {
    "densenet": lambda n, c, w: DenseNet(n, c, growth=max(2, int(round(12 * w)))),
    "allcnn": lambda n, c, w: AllCNN(
        n, c, channels=(_scaled(96, w), _scaled(192, w), _scaled(192, w))
    ),
    **{f"resnet{d}": _resnet(d) for d in (8, 14, 20, 32, 56)},
}


def build_model(name: str, num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """Instantiate a registered architecture, or a user's model named
    ``"package.module:function"``: the function is imported and called like
    the registered builders, ``function(num_classes, in_channels, width)``,
    and must return an ``nn.Module``. Unknown names, and a function that
    cannot be imported, called or returns something else, raise
    :class:`ConfigError`."""
    if width <= 0:
        raise ConfigError(f"width multiplier must be > 0, got {width}")
    if ":" in name:
        return _build_imported(name, num_classes, in_channels, width)
    if name not in ARCHITECTURES:
        close = difflib.get_close_matches(name, ARCHITECTURES, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"unknown architecture {name!r}{hint}; available: {', '.join(ARCHITECTURES)}, "
            "or package.module:function for a model of your own"
        )
    return ARCHITECTURES[name](num_classes, in_channels, width)


def _build_imported(spec: str, num_classes: int, in_channels: int, width: float) -> nn.Module:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"model {spec!r} must look like package.module:function")
    try:
        builder = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises as it runs
        raise ConfigError(
            f"model {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: "
            f"{error_line(exc)})"
        ) from exc
    for part in attribute.split("."):
        if not hasattr(builder, part):
            raise ConfigError(f"model {spec!r}: {module_name!r} has no {attribute!r}")
        builder = getattr(builder, part)
    if not callable(builder):
        raise ConfigError(f"model {spec!r}: {attribute!r} is not callable")
    try:
        model = builder(num_classes, in_channels, width)
    except Exception as exc:  # the user's code, reported in one line; --debug shows it
        raise ConfigError(
            f"model {spec!r}: {attribute}({num_classes}, {in_channels}, {width}) raised "
            f"{type(exc).__name__}: {error_line(exc)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model {spec!r}: {attribute} returned {type(model).__name__}, "
            "expected a torch.nn.Module"
        )
    return model


def default_layer_pairs(teacher: nn.Module, student: nn.Module) -> dict[str, str]:
    """Pair the teacher's and student's ``feature_stages`` in order."""
    t_stages = getattr(teacher, "feature_stages", None)
    s_stages = getattr(student, "feature_stages", None)
    if not t_stages or not s_stages:
        raise ConfigError("these models declare no feature_stages; pass --layer-pairs")
    return dict(zip(t_stages, s_stages))
