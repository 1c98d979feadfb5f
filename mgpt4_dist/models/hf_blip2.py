"""Our MiniGPT4 ↔ transformers' `Blip2ForConditionalGeneration`: tensor names, both directions,
and the model config a Blip2 config describes.

MiniGPT-4 (Vicuna, with Q-Former) is BLIP-2's architecture with a LLaMA text model. Names as in
transformers 5.x `modeling_blip_2.py` (the export checks every tensor against the model built on
the meta device):

| ours (MiniGPT4 state dict)                     | transformers                                      |
| `visual_encoder.eva.cls_token` / `pos_embed`   | `vision_model.embeddings.class_embedding` / `position_embedding` |
| `visual_encoder.eva.patch_embed.proj.*`        | `vision_model.embeddings.patch_embedding.*`       |
| `...blocks.N.norm1/norm2.*`                    | `vision_model.encoder.layers.N.layer_norm1/2.*`   |
| `...blocks.N.attn.qkv.weight`                  | `...layers.N.self_attn.qkv.weight`                |
| `...blocks.N.attn.q_bias`, `v_bias`            | `...layers.N.self_attn.qkv.bias` = [q_bias, 0, v_bias] (EVA has no k bias) |
| `...blocks.N.attn.proj.*`, `mlp.fc1/fc2.*`     | `...self_attn.projection.*`, `mlp.fc1/fc2.*`      |
| `qformer.ln_vision.*`                          | `vision_model.post_layernorm.*`                   |
| `qformer.query_tokens`                         | `query_tokens`                                    |
| `qformer.bert.*` (transformers' own Q-Former)  | `qformer.*`                                       |
| `llama_proj.*`                                 | `language_projection.*`                           |
| `llm.*` (LlamaForCausalLM)                     | `language_model.*`                                |

transformers places the image embeddings where `input_ids` hold `image_token_id`; the export
gives `<image>` the id right after the LLM's vocabulary, so the LLM's input embedding and LM
head carry one extra row there (`IMAGE_ROW_*`), dropped again when a folder is read back.
"""
from __future__ import annotations

import re
from typing import Dict, Iterator, List, Tuple

import torch

IMAGE_TOKEN = "<image>"
EMBED = "language_model.model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"

