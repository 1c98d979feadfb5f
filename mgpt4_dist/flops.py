"""FLOPs of one MiniGPT-4 training step, for MFU.

Counted (2 FLOPs per multiply-add, matmuls and attention only):
- ViT forward over all 1 + (img/patch)^2 tokens (patch embedding, attention, MLP); skipped when
  training on cached features;
- Q-Former forward: 32 queries through self-attention, cross-attention to the image tokens (its
  key/value projections run over every image token) and the query FFN; skipped with cached features;
- llama_proj forward and backward;
- LLM forward over the whole sequence (causal attention: half of the T x T scores) plus the LM
  head over the scored positions only, and backward to the inputs: the frozen weights get no
  gradients, so backward costs one more forward's worth of matmuls, not two. Every decoder layer
  counts the whole sequence, the last one too: `model.trim_last_layer` (on by default) skips work
  this model counts for the positions before the scored tail, so MFU keeps one definition whether
  it is on or off and a trimmed step shows its gain as higher MFU. The sequence is the batch's
  padded length, padding included, as the original computes it; `model.padding_free` (on by
  default) skips the padding's token-wise work, which likewise shows as higher MFU (little on
  short-caption stage-1 batches, whose rows differ by a few tokens).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FlopsModel:
    vit_tokens: int
    vit_width: int
    vit_depth: int
    vit_mlp: int
    patch_pixels: int  # 3 * patch^2
    has_qformer: bool
    queries: int
    q_hidden: int
    q_layers: int
    q_intermediate: int
    q_cross_layers: int
    proj_in: int
    llm_hidden: int
    llm_layers: int
    llm_intermediate: int
    llm_kv_hidden: int
    vocab: int

    @classmethod
    def from_model(cls, model) -> "FlopsModel":
        vit, q, llm_cfg = model.visual_encoder.cfg, model.qformer.cfg if model.qformer is not None else None, model.llm.config
        heads = llm_cfg.num_attention_heads
        kv_heads = getattr(llm_cfg, "num_key_value_heads", None) or heads
        return cls(
            vit_tokens=model.visual_encoder.num_tokens, vit_width=vit.embed_dim, vit_depth=vit.depth,
            vit_mlp=int(vit.embed_dim * vit.mlp_ratio), patch_pixels=3 * vit.patch_size ** 2,
            has_qformer=q is not None, queries=model.num_image_tokens, q_hidden=q.hidden_size if q else 0,
            q_layers=q.num_layers if q else 0, q_intermediate=q.intermediate_size if q else 0,
            q_cross_layers=len(range(0, q.num_layers, q.cross_attention_freq)) if q else 0,
            proj_in=model.llama_proj.in_features, llm_hidden=llm_cfg.hidden_size,
            llm_layers=llm_cfg.num_hidden_layers, llm_intermediate=llm_cfg.intermediate_size,
            llm_kv_hidden=llm_cfg.hidden_size * kv_heads // heads, vocab=llm_cfg.vocab_size)

    def vision_forward(self) -> float:
        n, d = self.vit_tokens, self.vit_width
        vit = 2 * (n - 1) * self.patch_pixels * d
        vit += self.vit_depth * (2 * n * (4 * d * d + 2 * d * self.vit_mlp) + 4 * n * n * d)
        if not self.has_qformer:
            return vit
        q, h = self.queries, self.q_hidden
        qformer = self.q_layers * (2 * q * 4 * h * h + 4 * q * q * h + 2 * q * 2 * h * self.q_intermediate)
        qformer += self.q_cross_layers * (2 * q * 2 * h * h + 2 * n * 2 * d * h + 4 * q * n * h)
        return vit + qformer

    def llm_forward(self, seq_len: int, scored: int) -> float:
        d, t = self.llm_hidden, seq_len
        per_layer = 2 * t * (2 * d * d + 2 * d * self.llm_kv_hidden + 3 * d * self.llm_intermediate) + 2 * t * t * d
        return self.llm_layers * per_layer + 2 * scored * d * self.vocab

    def step(self, batch: int, seq_len: int, scored_tokens: int, cached_features: bool = False) -> float:
        """FLOPs of one micro-batch (forward + backward)."""
        vision = 0.0 if cached_features else batch * self.vision_forward()
        proj = 3 * 2 * batch * self.queries * self.proj_in * self.llm_hidden
        return vision + proj + 2 * (batch * self.llm_forward(seq_len, scored_tokens / max(batch, 1)))
