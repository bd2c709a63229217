"""PSPNet (Zhao et al. 2017) on a dilated EfficientNet-Lite0: the architecture only.

The structure follows the study notes' ``_PSPModule`` (the Bubbliiiing PSPNet):

- **Backbone**: the packaged EfficientNet-Lite0 (ImageNet weights, `cbir.models.get_backbone`)
  rebuilt by timm with ``output_stride`` 16 (or 8): the stride of the last stages is replaced by
  dilation, so a 512 px input gives a 32 x 32 map instead of 16 x 16. No weight changes.
- **Pyramid pooling** (`psp_module`): the toolbox's `PPM` with bins (1, 2, 3, 6): adaptive average
  pooling per bin, 1x1 conv to ``C_in / 4`` channels, BN, ReLU, bilinear upsampling
  (``align_corners=True`` as in the notes), concatenation with the input, 3x3 conv bottleneck to
  ``C_in / 4`` channels, BN, ReLU; then ``Dropout2d(0.1)``.
- **Classifier**: a 1x1 conv to ``num_classes`` (2: background, painting), plus one channel with
  ``PSPConfig(core=True)``: the logit of each painting's **core** (its polygon shrunk inwards),
  an instance signal that keeps two paintings hung close apart where their masks touch.
- **Auxiliary head** (training only) on an earlier stage: 3x3 conv/BN/ReLU, ``Dropout2d(0.1)``,
  1x1 conv; its loss is weighted 0.4.
- **Edge decoder** (optional, ``PSPConfig(decoder=True)``; not in the paper): the pyramid's
  output upsampled to stride 4 and fused with the backbone's stride-4 map (block 1, 24 ch) by
  1x1 and depthwise 3x3 convs before the classifier, as DeepLabv3+ does, so the wall between two
  paintings hung close together (a stride-16 cell or less) survives into the mask.

The network is cut in three parts so training can cache what is frozen:
``stem`` (image -> stage 4, 112 ch, the auxiliary tap; its block 1 gives the decoder's stride-4
map), ``stage5`` (-> 192 ch) and ``last``
(stage 6, -> 320 ch, the PPM's input; the stage that fine-tuning trains).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cbir.toolbox.layers import PPM, ConvBnAct

BINS = (1, 2, 3, 6)
# Channels at the taps of tf_efficientnet_lite0: blocks[4] (aux), blocks[5], blocks[6] (PPM input).
AUX_CHANNELS, STAGE5_CHANNELS, LAST_CHANNELS = 112, 192, 320
# The stride-4 tap (blocks[1], 24 ch) is the output of the stem's first four modules.
LOW_CHANNELS, LOW_STRIDE, LOW_DEPTH = 24, 4, 4


@dataclass(frozen=True)
class PSPConfig:
    """What fixes the network's shape (stored with the trained weights)."""

    num_classes: int = 2
    output_stride: int = 16
    bins: tuple[int, ...] = BINS
    input_size: int = 512  # photos are letterboxed to a square of this side
    dropout: float = 0.1
    decoder: bool = False  # fuse the stride-4 map before the classifier (output stride 4)
    core: bool = False  # one more output channel: each instance's core (shrunk polygon), a logit

    @property
    def out_channels(self) -> int:
        """Channels of the main head's output: the classes, then the core logit if any."""
        return self.num_classes + int(self.core)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bins"] = list(self.bins)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PSPConfig:
        d = dict(d)
        d["bins"] = tuple(d.get("bins", BINS))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def psp_module(in_channels: int, bins: Sequence[int] = BINS, dropout: float = 0.1) -> nn.Sequential:
    """The notes' ``_PSPModule``: the toolbox `PPM` (branches and bottleneck of ``in / len(bins)``
    channels, bilinear with ``align_corners=True``) followed by ``Dropout2d``.

    ``(B, C, H, W) -> (B, C // len(bins), H, W)``.
    """
    out = in_channels // len(bins)
    return nn.Sequential(PPM(in_channels, out, bins=bins, align_corners=True), nn.Dropout2d(dropout))


