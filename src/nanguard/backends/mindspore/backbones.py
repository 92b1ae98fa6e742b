"""The backbones of the MindSpore Faster R-CNN (`model.py`): a body and an FPN with torchvision's module
paths, so that `convert.py` moves weights by renaming.

- `Body`: mobilenet_v3_large's features with BatchNorm, returning four maps (strides 4 to 32): `tiny`;
- `ResNet50Body`: torchvision's resnet50 trunk (BatchNorm, or FrozenBatchNorm2d's fixed statistics):
  `resnet50_fpn`;
- `FPN`: torchvision's FeaturePyramidNetwork with LastLevelMaxPool (5 maps, strides 4 to 64).
"""

from __future__ import annotations

from mindspore import nn, ops
from mindspore.common.initializer import HeNormal, HeUniform

# torchvision's mobilenet_v3_large: (input, kernel, expanded, output, SE, activation, stride)
MOBILENET_V3_LARGE = (
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
)
# the features' indices returned to the FPN (the block before each strided one, and the last conv)
TINY_RETURNED = (3, 6, 12, 16)


def _divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, pad_mode="pad", padding=(k - 1) // 2, group=groups,
                     has_bias=bias, weight_init=HeNormal(mode="fan_out", nonlinearity="relu"),
                     bias_init="zeros")


class ConvNormAct(nn.SequentialCell):
    """torchvision's Conv2dNormActivation: "0" conv (no bias), "1" BatchNorm, "2" activation (or none)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: str | None = "RE") -> None:
        layers = [_conv(cin, cout, k, stride, groups), nn.BatchNorm2d(cout, eps=1e-5, momentum=0.9)]
        if act == "RE":
            layers.append(nn.ReLU())
        elif act == "HS":
            layers.append(nn.HSwish())
        super().__init__(layers)


class SqueezeExcitation(nn.Cell):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1, has_bias=True, weight_init=HeNormal(mode="fan_out"))
        self.fc2 = nn.Conv2d(squeeze, channels, 1, has_bias=True, weight_init=HeNormal(mode="fan_out"))
        self.relu, self.gate = nn.ReLU(), nn.HSigmoid()

    def construct(self, x):
        scale = self.gate(self.fc2(self.relu(self.fc1(x.mean(axis=(2, 3), keep_dims=True)))))
        return scale * x


class InvertedResidual(nn.Cell):
    def __init__(self, cin: int, k: int, expanded: int, cout: int, se: bool, act: str, stride: int) -> None:
        super().__init__()
        layers = []
        if expanded != cin:
            layers.append(ConvNormAct(cin, expanded, 1, act=act))
        layers.append(ConvNormAct(expanded, expanded, k, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcitation(expanded, _divisible(expanded // 4, 8)))
        layers.append(ConvNormAct(expanded, cout, 1, act=None))
        self.block = nn.SequentialCell(layers)
        self.residual = stride == 1 and cin == cout

    def construct(self, x):
        out = self.block(x)
        return out + x if self.residual else out


class Body(nn.Cell):
    """mobilenet_v3_large's features "0".."16"; returns the maps of `TINY_RETURNED` (strides 4 to 32)."""

    def __init__(self) -> None:
        super().__init__()
        layers = [ConvNormAct(3, 16, 3, 2, act="HS")]
        layers += [InvertedResidual(*conf) for conf in MOBILENET_V3_LARGE]
        layers.append(ConvNormAct(160, 960, 1, act="HS"))
        self.layers = nn.CellList(layers)
        self.out_channels = (24, 40, 112, 960)

    def construct(self, x):
        outs = ()
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in TINY_RETURNED:
                outs = outs + (x,)
        return outs


class FPN(nn.Cell):
    """torchvision's FeaturePyramidNetwork with LastLevelMaxPool: 4 maps in, 5 out."""

    def __init__(self, in_channels: tuple[int, ...], channels: int) -> None:
        super().__init__()
        init = HeUniform(negative_slope=1)
        self.inner_blocks = nn.CellList([nn.SequentialCell([nn.Conv2d(c, channels, 1, has_bias=True, weight_init=init)])
                                         for c in in_channels])
        self.layer_blocks = nn.CellList([nn.SequentialCell([nn.Conv2d(channels, channels, 3, pad_mode="pad", padding=1,
                                                                      has_bias=True, weight_init=init)])
                                         for _ in in_channels])
        self.pool = nn.MaxPool2d(kernel_size=1, stride=2)

    def construct(self, features):
        last = self.inner_blocks[3](features[3])
        results = (self.layer_blocks[3](last),)
        for idx in (2, 1, 0):
            lateral = self.inner_blocks[idx](features[idx])
            top_down = ops.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            last = lateral + top_down
            results = (self.layer_blocks[idx](last),) + results
        # torchvision's max_pool2d(kernel 1, stride 2); a strided slice's backward crashes PyNative (2.10, CPU)
        return results + (self.pool(results[-1]),)


class Bottleneck(nn.Cell):
    """torchvision's ResNet Bottleneck (stride on the 3x3 conv): conv1/bn1, conv2/bn2, conv3/bn3, and a
    `downsample` (conv, BatchNorm) where the shape changes."""

    def __init__(self, cin: int, width: int, stride: int, frozen: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, width, 1), _norm(width, frozen)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), _norm(width, frozen)
        self.conv3, self.bn3 = _conv(width, width * 4, 1), _norm(width * 4, frozen)
        self.relu = nn.ReLU()
        self.has_downsample = stride != 1 or cin != width * 4
        if self.has_downsample:
            self.downsample = nn.SequentialCell([_conv(cin, width * 4, 1, stride), _norm(width * 4, frozen)])

    def construct(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.has_downsample else x
        return self.relu(out + identity)


class ResNet50Body(nn.Cell):
    """torchvision's resnet50 trunk (conv1, bn1, maxpool, layer1..layer4), returning layer1..layer4 (strides
    4 to 32). `frozen`: torchvision's FrozenBatchNorm2d (fixed statistics and affine, nothing trained)."""

    def __init__(self, frozen: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, pad_mode="pad", padding=3, has_bias=False,
                               weight_init=HeNormal(mode="fan_out", nonlinearity="relu"))
        self.bn1 = _norm(64, frozen)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="pad", padding=1)
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            cells = []
            for i in range(blocks):
                cells.append(Bottleneck(cin, width, stride if i == 0 else 1, frozen))
                cin = width * 4
            layers.append(nn.SequentialCell(cells))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = (256, 512, 1024, 2048)

    def construct(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return c2, c3, c4, self.layer4(c4)


def _norm(channels: int, frozen: bool) -> nn.BatchNorm2d:
    """BatchNorm2d as torchvision's (eps 1e-5, momentum 0.1); `frozen`: FrozenBatchNorm2d's behaviour
    (the moving statistics always, gamma and beta not trained)."""
    norm = nn.BatchNorm2d(channels, eps=1e-5, momentum=0.9, use_batch_statistics=False if frozen else None)
    if frozen:
        norm.gamma.requires_grad = False
        norm.beta.requires_grad = False
    return norm


class Backbone(nn.Cell):
    def __init__(self, name: str, channels: int, trainable_bn: bool) -> None:
        super().__init__()
        self.body = Body() if name == "tiny" else ResNet50Body(frozen=not trainable_bn)
        self.fpn = FPN(self.body.out_channels, channels)

    def construct(self, x):
        return self.fpn(self.body(x))
