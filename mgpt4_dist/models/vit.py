"""The frozen EVA ViT-g/14 vision encoder, built on timm's `Eva`.

timm's Eva with separate q/v biases takes `eva_vit_g.pth` keys as they are; the original has no
final norm, so ours is disabled too. MiniGPT-4 feeds all tokens (CLS + patches) onward.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from timm.models.eva import Eva

from mgpt4_dist.config import ViTConfig


class EvaViT(nn.Module):
    """EVA ViT returning every token: [B, 1 + (img/patch)^2, embed_dim]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.eva = Eva(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
            num_classes=0,
            global_pool="",
            use_post_transformer_norm=False,
        )

    @property
    def num_tokens(self) -> int:
        return (self.cfg.img_size // self.cfg.patch_size) ** 2 + 1

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.eva.forward_features(images_BCHW)

    def load_original_state_dict(self, state_dict: dict) -> None:
        """Load a state dict in `eva_vit_g.pth` key layout (keys map 1:1 onto timm's Eva)."""
        self.eva.load_state_dict(state_dict, strict=True)