class EdgeDecoder(nn.Module):
    """Coarse features ``(B, C, h, w)`` + a stride-4 map ``(B, L, H, W)`` -> ``(B, K, H, W)`` logits.

    The coarse map is upsampled (bilinear) to ``(H, W)``, concatenated with the low map reduced to
    32 channels, and mixed by 1x1 / depthwise 3x3 / 1x1 / depthwise 3x3 / 1x1 convs (BN, ReLU):
    the low map says where the edges are, the coarse one what is painting; depthwise keeps it cheap
    at stride 4 (0.2 GFLOP for a 384 px input).
    """

    def __init__(self, in_channels: int, low_channels: int, num_classes: int, width: int = 48) -> None:
        super().__init__()
        self.low = ConvBnAct(low_channels, 32, 1)
        self.fuse = nn.Sequential(ConvBnAct(in_channels + 32, width, 1), ConvBnAct(width, width, 3, groups=width),
                                  ConvBnAct(width, width, 1), ConvBnAct(width, width, 3, groups=width),
                                  ConvBnAct(width, width, 1))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(torch.cat([x, self.low(low)], 1)))


class PSPHead(nn.Module):
    """Pyramid pooling module + 1x1 classifier: ``(B, C, h, w) -> (B, K, h, w)`` logits; with
    ``low_channels`` an `EdgeDecoder` replaces the classifier and ``forward(x, low)`` gives
    logits at the low map's resolution."""

    def __init__(self, in_channels: int, num_classes: int, bins: Sequence[int] = BINS, dropout: float = 0.1,
                 low_channels: int = 0) -> None:
        super().__init__()
        self.psp = psp_module(in_channels, bins, dropout)
        mid = in_channels // len(bins)
        self.decoder = EdgeDecoder(mid, low_channels, num_classes) if low_channels else None
        self.classifier = None if low_channels else nn.Conv2d(mid, num_classes, 1)

    def forward(self, x: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        y = self.psp(x)
        return self.classifier(y) if self.decoder is None else self.decoder(y, low)


class AuxHead(nn.Module):
    """The auxiliary branch: 3x3 conv/BN/ReLU to ``in / 8`` ... channels, Dropout2d, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = ConvBnAct(in_channels, hidden, 3)
        self.drop = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(self.drop(self.conv(x)))


def dilated_lite0(output_stride: int = 16, pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the last strides turned into dilation.

    ``pretrained``: the ImageNet weights of the packaged backbone (the same tensors: dilation
    adds none). Without it (tests of shapes only) the weights are random.
    """
    import timm

    if output_stride not in (8, 16, 32):
        raise ValueError(f"output stride must be 8, 16 or 32, not {output_stride}")
    kw = {} if output_stride == 32 else {"output_stride": output_stride}
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kw)
    if pretrained:
        from cbir.models.backbones import get_backbone

        model.load_state_dict(get_backbone("efficientnet_lite0").model().state_dict())
    return model.eval()


