"""MiniGPT-4: frozen EVA ViT → ln_vision → frozen Q-Former → trainable `llama_proj` → frozen LLaMA.

The module computes the original's loss: causal-LM cross-entropy, mean over all scored tokens of
the batch. Only the positions whose next token is scored go through the LM head, which gives the
same loss without materialising [B, T, vocab] logits.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mgpt4_dist.config import ModelConfig
from mgpt4_dist.models.llm import choose_attn_impl, load_llm
from mgpt4_dist.models.qformer import QFormer
from mgpt4_dist.models.sequence import IGNORE_INDEX, TextBatch
from mgpt4_dist.models.vit import EvaViT

log = logging.getLogger(__name__)

TRAINABLE_PREFIXES = ("llama_proj.",)


@dataclass
class LossTerms:
    loss: torch.Tensor  # mean CE over all scored tokens
    token_ce: torch.Tensor  # [num_scored] per-token CE, row-major
    token_rows: torch.Tensor  # [num_scored] batch row of each scored token
    num_scored_tokens: int


# The Llama-2 variant groups this many consecutive ViT patch tokens into one LLM token.
PATCHES_PER_TOKEN = 4


class MiniGPT4(nn.Module):
    """With a Q-Former (Vicuna MiniGPT-4) or without one (the Llama-2 variant: ln_vision, CLS
    dropped, 4 consecutive patch tokens concatenated and projected)."""

    def __init__(self, visual_encoder: EvaViT, qformer: Optional[QFormer], llm: nn.Module,
                 ln_vision_eps: float = 1e-5):
        super().__init__()
        self.visual_encoder = visual_encoder
        self.qformer = qformer
        self.llm = llm
        vit_width = visual_encoder.cfg.embed_dim
        if qformer is None:
            self.ln_vision = nn.LayerNorm(vit_width, eps=ln_vision_eps)
            num_patches = visual_encoder.num_tokens - 1
            if num_patches % PATCHES_PER_TOKEN:
                raise ValueError(f"the Llama-2 variant needs a patch count divisible by {PATCHES_PER_TOKEN}, got {num_patches}")
            self._num_image_tokens = num_patches // PATCHES_PER_TOKEN
            proj_in = vit_width * PATCHES_PER_TOKEN
        else:
            self._num_image_tokens = qformer.cfg.num_query_tokens
            proj_in = qformer.cfg.hidden_size
        self.llama_proj = nn.Linear(proj_in, llm.config.hidden_size)

    @property
    def num_image_tokens(self) -> int:
        return self._num_image_tokens

    def frozen_modules(self) -> list[nn.Module]:
        vision = [self.qformer] if self.qformer is not None else [self.ln_vision]
        return [self.visual_encoder, *vision, self.llm]

    def train(self, mode: bool = True) -> "MiniGPT4":
        # Frozen towers stay in eval mode whatever the trainer asks (no dropout, fixed norms).
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Image → [B, num_query_tokens, llm_hidden] embeddings for the LLM."""
        # The towers are frozen: no autograd graph, so no activations are kept for them.
        with torch.no_grad():
            dtype = next(self.visual_encoder.parameters()).dtype
            image_tokens_BND = self.visual_encoder(images_BCHW.to(dtype))
            if self.qformer is not None:
                features_BQH = self.qformer(image_tokens_BND)
            else:
                patches_BND = self.ln_vision(image_tokens_BND)[:, 1:, :]
                B, N, D = patches_BND.shape
                features_BQH = patches_BND.reshape(B, N // PATCHES_PER_TOKEN, D * PATCHES_PER_TOKEN)
        return self.llama_proj(features_BQH.to(self.llama_proj.weight.dtype))

    def embed_sequence(self, image_embeds_BQD: torch.Tensor, text: TextBatch) -> torch.Tensor:
        embed = self.llm.get_input_embeddings()
        tokens_BTD = embed(text.input_ids_BT)
        slots = text.image_slots_BT.unsqueeze(-1)
        return tokens_BTD.masked_scatter(slots, image_embeds_BQD.to(tokens_BTD.dtype))

    def loss_terms(self, images_BCHW: torch.Tensor, text: TextBatch) -> LossTerms:
        image_embeds_BQD = self.encode_image(images_BCHW)
        inputs_BTD = self.embed_sequence(image_embeds_BQD, text)
        # Padding only ever trails the real tokens, so causal attention alone hides it.
        hidden_BTD = self.llm.model(inputs_embeds=inputs_BTD, use_cache=False).last_hidden_state
        targets_BT = text.labels_BT[:, 1:]
        scored_BT = targets_BT != IGNORE_INDEX
        logits_ND = self.llm.lm_head(hidden_BTD[:, :-1][scored_BT]).float()
        token_ce = F.cross_entropy(logits_ND, targets_BT[scored_BT], reduction="none")
        rows = torch.arange(targets_BT.shape[0], device=targets_BT.device)[:, None].expand_as(targets_BT)[scored_BT]
        num = int(token_ce.numel())
        return LossTerms(token_ce.sum() / max(num, 1), token_ce, rows, num)

    def forward(self, images_BCHW: torch.Tensor, text: TextBatch) -> torch.Tensor:
        return self.loss_terms(images_BCHW, text).loss


# --------------------------------------------------------------------------- building and freezing

def build_minigpt4(cfg: ModelConfig, *, seed: int, dtype: torch.dtype = torch.float32,
                   device_type: str = "cpu") -> MiniGPT4:
    """Build the model, load every configured weight file, and freeze all but llama_proj.

    Random parts are seeded from `seed` part by part, so every rank, backend and world size
    starts from identical weights.
    """
    from mgpt4_dist.models import loading

    torch.manual_seed(seed)
    vit = EvaViT(cfg.vit)
    torch.manual_seed(seed + 1)
    qformer = QFormer(cfg.qformer, vision_width=cfg.vit.embed_dim, ln_vision_eps=cfg.ln_vision_eps) if cfg.has_qformer else None
    llm = load_llm(cfg.llm_path, dtype=dtype, attn_impl=choose_attn_impl(cfg.attn_impl, device_type))
    torch.manual_seed(seed + 2)
    model = MiniGPT4(vit, qformer, llm, ln_vision_eps=cfg.ln_vision_eps)
    if cfg.vit_checkpoint:
        loading.load_vit_checkpoint(model.visual_encoder, cfg.vit_checkpoint)
    if cfg.qformer_checkpoint:
        if qformer is None:
            raise ValueError("model.qformer_checkpoint is set but model.has_qformer=false (the Llama-2 variant has no Q-Former)")
        loading.load_qformer_checkpoint(model.qformer, cfg.qformer_checkpoint)
    if cfg.proj_checkpoint:
        loading.load_proj_checkpoint(model.llama_proj, cfg.proj_checkpoint,
                                     ln_vision=model.ln_vision if qformer is None else None)
    model.to(dtype)
    apply_freezing(model)
    return model


def apply_freezing(model: MiniGPT4) -> None:
    """The one place that decides what trains: llama_proj only."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(TRAINABLE_PREFIXES)
    model.train()


def audit_trainable(model: nn.Module) -> dict:
    """Count trainable/frozen parameters and fail if anything but llama_proj would train."""
    trainable, frozen, wrong = 0, 0, []
    for name, param in model.named_parameters():
        clean = name.removeprefix("module.")
        if param.requires_grad:
            trainable += param.numel()
            if not clean.startswith(TRAINABLE_PREFIXES):
                wrong.append(clean)
        else:
            frozen += param.numel()
            if clean.startswith(TRAINABLE_PREFIXES):
                wrong.append(clean + " (frozen but should train)")
    if wrong or trainable == 0:
        raise RuntimeError(f"trainable parameter set is not llama_proj only: {wrong[:5] or 'nothing trains'}")
    return {"trainable_params": trainable, "frozen_params": frozen}