# (our pattern, transformers replacement, transformers pattern, our replacement)
_PAIRS = [
    (r"^visual_encoder\.eva\.cls_token$", "vision_model.embeddings.class_embedding",
     r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.eva.cls_token"),
    (r"^visual_encoder\.eva\.pos_embed$", "vision_model.embeddings.position_embedding",
     r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.eva.pos_embed"),
    (r"^visual_encoder\.eva\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding.",
     r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.eva.patch_embed.proj."),
    (r"^visual_encoder\.eva\.blocks\.(\d+)\.norm(1|2)\.", r"vision_model.encoder.layers.\1.layer_norm\2.",
     r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm(1|2)\.", r"visual_encoder.eva.blocks.\1.norm\2."),
    (r"^visual_encoder\.eva\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision_model.encoder.layers.\1.self_attn.qkv.weight",
     r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"visual_encoder.eva.blocks.\1.attn.qkv.weight"),
    (r"^visual_encoder\.eva\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection.",
     r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.eva.blocks.\1.attn.proj."),
    (r"^visual_encoder\.eva\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"vision_model.encoder.layers.\1.mlp.\2.",
     r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"visual_encoder.eva.blocks.\1.mlp.\2."),
    (r"^qformer\.ln_vision\.", "vision_model.post_layernorm.", r"^vision_model\.post_layernorm\.", "qformer.ln_vision."),
    (r"^qformer\.query_tokens$", "query_tokens", r"^query_tokens$", "qformer.query_tokens"),
    (r"^qformer\.bert\.", "qformer.", r"^qformer\.", "qformer.bert."),
    (r"^llama_proj\.", "language_projection.", r"^language_projection\.", "llama_proj."),
    (r"^llm\.", "language_model.", r"^language_model\.", "llm."),
]
_TO_HF: List[Tuple[re.Pattern, str]] = [(re.compile(a), b) for a, b, _, _ in _PAIRS]
_FROM_HF: List[Tuple[re.Pattern, str]] = [(re.compile(c), d) for _, _, c, d in _PAIRS]
_QV_BIAS = re.compile(r"^visual_encoder\.eva\.blocks\.(\d+)\.attn\.(q_bias|v_bias)$")
_QKV_BIAS = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")


def _rename(name: str, table: List[Tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in table:
        if pattern.search(name):
            return pattern.sub(replacement, name, count=1)
    raise KeyError(f"{name}: no counterpart in the MiniGPT-4 <-> Blip2ForConditionalGeneration mapping")


def to_hf_tensors(tensors: Iterator[Tuple[str, torch.Tensor]], image_rows: int = 1) -> Iterator[Tuple[str, torch.Tensor]]:
    """Our (name, tensor) stream → transformers' (name, tensor) stream.

    A ViT block's q/v biases become its fused qkv bias [q, 0, v]. The LLM's input embedding and LM
    head get `image_rows` rows for the image token: the mean embedding (never read: an image
    embedding replaces it) and zeros (a logit of 0)."""
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        qv = _QV_BIAS.match(name)
        if qv:
            block = pending.setdefault(qv.group(1), {})
            block[qv.group(2)] = tensor
            if len(block) == 2:
                q, v = block.pop("q_bias"), block.pop("v_bias")
                del pending[qv.group(1)]
                yield f"vision_model.encoder.layers.{qv.group(1)}.self_attn.qkv.bias", torch.cat([q, torch.zeros_like(q), v])
            continue
        if name.endswith("rotary_emb.inv_freq"):  # computed by transformers, never loaded
            continue
        out = _rename(name, _TO_HF)
        if image_rows and out == EMBED:
            tensor = torch.cat([tensor, tensor.float().mean(0, keepdim=True).to(tensor.dtype).expand(image_rows, -1)])
        elif image_rows and out == LM_HEAD:
            tensor = torch.cat([tensor, tensor.new_zeros(image_rows, tensor.shape[1])])
        yield out, tensor
    if pending:
        raise ValueError(f"ViT blocks {sorted(pending)}: a q_bias without its v_bias or the other way round")


def from_hf_tensors(tensors: Iterator[Tuple[str, torch.Tensor]], vocab_size: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """transformers' (name, tensor) stream → ours; the LLM's rows past `vocab_size` (the image
    token's) are dropped. A fused qkv bias must have a zero k part (EVA's attention has none)."""
    for name, tensor in tensors:
        qkv = _QKV_BIAS.match(name)
        if qkv:
            q, k, v = tensor.chunk(3)
            if torch.count_nonzero(k):
                raise ValueError(f"{name}: the k part of the qkv bias is not zero; EVA's attention has no k bias")
            prefix = f"visual_encoder.eva.blocks.{qkv.group(1)}.attn."
            yield prefix + "q_bias", q
            yield prefix + "v_bias", v
            continue
        if name in (EMBED, LM_HEAD):
            tensor = tensor[:vocab_size]
        yield _rename(name, _FROM_HF), tensor


def model_config_from_hf(config) -> "ModelConfig":
    """The ModelConfig whose towers have the shapes of a `Blip2Config` (weight paths left empty)."""
    from mgpt4_dist.config import ModelConfig, QFormerConfig, ViTConfig

    vision, qformer = config.vision_config, config.qformer_config
    return ModelConfig(
        vit=ViTConfig(img_size=vision.image_size, patch_size=vision.patch_size, embed_dim=vision.hidden_size,
                      depth=vision.num_hidden_layers, num_heads=vision.num_attention_heads,
                      # timm's Mlp width is int(embed_dim * mlp_ratio): the half keeps the int exact
                      mlp_ratio=(vision.intermediate_size + 0.5) / vision.hidden_size,
                      norm_eps=vision.layer_norm_eps),
        has_qformer=True,
        qformer=QFormerConfig(hidden_size=qformer.hidden_size, num_layers=qformer.num_hidden_layers,
                              num_heads=qformer.num_attention_heads, intermediate_size=qformer.intermediate_size,
                              cross_attention_freq=qformer.cross_attention_frequency,
                              num_query_tokens=config.num_query_tokens, layer_norm_eps=qformer.layer_norm_eps))