class PSPNet(nn.Module):
    """Dilated EfficientNet-Lite0 + PSP head (+ auxiliary head).

    ``forward(x)`` -> ``(logits, aux_logits)`` at the feature map's resolution
    (``input / output_stride``, ``/ 4`` with the decoder); ``logits`` has ``num_classes`` channels,
    plus the core logit last with ``config.core``; ``aux_logits`` (classes only) is None in eval mode.
    """

    def __init__(self, config: PSPConfig | None = None, pretrained: bool = True) -> None:
        super().__init__()
        self.config = config = config or PSPConfig()
        trunk = dilated_lite0(config.output_stride, pretrained)
        self.stem = nn.Sequential(trunk.conv_stem, trunk.bn1, *trunk.blocks[:5])
        self.stage5 = copy.deepcopy(trunk.blocks[5])
        self.last = copy.deepcopy(trunk.blocks[6])
        self.head = PSPHead(LAST_CHANNELS, config.out_channels, config.bins, config.dropout,
                            low_channels=LOW_CHANNELS if config.decoder else 0)
        self.aux = AuxHead(AUX_CHANNELS, config.num_classes, dropout=config.dropout)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image ``(B, 3, S, S)`` -> the four taps ``(f2, f4, f5, f6)``: 24 channels at ``S / 4``,
        then 112, 192, 320 channels at ``S / output_stride``."""
        f2 = self.stem[:LOW_DEPTH](x)
        f4 = self.stem[LOW_DEPTH:](f2)
        f5 = self.stage5(f4)
        return f2, f4, f5, self.last(f5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: D102
        f2, f4, _, f6 = self.features(x)
        main = self.head(f6, f2) if self.config.decoder else self.head(f6)
        return main, (self.aux(f4) if self.training else None)

    def trained_state(self, finetuned: bool) -> dict[str, torch.Tensor]:
        """What training changed (all that needs shipping): the heads, and stage 6 if fine-tuned."""
        parts = {"head": self.head, "aux": self.aux} | ({"last": self.last} if finetuned else {})
        return {f"{p}.{k}": v.detach().clone() for p, m in parts.items() for k, v in m.state_dict().items()}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of `trained_state` (missing ``last.*`` keys keep the ImageNet stage 6, missing ``aux.*`` the untrained auxiliary head, unused at inference)."""
        own = self.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown:
            raise KeyError(f"unexpected tensors {unknown[:3]}")
        for k, v in state.items():
            if tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"tensor {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
        missing = [k for k in own if k.startswith("head.") and k not in state]
        if missing:
            raise KeyError(f"missing tensors {missing[:3]}")
        self.load_state_dict({**own, **{k: v.float() if v.is_floating_point() else v for k, v in state.items()}})


class StaticAdaptivePool(nn.Module):
    """``AdaptiveAvgPool2d(bins)`` for a known input size, as two matrix products.

    ONNX has no adaptive pooling for sizes that do not divide (16 cells into 3 bins); with the
    input size fixed by the letterbox, cell ``i`` of ``b`` bins averages rows
    ``floor(i h / b) .. ceil((i + 1) h / b)``, exactly as PyTorch does, written as
    ``P_h @ x @ P_w^T``.
    """

    def __init__(self, bins: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("ph", self.matrix(bins, size[0]), persistent=False)
        self.register_buffer("pw", self.matrix(bins, size[1]), persistent=False)

    @staticmethod
    def matrix(b: int, n: int) -> torch.Tensor:
        m = torch.zeros(b, n)
        for i in range(b):
            lo, hi = (i * n) // b, -((-(i + 1) * n) // b)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.ph @ x @ self.pw.transpose(0, 1)


def painting_maps(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Head logits ``(B, K [+ 1], h, w)`` -> maps ``(B, M, h, w)``: the painting probability
    (softmax over the K classes, class 1), then the core probability (sigmoid) if there is one."""
    maps = [F.softmax(logits[:, :num_classes], dim=1)[:, 1:2]]
    if logits.shape[1] > num_classes:
        maps.append(torch.sigmoid(logits[:, num_classes:num_classes + 1]))
    return torch.cat(maps, 1)


class PSPInference(nn.Module):
    """What is exported to ONNX: normalized image ``(1, 3, S, S)`` -> maps ``(1, M, h, w)`` at
    the head's resolution, ``S / output_stride`` (``S / 4`` with the decoder): `painting_maps`
    (M = 1, the painting probability; 2 with a core channel).

    The pyramid's adaptive pools become `StaticAdaptivePool` for the feature size of an
    ``S x S`` input (a copy of the network is changed, not ``net``).
    """

    def __init__(self, net: PSPNet, static_size: int | None = None) -> None:
        super().__init__()
        if static_size:
            net = copy.deepcopy(net)
            g = static_size // net.config.output_stride
            for stage in net.head.psp[0].stages:
                stage[0] = StaticAdaptivePool(stage[0].output_size, (g, g))
        self.net = net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        logits, _ = self.net(x)
        return painting_maps(logits, self.net.config.num_classes)


__all__ = ["AUX_CHANNELS", "AuxHead", "BINS", "EdgeDecoder", "LAST_CHANNELS", "LOW_CHANNELS", "LOW_STRIDE", "PSPConfig",
           "PSPHead", "PSPInference", "PSPNet", "STAGE5_CHANNELS", "StaticAdaptivePool", "dilated_lite0", "painting_maps", "psp_module"]
