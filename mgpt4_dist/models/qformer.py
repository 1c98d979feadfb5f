"""The frozen BLIP-2 Q-Former with its learned query tokens and the ln_vision norm before it.

Built on transformers' `Blip2QFormerModel`, whose only difference from the original BERT-based
Q-Former is naming (see `mgpt4_dist.models.weights`).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from mgpt4_dist.config import QFormerConfig


class QFormer(nn.Module):
    """ln_vision → Q-Former(query tokens, cross-attending to image tokens) → [B, Q, hidden]."""

    def __init__(self, cfg: QFormerConfig, vision_width: int, ln_vision_eps: float = 1e-5):
        super().__init__()
        self.cfg = cfg
        hf_cfg = Blip2QFormerConfig(
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            cross_attention_frequency=cfg.cross_attention_freq,
            encoder_hidden_size=vision_width,
            layer_norm_eps=cfg.layer_norm_eps,
            hidden_act="gelu",
            use_qformer_text_input=False,
        )
        self.ln_vision = nn.LayerNorm(vision_width, eps=ln_vision_eps)
        self.bert = Blip2QFormerModel(hf_cfg)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        nn.init.normal_(self.query_tokens, std=0.02)

    def forward(self, image_tokens_BND: torch.Tensor) -> torch.Tensor:
        image_tokens_BND = self.ln_vision(image_tokens_BND)
        queries_BQH = self.query_tokens.expand(image_tokens_BND.shape[0], -1, -1)
        # The original passes an all-ones image mask: every ViT token is attended.
        image_mask_BN = torch.ones(image_tokens_BND.shape[:2], dtype=torch.long, device=image_tokens_BND.device)
        out = self.bert(query_embeds=queries_BQH, encoder_hidden_states=image_tokens_BND,
                        encoder_attention_mask=image_mask_BN, return_dict=True)
        return out.last_hidden_state
