"""timm architectures as deployq model factories: one small variant of every family in timm's registry.

    deployq export --model deployq.examples.timm_models:build --model-kwargs '{"name": "test_resnet"}' \\
                   --ckpt state.pt --calib photos/ --input-shape 1,3,64,64

:data:`FAMILIES` maps each of timm's model families (the module of ``timm.models`` that defines it)
to the variant with the fewest parameters, the keyword arguments that let it run at a small input
(``img_size`` for models with position embeddings; ``depth=2`` for the few whose smallest variant
has over 80 M parameters) and that input's side. :func:`build` returns the model with random
weights (nothing is downloaded), in eval mode. timm is optional: only these examples and
``benchmarks/bench_timm.py`` need it (``pip install timm``).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch
from torch import nn

from deployq.examples.torchvision_models import import_torchvision

# family -> (model, keyword arguments, input side)
FAMILIES: dict[str, tuple[str, dict[str, Any], int]] = {
    "beit": ("beit_base_patch16_224", {"img_size": 64, "depth": 2}, 64),
    "byoanet": ("halonet_h1", {"img_size": 256}, 256),
    "byobnet": ("test_byobnet", {"img_size": 64}, 64),
    "cait": ("cait_xxs24_224", {"img_size": 64}, 64),
    "coat": ("coat_tiny", {"img_size": 64}, 64),
    "convit": ("convit_tiny", {"img_size": 64}, 64),
    "convmixer": ("convmixer_768_32", {}, 64),
    "convnext": ("test_convnext", {}, 64),
    "cpubone": ("cpubone_nano", {}, 64),
    "crossvit": ("crossvit_tiny_240", {}, 64),
    "csatv2": ("csatv2", {}, 64),
    "cspnet": ("cs3darknet_focus_s", {}, 64),
    "cspnext": ("cspnext_tiny", {}, 64),
    "davit": ("davit_tiny", {}, 64),
    "deepseek_vit": ("deepseek_vit_412m", {"img_size": 56, "depth": 2}, 56),
    "deit": ("deit_tiny_patch16_224", {"img_size": 64}, 64),
    "densenet": ("densenet121", {}, 64),
    "dla": ("dla46x_c", {}, 64),
    "dpn": ("dpn48b", {}, 64),
    "edgenext": ("edgenext_xx_small", {}, 64),
    "efficientformer": ("efficientformer_l1", {"img_size": 224}, 224),
    "efficientformer_v2": ("efficientformerv2_s0", {"img_size": 64}, 64),
    "efficientnet": ("test_efficientnet", {}, 64),
    "efficientvim": ("efficientvim_m1", {}, 64),
    "efficientvit_mit": ("efficientvit_b0", {}, 64),
    "efficientvit_msra": ("efficientvit_m0", {"img_size": 64}, 64),
    "eva": ("vit_tiny_patch16_dinov3_qkvb", {"img_size": 64}, 64),
    "fasternet": ("fasternet_t0", {}, 64),
    "fastvit": ("fastvit_t8", {}, 64),
    "focalnet": ("focalnet_tiny_srf", {}, 64),
    "gcvit": ("gcvit_xxtiny", {"img_size": 64}, 64),
    "gemma4_vit": ("gemma4_vit_167m", {"img_size": 64, "depth": 2}, 64),
    "ghostnet": ("ghostnet_050", {}, 64),
    "hardcorenas": ("hardcorenas_b", {}, 64),
    "hgnet": ("hgnetv2_b0", {}, 64),
    "hiera": ("hiera_tiny_224", {"img_size": 64}, 64),
    "hieradet_sam2": ("sam2_hiera_tiny", {}, 64),
    "hrnet": ("hrnet_w18_small", {}, 64),
    "iformer": ("iformer_t", {}, 64),
    "inception_next": ("inception_next_atto", {}, 64),
    "inception_resnet_v2": ("inception_resnet_v2", {}, 96),
    "inception_v3": ("inception_v3", {}, 96),
    "inception_v4": ("inception_v4", {}, 96),
    "lcnetv2": ("lcnetv2_small", {}, 64),
    "levit": ("levit_128s", {"img_size": 64}, 64),
    "lowformer": ("lowformer_b0", {}, 64),
    "mambaout": ("test_mambaout", {}, 64),
    "maxxvit": ("test_coatnet", {"img_size": 64}, 64),
    "metaformer": ("poolformerv2_s12", {}, 64),
    "mlp_mixer": ("gmlp_ti16_224", {"img_size": 64}, 64),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 64),
    "mobilenetv5": ("mobilenetv5_base", {}, 64),
    "mobilevit": ("mobilevit_xxs", {"img_size": 64}, 64),
    "mvitv2": ("mvitv2_tiny", {"img_size": 64}, 64),
    "naflexvit": ("naflexvit_base_patch16_parfac_gap", {"img_size": 64, "depth": 2}, 64),
    "nasnet": ("nasnetalarge", {}, 64),
    "nest": ("nest_tiny", {"img_size": 64}, 64),
    "nextvit": ("nextvit_small", {}, 64),
    "nfnet": ("test_nfnet", {}, 64),
    "pit": ("pit_ti_224", {"img_size": 64}, 64),
    "pnasnet": ("pnasnet5large", {}, 64),
    "pvt_v2": ("pvt_v2_b0", {}, 64),
    "qwen3_vit": ("qwen3_vit_88m", {"img_size": 64, "depth": 2}, 64),
    "rdnet": ("rdnet_tiny", {}, 64),
    "regnet": ("regnetx_002", {}, 64),
    "repghost": ("repghostnet_050", {}, 64),
    "repvit": ("repvit_m1", {"img_size": 64}, 64),
    "res2net": ("res2next50", {}, 64),
    "resnest": ("resnest14d", {}, 64),
    "resnet": ("test_resnet", {}, 64),
    "resnetv2": ("resnetv2_18", {}, 64),
    "rexnet": ("rexnet_100", {}, 64),
    "selecsls": ("selecsls42", {}, 64),
    "senet": ("legacy_seresnet18", {}, 64),
    "sequencer": ("sequencer2d_s", {"img_size": 64}, 64),
    "shvit": ("shvit_s1", {}, 64),
    "sknet": ("skresnet18", {}, 64),
    "starnet": ("starnet_s050", {}, 64),
    "swiftformer": ("swiftformer_xs", {"img_size": 64}, 64),
    "swin_transformer": ("swin_tiny_patch4_window7_224", {"img_size": 64}, 64),
    "swin_transformer_v2": ("swinv2_tiny_window8_256", {"img_size": 64}, 64),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", {"img_size": 64}, 64),
    "tiny_vit": ("tiny_vit_5m_224", {}, 64),
    "tnt": ("tnt_s_legacy_patch16_224", {"img_size": 64}, 64),
    "tresnet": ("tresnet_m", {}, 64),
    "twins": ("twins_svt_small", {"img_size": 64}, 64),
    "vgg": ("vgg11", {}, 64),
    "visformer": ("visformer_tiny", {"img_size": 64}, 64),
    "vision_transformer": ("test_vit", {"img_size": 64}, 64),
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", {"img_size": 64}, 64),
    "vision_transformer_relpos": ("test_vit_relpos", {"img_size": 64}, 64),
    "vision_transformer_sam": ("samvit_base_patch16_224", {"img_size": 64, "depth": 2}, 64),
    "vitamin": ("vitamin_small_224", {"img_size": 64}, 64),
    "volo": ("volo_d1_224", {"img_size": 64}, 64),
    "vovnet": ("ese_vovnet19b_slim_dw", {}, 64),
    "xception": ("legacy_xception", {}, 64),
    "xception_aligned": ("xception41p", {}, 64),
    "xcit": ("xcit_nano_12_p8_224", {"img_size": 64}, 64),
}


def import_timm() -> types.ModuleType:
    """``import timm`` (which imports torchvision: through :func:`import_torchvision`, so that the
    CPU build of torch works with PyPI's torchvision wheel)."""
    import_torchvision()
    try:
        return importlib.import_module("timm")
    except ImportError as err:
        raise ImportError("the timm examples need timm: pip install timm") from err


def build(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """timm model `name` with random weights (seeded), in eval mode; `kwargs` go to its constructor."""
    timm = import_timm()
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def family_model(family: str, seed: int = 0) -> tuple[nn.Module, dict[str, Any], int]:
    """The model of `family`, the keyword arguments of :func:`build` that make it, and its input side."""
    if family not in FAMILIES:
        raise ValueError(f"unknown timm family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    name, kwargs, size = FAMILIES[family]
    factory_kwargs = {"name": name, "seed": seed, **kwargs}
    return build(**factory_kwargs), factory_kwargs, size
