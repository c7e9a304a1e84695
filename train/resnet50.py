"""MCSE's image features without torchvision: ResNet-50 with fc = Identity and its preprocessing.

MCSE (preprocess/extract_visn_feature.py) runs torchvision's `resnet50(pretrained=True)` (the
IMAGENET1K_V1 weights, file resnet50-0676ba61.pth) with `fc = nn.Identity()` on
`Resize(256), CenterCrop(224), ToTensor(), Normalize(ImageNet mean, std)` of each image
(PIL, RGB): 2048-d features. `ResNet` here is torchvision's architecture (v1.5: the stride on
the 3×3 convolution) under torchvision's parameter names, so its state-dict file loads as is;
`mcse_preprocess` is those transforms written out for PIL images (torchvision 0.8's PIL path:
PIL bilinear resize of the shorter side to 256, the longer to int(256 · long / short), a
centred crop with Python's round).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1×1, 3×3 (stride), 1×1 (× 4 channels), plus the shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
            if stride != 1 or inplanes != planes * 4
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet with Bottleneck blocks and no fc: (B, 3, H, W) -> (B, 32 · width).
    The defaults are ResNet-50 (2048-d output); smaller `depths` / `width` are for tests."""

    def __init__(self, depths: Sequence[int] = (3, 4, 6, 3), width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for stage, depth in enumerate(depths):
            planes = width * 2**stage
            blocks = []
            for block in range(depth):
                blocks.append(Bottleneck(inplanes, planes, 2 if block == 0 and stage > 0 else 1))
                inplanes = planes * 4
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.stages = len(depths)
        self.out_dim = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(self.stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def load_resnet50(weights: Path) -> ResNet:
    """ResNet-50 in eval mode with a torchvision state-dict file (.pth / .pt, or .safetensors);
    its fc.weight / fc.bias are dropped (MCSE's fc = Identity), every other key must match."""
    weights = Path(weights)
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    model = ResNet()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
    return model.eval()


def _resized_size(width: int, height: int, size: int) -> Tuple[int, int]:
    """torchvision Resize(size) of a PIL image: the shorter side to `size`, the other scaled and floored."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def mcse_preprocess(image: Image.Image) -> torch.Tensor:
    """(3, 224, 224) float32: Resize(256), CenterCrop(224), ToTensor, Normalize(ImageNet) of an image."""
    image = image.convert("RGB")
    width, height = _resized_size(*image.size, 256)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.BILINEAR)
    top, left = int(round((height - 224) / 2.0)), int(round((width - 224) / 2.0))
    image = image.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


class ResNet50Features:
    """Images -> (n, 2048) MCSE features: mcse_preprocess, then ResNet-50 (fc = Identity)."""

    def __init__(self, weights: Path, batch_size: int, device: str = "cpu"):
        self.model, self.batch_size, self.device = load_resnet50(weights).to(device), batch_size, device

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([mcse_preprocess(im) for im in images[i : i + self.batch_size]]).to(self.device)
            out.append(self.model(pixels).float().cpu())
        return torch.cat(out)
