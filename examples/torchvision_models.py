"""torchvision architectures as deployq model factories: the models users bring.

    deployq export --model deployq.examples.torchvision_models:build --model-kwargs '{"name": "resnet18"}' \\
                   --ckpt state.pt --calib photos/ --input-shape 1,3,96,96

:func:`build` returns a torchvision model with random weights (nothing is downloaded) in eval mode.
:func:`warm_batchnorm` replaces BatchNorm's initial statistics (mean 0, variance 1, which would make
every BN an identity) by the statistics of real photographs, so activations have the ranges a
trained network has.

PyPI's torchvision wheel registers C++ operators (``torchvision::nms``, ...) built for CUDA torch;
beside the CPU build of torch that registration fails at import. The model definitions use none
of those operators, so :func:`import_torchvision` retries the import without the registration
module when, and only when, that failure happens.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# name -> keyword arguments for small inputs (the conformance suite runs at 64..96 pixels)
MODELS: dict[str, dict] = {
    "resnet18": {}, "resnet50": {}, "mobilenet_v2": {}, "mobilenet_v3_small": {},
    "mobilenet_v3_large": {}, "efficientnet_b0": {}, "shufflenet_v2_x0_5": {}, "squeezenet1_1": {},
    "regnet_y_400mf": {}, "mnasnet0_5": {}, "googlenet": {"aux_logits": False, "init_weights": True},
    "densenet121": {}, "convnext_tiny": {}, "vit_b_16": {}, "swin_t": {},
    "lraspp_mobilenet_v3_large": {"weights_backbone": None},
}
SEGMENTATION = {"lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"}


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, skipping its fake-kernel registration if the C++ ops are missing."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    return importlib.import_module("torchvision")


def build(name: str, num_classes: int = 1000, image_size: Optional[int] = None, seed: int = 0) -> nn.Module:
    """torchvision model `name` with random weights (seeded), in eval mode.

    `image_size` is needed by the vision transformers (vit_*), whose position embedding is sized
    for one input size; other models take any size their down-sampling allows.
    """
    tv = import_torchvision()
    if name not in MODELS and name not in SEGMENTATION:
        raise ValueError(f"unknown torchvision model {name!r}; known: {', '.join(sorted(MODELS))}")
    kwargs = dict(MODELS.get(name, {}), weights=None)
    if name in SEGMENTATION:
        factory = getattr(tv.models.segmentation, name)
        kwargs["num_classes"] = num_classes if num_classes != 1000 else 21
        kwargs.setdefault("weights_backbone", None)
    else:
        factory = getattr(tv.models, name)
        kwargs["num_classes"] = num_classes
    if name.startswith("vit_") and image_size is not None:
        kwargs["image_size"] = image_size
    torch.manual_seed(seed)
    return factory(**kwargs).eval()


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HELD_OUT_PHOTOS = ("chelsea", "coffee")  # never used to warm BatchNorm or to calibrate


def photo_crops(count: int, size: int, *, held_out: bool = False, seed: int = 0) -> torch.Tensor:
    """`count` random square crops of the photographs inside scikit-image, resized to `size`,
    flipped at random and normalized as torchvision's classifiers expect: (count, 3, size, size).

    `held_out` picks the crops from HELD_OUT_PHOTOS only (evaluation); otherwise from the others
    (BatchNorm statistics, calibration)."""
    from deployq.examples.lowlight.data import sample_images

    photos = [image for name, image in sample_images().items() if (name in HELD_OUT_PHOTOS) == held_out]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        image = photos[i % len(photos)]
        h, w = image.shape[:2]
        side = int(rng.integers(min(size, h, w), min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = torch.from_numpy(np.ascontiguousarray(image[y:y + side, x:x + side])).permute(2, 0, 1)[None]
        crop = F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        crops.append(crop.flip(-1) if rng.random() < 0.5 else crop)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (torch.cat(crops) - mean) / std


def with_photo_statistics(model: nn.Module, size: int, *, batches: int = 4, batch_size: int = 8,
                          seed: int = 0) -> nn.Module:
    """`model` as a trained network would look to a quantizer: BatchNorm statistics of photographs
    (:func:`warm_batchnorm`), and weights that torchvision initialises to zeros (ViT's head)
    drawn at random instead, so that no output is constant. In place; returns `model` (eval)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (nn.Linear, nn.Conv2d)) and weight is not None and not weight.any():
                weight.copy_(torch.randn(weight.shape, generator=generator) * weight[0].numel() ** -0.5)
    return warm_batchnorm(model, [photo_crops(batch_size, size, seed=seed + i) for i in range(batches)])


@torch.no_grad()
def warm_batchnorm(model: nn.Module, batches: Iterable) -> nn.Module:
    """Set every BatchNorm's running statistics to their average over `batches` (tensors, or tuples
    of a model's inputs); eval mode afterwards."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(*x) if isinstance(x, (tuple, list)) else model(x)
    for bn in norms:
        bn.momentum = 0.1
    return model.eval()


class TwoInputs(nn.Module):
    """A model with two image inputs (a guided / fusion network): two stems, concat, a head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem_x = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.stem_y = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU6(inplace=True))
        self.head = nn.Conv2d(width, 3, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.fuse(torch.cat([self.stem_x(x), self.stem_y(y)], 1))) + x


def two_inputs(width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TwoInputs(width).eval()
