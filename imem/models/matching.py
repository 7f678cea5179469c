"""The CDCML-style matching model and the unimodal VA regressors (thesis section 5.1.1).

MatchingModel: image encoder + head -> f_I (512-d), music encoder + head -> f_M (512-d); a similarity
decoder on the concatenation [f_I, f_M] and a VA decoder per modality. ``va_decoder: separate`` feeds the VA
decoders the DETACHED embeddings: they learn to read VA off the learned features without their gradient shaping
them, CDCML section 6.1.2's "we feed the learned features ... into another VA predictor" for the baselines and
the ablation rows without a VA loss. ``heads()`` runs everything
after the backbones, so training on cached frozen-backbone outputs (``fc_only``) uses the very same
modules as end-to-end training.
"""

from __future__ import annotations

import torch
from torch import nn

from imem.errors import ImemError
from imem.models.decoders import MLPDecoder
from imem.models.encoders import Head, build_backbone

VA_DECODERS = ("joint", "separate")


class MatchingModel(nn.Module):
    def __init__(self, image_backbone: nn.Module, music_backbone: nn.Module, image_head: str, music_head: str,
                 embed_dim: int = 512, hidden=(256, 128), dropout: float = 0.5, head_norm: str = "batchnorm",
                 va_decoder: str = "joint"):
        super().__init__()
        if va_decoder not in VA_DECODERS:
            raise ImemError(f"params: train va_decoder = {va_decoder!r} is not one of: {', '.join(VA_DECODERS)}")
        self.separate_va = va_decoder == "separate"
        self.image_backbone, self.music_backbone = image_backbone, music_backbone
        self.image_head = Head(image_backbone, image_head, embed_dim, head_norm)
        self.music_head = Head(music_backbone, music_head, embed_dim, head_norm)
        self.sim = MLPDecoder(2 * embed_dim, 1, hidden, dropout)
        self.va_image = MLPDecoder(embed_dim, 2, hidden, dropout)
        self.va_music = MLPDecoder(embed_dim, 2, hidden, dropout)

    def heads(self, h_image: torch.Tensor, h_music: torch.Tensor) -> dict:
        fi, fm = self.image_head(h_image), self.music_head(h_music)
        vi, vm = (fi.detach(), fm.detach()) if self.separate_va else (fi, fm)
        return {"f_image": fi, "f_music": fm, "sim": self.sim(torch.cat([fi, fm], dim=1)).squeeze(1),
                "va_image": self.va_image(vi), "va_music": self.va_music(vm)}

    def forward(self, x_image: torch.Tensor, x_music: torch.Tensor) -> dict:
        return self.heads(self.image_backbone(x_image), self.music_backbone(x_music))

    def embed_image(self, h_image: torch.Tensor) -> torch.Tensor:
        return self.image_head(h_image)

    def embed_music(self, h_music: torch.Tensor) -> torch.Tensor:
        return self.music_head(h_music)


class UnimodalModel(nn.Module):
    """Encoder + head + VA decoder, trained with the VA MSE only."""

    def __init__(self, backbone: nn.Module, head: str, embed_dim: int = 512, hidden=(256, 128),
                 dropout: float = 0.5, head_norm: str = "batchnorm"):
        super().__init__()
        self.backbone = backbone
        self.head = Head(backbone, head, embed_dim, head_norm)
        self.va = MLPDecoder(embed_dim, 2, hidden, dropout)

    def heads(self, h: torch.Tensor) -> dict:
        f = self.head(h)
        return {"f": f, "va": self.va(f)}

    def forward(self, x: torch.Tensor) -> dict:
        return self.heads(self.backbone(x))


def build_model(cfg: dict) -> nn.Module:
    """From a resolved variant config (see :func:`imem.training.variant_config`)."""
    common = {"embed_dim": int(cfg["embed_dim"]), "hidden": tuple(cfg["decoder_hidden"]),
              "dropout": float(cfg["dropout"]), "head_norm": cfg.get("head_norm", "batchnorm")}
    clip_s = float(cfg.get("clip_seconds", 2.0))
    if cfg["kind"] == "matching":
        return MatchingModel(build_backbone(cfg["image_encoder"], clip_s), build_backbone(cfg["music_encoder"], clip_s),
                             cfg["image_head"], cfg["music_head"], **common, va_decoder=cfg.get("va_decoder", "joint"))
    if cfg["kind"] == "unimodal_image":
        return UnimodalModel(build_backbone(cfg["image_encoder"], clip_s), cfg["image_head"], **common)
    return UnimodalModel(build_backbone(cfg["music_encoder"], clip_s), cfg["music_head"], **common)
