"""Reference model zoo for plinio-onnx tests.

Small reference architectures written in plain PyTorch.  Each model is exported
to ONNX by ``models/export.py`` and the resulting ``models/<name>.onnx`` files
are the inputs used by the test-suite.

Every entry of :data:`ZOO` is a :class:`ZooEntry` with

* ``name``        -- registry key, also the ONNX file stem,
* ``build``       -- zero-argument callable returning a freshly initialised
                     ``nn.Module`` (use :func:`make` for a seeded, eval-mode
                     model with non-trivial BatchNorm statistics),
* ``input_shape`` -- input shape including batch dimension 1,
* ``description`` -- one-line origin/description,
* ``preserve_bn`` -- whether the exporter must keep explicit
                     ``BatchNormalization`` nodes (i.e. must not fold BN into
                     the preceding Conv).

Only ``torch`` is needed to import this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_SEED = 0


# ---------------------------------------------------------------------------
# MLPerf Tiny: image classification (ResNet-8, CIFAR-10)
# ---------------------------------------------------------------------------
class _ResStack(nn.Module):
    """One residual stack of the MLPerf Tiny ResNet-8.

    conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus a shortcut that is the
    identity when ``stride == 1`` and a 1x1 conv (with bias, no BN, as in the
    reference Keras model) when ``stride == 2``; Add, then ReLU.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Conv2d(c_in, c_out, 1, stride=stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet8(nn.Module):
    """MLPerf Tiny image-classification ResNet-8 (CIFAR-10).

    Origin: mlcommons/tiny, ``benchmark/training/image_classification``
    (``keras_model.py::resnet_v1_eembc``).  Input ``1x3x32x32``.

    conv3x3(16) - BN - ReLU, then three residual stacks with 16/32/64 channels
    (the 2nd and 3rd downsample with stride 2 and use a 1x1 conv shortcut),
    AvgPool 8x8, flatten, FC 10.  ~78k parameters.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=1, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.stack1 = _ResStack(16, 16, 1)
        self.stack2 = _ResStack(16, 32, 2)
        self.stack3 = _ResStack(32, 64, 2)
        self.pool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stack3(self.stack2(self.stack1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


# ---------------------------------------------------------------------------
# MLPerf Tiny: keyword spotting (DS-CNN)
# ---------------------------------------------------------------------------
class DSCNN(nn.Module):
    """MLPerf Tiny keyword-spotting DS-CNN (small).

    Origin: mlcommons/tiny, ``benchmark/training/keyword_spotting``
    (``keras_model.py``, model ``ds_cnn``), itself from ARM's
    "Hello Edge" KWS models.  Input ``1x1x49x10`` (49 frames x 10 MFCC).

    conv(10x4, stride 2, 64 ch) - BN - ReLU, four depthwise-separable blocks
    (dw 3x3 - BN - ReLU - pw 1x1 64 - BN - ReLU), AvgPool 25x5, flatten,
    FC 12.  The reference uses TF "same" padding; the symmetric padding (5, 1)
    used here gives the same 25x5 feature map.  Dropout is omitted (identity
    in inference).  ~23k parameters.
    """

    def __init__(self, num_classes: int = 12, channels: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, (10, 4), stride=2, padding=(5, 1), bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        blocks: List[nn.Module] = []
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AvgPool2d((25, 5))
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


# ---------------------------------------------------------------------------
# MLPerf Tiny: visual wake words (MobileNetV1, width 0.25)
# ---------------------------------------------------------------------------
def _conv_bn_relu(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


class MobileNetV1(nn.Module):
    """MLPerf Tiny visual-wake-words MobileNetV1, width multiplier 0.25.

    Origin: mlcommons/tiny, ``benchmark/training/visual_wake_words``
    (``vww_model.py::mobilenet_v1``).  Input ``1x3x96x96``, 2 classes.

    conv3x3 s2 (8 ch) then 13 depthwise-separable blocks (dw 3x3 - BN - ReLU -
    pw 1x1 - BN - ReLU) with output channels
    16, 32(s2), 32, 64(s2), 64, 128(s2), 128 x5, 256(s2), 256;
    global average pool, flatten, FC 2.  ~0.2M parameters.
    """

    # (out_channels at width 1.0, stride) of the 13 dw-separable blocks
    _CFG: Sequence[Tuple[int, int]] = (
        (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
        (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
    )

    def __init__(self, num_classes: int = 2, alpha: float = 0.25):
        super().__init__()
        c = int(32 * alpha)
        layers: List[nn.Module] = [_conv_bn_relu(3, c, 3, stride=2)]
        for c_out_full, s in self._CFG:
            c_out = int(c_out_full * alpha)
            layers.append(_conv_bn_relu(c, c, 3, stride=s, groups=c))  # depthwise
            layers.append(_conv_bn_relu(c, c_out, 1))  # pointwise
            c = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


# ---------------------------------------------------------------------------
# MLPerf Tiny: anomaly detection (FC autoencoder)
# ---------------------------------------------------------------------------
class FCAutoencoder(nn.Module):
    """MLPerf Tiny anomaly-detection fully-connected autoencoder.

    Origin: mlcommons/tiny, ``benchmark/training/anomaly_detection``
    (``keras_model.py``, DCASE 2020 task 2 baseline).  Input ``1x640``
    (5 frames x 128 log-mel bins).

    Dense layers 640-128-128-128-128-8-128-128-128-128-640; every hidden
    Dense is followed by BN + ReLU, the output Dense is linear.
    ~0.27M parameters.
    """

    def __init__(self, in_features: int = 640, hidden: int = 128, bottleneck: int = 8):
        super().__init__()
        dims = [in_features, hidden, hidden, hidden, hidden, bottleneck,
                hidden, hidden, hidden, hidden]
        layers: List[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU()]
        layers.append(nn.Linear(hidden, in_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------
# Temporal convolutional network
# ---------------------------------------------------------------------------
class _TemporalBlock(nn.Module):
    """Residual TCN block: two dilated Conv1d - BN (- ReLU), Add, ReLU.

    Non-causal ("same") padding keeps the sequence length; the shortcut is a
    1x1 Conv1d when the channel count changes.
    """

    def __init__(self, c_in: int, c_out: int, k: int, dilation: int):
        super().__init__()
        pad = dilation * (k - 1) // 2
        self.conv1 = nn.Conv1d(c_in, c_out, k, dilation=dilation, padding=pad)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, k, dilation=dilation, padding=pad)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.shortcut: nn.Module = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class TCN(nn.Module):
    """Small temporal convolutional network (1-D, e.g. sensor/PPG windows).

    Origin: written for this project, in the style of Bai et al. 2018
    ("An Empirical Evaluation of Generic Convolutional and Recurrent Networks
    for Sequence Modeling") / PLiNIO's TCN test models.  Input ``1x4x64``
    (4 channels x 64 time steps).

    Stem Conv1d(4->16, k3) - BN - ReLU; residual temporal blocks
    (k=3, d=1, 16->16), (k=5, d=2, 16->32, 1x1 shortcut), (k=3, d=4, 32->32);
    mean over time; Linear(32->5).  ~17k parameters.
    """

    def __init__(self, in_channels: int = 4, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv1d(in_channels, 16, 3, padding=1)
        self.stem_bn = nn.BatchNorm1d(16)
        self.blocks = nn.Sequential(
            _TemporalBlock(16, 16, k=3, dilation=1),
            _TemporalBlock(16, 32, k=5, dilation=2),
            _TemporalBlock(32, 32, k=3, dilation=4),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        x = x.mean(dim=-1)
        return self.fc(x)


# ---------------------------------------------------------------------------
# MobileNetV2-style (inverted residuals)
# ---------------------------------------------------------------------------
class _InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: [1x1 expand - BN - ReLU6] -
    dw 3x3 - BN - ReLU6 - 1x1 linear projection - BN, + input when the
    stride is 1 and channel counts match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers: List[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_res else y


class MobileNetV2Tiny(nn.Module):
    """Tiny residual MobileNetV2-style network for 32x32 images.

    Origin: written for this project after Sandler et al. 2018
    ("MobileNetV2: Inverted Residuals and Linear Bottlenecks").
    Input ``1x3x32x32``.

    conv3x3(16) - BN - ReLU6; inverted-residual stages (t, c, n, s) =
    (1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 48, 1, 1) -- the second
    block of each n=2 stage (and the first t=1 block) has a residual Add;
    conv1x1(128) - BN - ReLU6; global average pool; FC 10.  ~47k parameters.
    """

    _CFG: Sequence[Tuple[int, int, int, int]] = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 48, 1, 1))

    def __init__(self, num_classes: int = 10):
        super().__init__()
        c = 16
        layers: List[nn.Module] = [
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU6()]
        for t, c_out, n, s in self._CFG:
            for i in range(n):
                layers.append(_InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        layers += [nn.Conv2d(c, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


# ---------------------------------------------------------------------------
# DenseNet-style
# ---------------------------------------------------------------------------
class _DenseLayer(nn.Module):
    """Pre-activation dense layer: BN - ReLU - conv3x3(growth); the output is
    concatenated (channel axis) to the layer input."""

    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.relu(self.bn(x)))
        return torch.cat([x, y], dim=1)


class _Transition(nn.Module):
    """DenseNet transition: BN - ReLU - conv1x1 (compression) - AvgPool 2x2."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(F.relu(self.bn(x))))


class DenseNetTiny(nn.Module):
    """Tiny DenseNet-BC-style network for 32x32 images.

    Origin: written for this project after Huang et al. 2017
    ("Densely Connected Convolutional Networks").  Input ``1x3x32x32``.

    conv3x3(16); dense block (3 layers, growth 8) 16->40 channels;
    transition (1x1 conv 40->20, AvgPool 2); dense block (3 layers, growth 8)
    20->44; transition (44->24, AvgPool 2); BN - ReLU; global average pool;
    FC 10.  Each dense layer is BN - ReLU - conv3x3 followed by Concat with its
    input, so the BNs here are never directly after a Conv.  ~14k parameters.
    """

    def __init__(self, num_classes: int = 10, growth: int = 8, layers_per_block: int = 3):
        super().__init__()
        c = 16
        mods: List[nn.Module] = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
        for _ in range(2):
            for _ in range(layers_per_block):
                mods.append(_DenseLayer(c, growth))
                c += growth
            c_out = c // 2 + (c // 2) % 2
            mods.append(_Transition(c, c_out))
            c = c_out
        self.features = nn.Sequential(*mods)
        self.bn = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.features(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


# ---------------------------------------------------------------------------
# Transformer encoder
# ---------------------------------------------------------------------------
class _SelfAttention(nn.Module):
    """Multi-head self-attention written with plain ops.

    Linear q/k/v, reshape to ``[B, T, H, Dh]`` and transpose to heads,
    ``q @ k^T * Dh**-0.5``, Softmax, ``@ v``, merge heads, Linear output
    projection.  The sequence length is fixed at construction so every
    Reshape uses a constant shape with ``-1`` for the (symbolic) batch.
    """

    def __init__(self, dim: int, heads: int, tokens: int):
        super().__init__()
        assert dim % heads == 0
        self.heads, self.head_dim, self.tokens, self.dim = heads, dim // heads, tokens, dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        att = torch.matmul(q, k.transpose(-2, -1)) * self.scale  # [B, H, T, T]
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v)  # [B, H, T, Dh]
        y = y.transpose(1, 2).reshape(-1, self.tokens, self.dim)
        return self.proj(y)


class _EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer (as in Vaswani et al. 2017):
    x = LN(x + MHSA(x)); x = LN(x + FFN(x)), FFN = Linear - GELU - Linear."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, tokens: int):
        super().__init__()
        self.attn = _SelfAttention(dim, heads, tokens)
        self.ln1 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, ffn_dim)
        self.ff2 = nn.Linear(ffn_dim, dim)
        self.ln2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        x = self.ln2(x + self.ff2(F.gelu(self.ff1(x))))
        return x


class TransformerTiny(nn.Module):
    """Tiny transformer encoder classifier over a token sequence.

    Origin: written for this project after Vaswani et al. 2017
    ("Attention Is All You Need").  Input ``1x16x32`` (16 tokens x 32
    features, e.g. patches or sensor frames).

    Linear token embedding 32->48 plus a learned positional embedding;
    two encoder layers (4 heads, FFN 96, GELU, post-LayerNorm) with attention
    written explicitly (Linear q/k/v, Reshape/Transpose, MatMul, Softmax,
    MatMul, output Linear); mean over tokens; Linear(48->10).
    ~40k parameters.
    """

    def __init__(self, tokens: int = 16, in_features: int = 32, dim: int = 48,
                 heads: int = 4, ffn_dim: int = 96, depth: int = 2, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(in_features, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.layers = nn.Sequential(*[_EncoderLayer(dim, heads, ffn_dim, tokens) for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos
        x = self.layers(x)
        x = x.mean(dim=1)
        return self.head(x)


# ---------------------------------------------------------------------------
# Project default model: scikit-learn 8x8 digits
# ---------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """Default plinio-onnx model for scikit-learn's 8x8 digits dataset.

    Origin: written for this project (see ``models/digits.py`` for the data).
    Input ``1x1x8x8`` (pixel values scaled to [0, 1]).

    Conv(1->16, 3, pad 1) - BN - ReLU, Conv(16->32, 3, pad 1) - BN - ReLU,
    MaxPool 2, Conv(32->32, 3, pad 1) - BN - ReLU, flatten,
    Linear(512->64) - ReLU, Linear(64->10).  ~48k parameters.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = F.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: how to build it and what it expects as input."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]
    description: str
    preserve_bn: bool = False  # keep explicit BatchNormalization nodes in the ONNX export


ZOO: Dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("resnet8", ResNet8, (1, 3, 32, 32),
                 "MLPerf Tiny image classification ResNet-8 (CIFAR-10)", preserve_bn=True),
        ZooEntry("dscnn", DSCNN, (1, 1, 49, 10),
                 "MLPerf Tiny keyword spotting DS-CNN (Speech Commands, 12 classes)"),
        ZooEntry("mobilenetv1_025", MobileNetV1, (1, 3, 96, 96),
                 "MLPerf Tiny visual wake words MobileNetV1 x0.25 (2 classes)"),
        ZooEntry("fc_autoencoder", FCAutoencoder, (1, 640),
                 "MLPerf Tiny anomaly detection FC autoencoder (ToyADMOS/MIMII)"),
        ZooEntry("tcn", TCN, (1, 4, 64),
                 "Small residual dilated TCN (Conv1d k3/k5, dilation 1/2/4)"),
        ZooEntry("mobilenetv2_tiny", MobileNetV2Tiny, (1, 3, 32, 32),
                 "Tiny MobileNetV2-style net (inverted residuals, ReLU6, residual Add)"),
        ZooEntry("densenet_tiny", DenseNetTiny, (1, 3, 32, 32),
                 "Tiny DenseNet-style net (dense blocks with Concat, transitions)"),
        ZooEntry("transformer_tiny", TransformerTiny, (1, 16, 32),
                 "Tiny transformer encoder (explicit MHSA, LayerNorm, GELU FFN)"),
        ZooEntry("digits_cnn", DigitsCNN, (1, 1, 8, 8),
                 "plinio-onnx default CNN for scikit-learn 8x8 digits", preserve_bn=True),
    ]
}


def randomize_norm_stats(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running statistics and affine params
    (and LayerNorm non-trivial affine params), so that normalisation is not
    the identity in eval mode.  Deterministic given ``generator``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) * 1.0 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=generator) * 1.0 + 0.5)
                    m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 1.0 + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)


def make(name: str, seed: int = DEFAULT_SEED, randomize_bn: bool = True) -> nn.Module:
    """Build zoo model ``name`` reproducibly: seeded init, optionally random
    BN statistics, returned in eval mode."""
    entry = ZOO[name]
    torch.manual_seed(seed)
    model = entry.build()
    if randomize_bn:
        randomize_norm_stats(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def example_input(name: str, batch: int = 1, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Deterministic random input for zoo model ``name`` with the given batch."""
    shape = (batch,) + tuple(ZOO[name].input_shape[1:])
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(shape, generator=g)
    if name == "digits_cnn":  # digits pixels live in [0, 1]
        x = torch.rand(shape, generator=g)
    return x


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["ZooEntry", "ZOO", "make", "example_input", "num_params", "randomize_norm_stats",
           "ResNet8", "DSCNN", "MobileNetV1", "FCAutoencoder", "TCN", "MobileNetV2Tiny",
           "DenseNetTiny", "TransformerTiny", "DigitsCNN"]
