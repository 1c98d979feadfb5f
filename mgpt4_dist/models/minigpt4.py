"""MiniGPT-4: frozen EVA ViT → ln_vision → frozen Q-Former → trainable `llama_proj` → frozen LLaMA.

The module computes the original's loss: causal-LM cross-entropy, mean over all scored tokens of
the batch. Only the positions whose next token is scored go through the LM head, which gives the
same loss without materialising [B, T, vocab] logits.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mgpt4_dist.config import ConfigError, ModelConfig, precision_dtype
from mgpt4_dist.models.build import LocalBuild, copy_state_into
from mgpt4_dist.models.llm import (PackedRows, TailScoringDecoderLayer, choose_attn_impl, enable_padding_free,
                                   enable_tail_scoring, load_llm, packed_hidden_states, runs_padding_free,
                                   tail_scoring_kwargs)
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
                 ln_vision: Optional[nn.LayerNorm] = None):
        super().__init__()
        self.visual_encoder = visual_encoder
        self.qformer = qformer
        self.llm = llm
        if qformer is None:
            if ln_vision is None:
                raise ValueError("the Llama-2 variant (no Q-Former) needs its ln_vision")
            self.ln_vision = ln_vision
        self._num_image_tokens, proj_in = vision_feature_shape(visual_encoder, qformer)
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

    def vision_features(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """The frozen towers' output, the input of llama_proj: [B, image tokens, feature width]."""
        towers = self.__dict__.get("_compiled_towers") or compute_vision_features
        return towers(self.visual_encoder, self.qformer, getattr(self, "ln_vision", None), images_BCHW)

    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] → [B, image tokens, llm_hidden] embeddings for the LLM.

        Precomputed vision features [B, image tokens, feature width] (mgpt4-cache-features) skip
        the frozen towers: the training transform is deterministic, so they are what the towers
        would compute.
        """
        features_BQH = images_BCHW if images_BCHW.ndim == 3 else self.vision_features(images_BCHW)
        return self.llama_proj(features_BQH.to(self.llama_proj.weight.dtype))

    def embed_sequence(self, image_embeds_BQD: torch.Tensor, text: TextBatch) -> torch.Tensor:
        embed = self.llm.get_input_embeddings()
        tokens_BTD = embed(text.input_ids_BT)
        slots = text.image_slots_BT.unsqueeze(-1)
        return tokens_BTD.masked_scatter(slots, image_embeds_BQD.to(tokens_BTD.dtype))

    def loss_terms(self, images_BCHW: torch.Tensor, text: TextBatch) -> LossTerms:
        return self.loss_terms_of_embeds(self.encode_image(images_BCHW), text)

    def loss_terms_of_embeds(self, image_embeds_BQD: torch.Tensor, text: TextBatch) -> LossTerms:
        """The loss with the image embeddings already in the LLM's width (what llama_proj outputs)."""
        inputs_BTD = self.embed_sequence(image_embeds_BQD, text)
        B, T, _ = inputs_BTD.shape
        # Labels shifted onto the position that predicts them, flat [B*T].
        next_labels = F.pad(text.labels_BT[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        if runs_padding_free(self.llm) and text.row_lengths:
            # model.padding_free: the LLM runs over each row's real positions only (and with
            # model.trim_last_layer its last layer over each row's answer-predicting tail).
            tail = isinstance(self.llm.model.layers[-1], TailScoringDecoderLayer)
            packing = PackedRows.build(text.row_lengths, text.row_score_from, T, inputs_BTD.device, tail=tail)
            hidden_ND = packed_hidden_states(self.llm, inputs_BTD, packing)
            out_index = packing.output_index()
        else:
            # Padding only ever trails the real tokens, so causal attention alone hides it. With
            # model.trim_last_layer the last layer outputs only positions text.score_from.. (the scored tail).
            hidden_BTD = self.llm.model(inputs_embeds=inputs_BTD, use_cache=False,
                                        **tail_scoring_kwargs(self.llm, text.score_from)).last_hidden_state
            first = T - hidden_BTD.shape[1]  # position of hidden_BTD[:, 0]
            hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
            out_index = (torch.arange(B, device=inputs_BTD.device)[:, None] * T
                         + torch.arange(first, T, device=inputs_BTD.device)).reshape(-1)
        targets_N = next_labels.index_select(0, out_index)
        scored_N = targets_N != IGNORE_INDEX
        logits_SV = self.llm.lm_head(hidden_ND[scored_N]).float()
        token_ce = F.cross_entropy(logits_SV, targets_N[scored_N], reduction="none")
        rows = torch.div(out_index[scored_N], T, rounding_mode="floor")
        num = int(token_ce.numel())
        return LossTerms(token_ce.sum() / max(num, 1), token_ce, rows, num)

    @torch.no_grad()
    def greedy_tokens(self, images_BCHW: torch.Tensor, prompt: TextBatch, max_new_tokens: int) -> torch.Tensor:
        """[B, max_new_tokens] greedy continuation of `prompt` (`SequenceBuilder.prompt`: rows of equal
        length, nothing padded), with the LLM's KV cache.

        Always exactly `max_new_tokens` LLM calls, also after every row has ended: under ZeRO-3 or
        FSDP every rank must make the same calls, since each call gathers sharded weights collectively.
        The caller cuts each row at its stop string."""
        if not bool(prompt.attention_mask_BT.all()):
            raise ValueError("greedy_tokens needs prompts of equal length (one instruction for every row)")
        inputs_BTD = self.embed_sequence(self.encode_image(images_BCHW), prompt)
        # The KV cache is `cache` in recent transformers, `past_key_values` before.
        cache_name = "cache" if "cache" in inspect.signature(self.llm.forward).parameters else "past_key_values"
        out = self.llm(inputs_embeds=inputs_BTD, use_cache=True, logits_to_keep=1)
        next_B = out.logits[:, -1].argmax(-1)
        generated = [next_B]
        for _ in range(max_new_tokens - 1):
            out = self.llm(input_ids=next_B[:, None], use_cache=True, logits_to_keep=1,
                           **{cache_name: getattr(out, cache_name)})
            next_B = out.logits[:, -1].argmax(-1)
            generated.append(next_B)
        return torch.stack(generated, dim=1)

    def forward(self, images_BCHW: torch.Tensor, text: TextBatch, generate_tokens: int = 0) -> torch.Tensor:
        """The loss of `text`'s answers; with `generate_tokens` > 0 the greedy continuation of the prompt
        `text` instead. Generation is a mode of forward because forward is what the engines hook: a
        call of the root module is where FSDP2 gathers its root unit and ZeRO-3 starts its fetches."""
        if generate_tokens > 0:
            return self.greedy_tokens(images_BCHW, text, generate_tokens)
        return self.loss_terms(images_BCHW, text).loss


# --------------------------------------------------------------------------- the frozen vision towers

def vision_feature_shape(visual_encoder: EvaViT, qformer: Optional[QFormer]) -> tuple[int, int]:
    """(image tokens, feature width) that the towers hand to llama_proj."""
    if qformer is not None:
        return qformer.cfg.num_query_tokens, qformer.cfg.hidden_size
    num_patches = visual_encoder.num_tokens - 1
    if num_patches % PATCHES_PER_TOKEN:
        raise ConfigError(f"the Llama-2 variant (model.has_qformer=false) needs a patch count divisible by "
                          f"{PATCHES_PER_TOKEN}, got {num_patches} from model.vit.img_size / model.vit.patch_size")
    return num_patches // PATCHES_PER_TOKEN, visual_encoder.cfg.embed_dim * PATCHES_PER_TOKEN


def compute_vision_features(visual_encoder: EvaViT, qformer: Optional[QFormer], ln_vision: Optional[nn.LayerNorm],
                            images_BCHW: torch.Tensor) -> torch.Tensor:
    # The towers are frozen: no autograd graph, so no activations are kept for them, and the output
    # is a plain tensor without history (llama_proj's backward needs it as it is).
    with torch.no_grad():
        vit_dtype = next(visual_encoder.parameters()).dtype
        image_tokens_BND = visual_encoder(images_BCHW.to(vit_dtype))
        # The ViT may run in its own precision (model.vit_precision); what follows it runs in its own
        # dtype, ln_vision included (the original's ln_vision normalises in fp32 whatever the ViT ran in).
        after = qformer if qformer is not None else ln_vision
        image_tokens_BND = image_tokens_BND.to(next(after.parameters()).dtype)
        if qformer is not None:
            return qformer(image_tokens_BND)
        patches_BND = ln_vision(image_tokens_BND)[:, 1:, :]
        B, N, D = patches_BND.shape
        return patches_BND.reshape(B, N // PATCHES_PER_TOKEN, D * PATCHES_PER_TOKEN)


def vision_feature_shape_of(cfg: ModelConfig) -> tuple[int, int]:
    """(image tokens, feature width) the towers of `cfg` produce, from the config alone (what a
    cached-feature shard must hold; see `vision_feature_shape` for built towers)."""
    if cfg.has_qformer:
        return cfg.qformer.num_query_tokens, cfg.qformer.hidden_size
    patches = (cfg.vit.img_size // cfg.vit.patch_size) ** 2
    return patches // PATCHES_PER_TOKEN, cfg.vit.embed_dim * PATCHES_PER_TOKEN


def vit_dtype(cfg: ModelConfig, train_dtype: torch.dtype) -> torch.dtype:
    """The frozen ViT's dtype: model.vit_precision, or the training precision for `train`."""
    return train_dtype if cfg.vit_precision == "train" else precision_dtype(cfg.vit_precision)


def build_vision_towers(cfg: ModelConfig, *, seed: int, dtype: torch.dtype = torch.float32,
                        build: Optional[LocalBuild] = None, proj_source: Optional[dict] = None,
                        ) -> tuple[EvaViT, Optional[QFormer], Optional[nn.LayerNorm]]:
    """ViT + (Q-Former | ln_vision of the Llama-2 variant), weights loaded, seeded part by part.

    The ViT is built in `vit_dtype(cfg, dtype)`, the rest in `dtype`. A plain build creates fp32
    and casts after loading, so random parts draw the same numbers whatever the dtype."""
    from mgpt4_dist.models import weights as weight_files

    build = build or LocalBuild()
    plain = not build.sharded
    torch.manual_seed(seed)
    with build.construct(torch.float32 if plain else vit_dtype(cfg, dtype)):
        vit = EvaViT(cfg.vit)
    torch.manual_seed(seed + 1)
    with build.construct(torch.float32 if plain else dtype):
        qformer = QFormer(cfg.qformer, vision_width=cfg.vit.embed_dim, ln_vision_eps=cfg.ln_vision_eps) if cfg.has_qformer else None
        ln_vision = None if cfg.has_qformer else nn.LayerNorm(cfg.vit.embed_dim, eps=cfg.ln_vision_eps)
    for module in (vit, qformer, ln_vision):
        if module is not None:
            build.built(module)
    if cfg.vit_checkpoint:
        weight_files.load_vit_checkpoint(vit, cfg.vit_checkpoint, build)
    if cfg.qformer_checkpoint:
        if qformer is None:
            raise ConfigError("model.qformer_checkpoint is set but model.has_qformer=false (the Llama-2 variant has no "
                              "Q-Former): set model.qformer_checkpoint= (empty)")
        weight_files.load_qformer_checkpoint(qformer, cfg.qformer_checkpoint, build)
    if ln_vision is not None and cfg.proj_checkpoint:
        weight_files.load_ln_vision_from_proj_checkpoint(ln_vision, cfg.proj_checkpoint, build, proj_source)
    for module in (vit, qformer, ln_vision):
        if module is not None:  # frozen towers never train: no dropout
            module.eval().requires_grad_(False)
    return vit, qformer, ln_vision


# --------------------------------------------------------------------------- building and freezing

def build_minigpt4(cfg: ModelConfig, *, seed: int, dtype: torch.dtype = torch.float32,
                   device_type: str = "cpu", build: Optional[LocalBuild] = None,
                   proj_source: Optional[dict] = None) -> MiniGPT4:
    """Build the model, load every configured weight file, and freeze all but llama_proj.

    Random parts are seeded from `seed` part by part, so every rank, backend and world size
    starts from identical weights. `build` decides how parameters are created (whole, or
    partitioned as they are created: see `mgpt4_dist.models.build`). `proj_source`: the tensors of
    `model.proj_checkpoint` already read (`mgpt4_dist.checkpoint.state.proj_state_for` reads a
    training run or step folder too); without it the path must be a weight file or an
    mgpt4-consolidate folder.
    """
    from mgpt4_dist.models import weights as weight_files

    build = build or LocalBuild()
    vit, qformer, ln_vision = build_vision_towers(cfg, seed=seed, dtype=dtype, build=build, proj_source=proj_source)
    llm = load_llm(cfg.llm_path, dtype=dtype, attn_impl=choose_attn_impl(cfg.attn_impl, device_type), build=build)
    if cfg.padding_free:
        enable_padding_free(llm)
    if cfg.trim_last_layer:
        enable_tail_scoring(llm)
    with build.construct(torch.float32 if not build.sharded else dtype):
        model = MiniGPT4(vit, qformer, llm, ln_vision=ln_vision)
    if cfg.proj_checkpoint:
        weight_files.load_proj_checkpoint(model.llama_proj, cfg.proj_checkpoint, build, proj_source)
    else:
        log.info("weights: llama_proj randomly initialised (no model.proj_checkpoint)")
        init_llama_proj(model.llama_proj, initial_proj_seed(seed), build)
    if not build.sharded:
        cast_parameters(model, dtype, vit_dtype(cfg, dtype))
    build.built(model)
    apply_freezing(model)
    log.info("attention: LLM %s%s, ViT %s, Q-Former %s", llm.config._attn_implementation,
             " (padding-free training: SDPA)" if cfg.padding_free else "",
             "sdpa" if getattr(vit.eva.blocks[0].attn, "fused_attn", False) else "eager",
             qformer.bert.config._attn_implementation if qformer is not None else "-")
    return model


def cast_parameters(model: MiniGPT4, dtype: torch.dtype, vit_dt: torch.dtype) -> None:
    """Parameters to `dtype`, the ViT (parameters and its zero k-bias buffers) straight to its own.

    Straight, not via `dtype`: an fp16 ViT cast through bf16 would lose the mantissa bits bf16
    lacks. Other buffers stay as built: the LLM's rotary `inv_freq` is fp32, as the original keeps
    it, as DeepSpeed's own cast keeps it, and as the zero.Init build creates it."""
    model.visual_encoder.to(vit_dt)
    vit_params = {id(p) for p in model.visual_encoder.parameters()}
    for p in model.parameters():
        if id(p) not in vit_params and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def initial_proj_seed(seed: int) -> int:
    """The seed llama_proj's initial state is drawn from, for a model built with `seed`: a run's
    projection at step 0 can be rebuilt from its config alone (the tiny learning probe does)."""
    return seed + 2


def draw_linear_init(out_features: int, in_features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) in fp32 as nn.Linear's default init draws them, from `generator`."""
    weight = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(weight, a=5 ** 0.5, generator=generator)
    bound = 1 / in_features ** 0.5
    return weight, torch.empty(out_features).uniform_(-bound, bound, generator=generator)


def init_llama_proj(proj: nn.Linear, seed: int, build: LocalBuild) -> None:
    """nn.Linear's default init drawn in fp32 from `seed`, then written in the parameter's dtype:
    the same numbers whether the layer was created whole or partitioned, in fp32 or not."""
    weight, bias = draw_linear_init(*build.full_shape(proj.weight), torch.Generator().manual_seed(seed))
    copy_state_into(proj, {"weight": weight, "bias": bias}, build)


def apply_freezing(model: MiniGPT4) -> None:
    """The one place that decides what trains: llama_proj only."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(TRAINABLE_PREFIXES)
    model.train()


def audit_trainable(model: nn.Module, build: Optional[LocalBuild] = None) -> dict:
    """Count trainable/frozen parameters and fail if anything but llama_proj would train."""
    build = build or LocalBuild()
    trainable, frozen, wrong = 0, 0, []
    for name, param in model.named_parameters():
        clean = name.removeprefix("module.")
        numel = build.full_numel(param)  # a partitioned parameter holds an empty placeholder
        if param.requires_grad:
            trainable += numel
            if not clean.startswith(TRAINABLE_PREFIXES):
                wrong.append(clean)
        else:
            frozen += numel
            if clean.startswith(TRAINABLE_PREFIXES):
                wrong.append(clean + " (frozen but should train)")
    if wrong or trainable == 0:
        raise RuntimeError(f"trainable parameter set is not llama_proj only: {wrong[:5] or 'nothing trains'}")
    return {"trainable_params": trainable, "frozen_params": frozen}


def transformer_blocks(model: MiniGPT4) -> list[nn.Module]:
    """The repeated blocks of the three towers: ViT blocks, Q-Former layers, LLM decoder layers."""
    blocks = list(model.visual_encoder.eva.blocks)
    if model.qformer is not None:
        blocks += list(model.qformer.bert.encoder.layer)
    return blocks + list(model.llm.model.layers)
