"""The frozen LLaMA/Vicuna language model, its tokenizer, and the attention-kernel choice."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, repeat_kv, rotate_half

from mgpt4_dist.config import PAD_TOKEN
from mgpt4_dist.errors import CheckpointMismatchError, InvalidInputError, MissingFileError

log = logging.getLogger(__name__)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attn_impl(requested: str, device_type: str) -> str:
    """Map model.attn_impl to a transformers attention implementation.

    auto: flash-attn when it is installed and we run on CUDA, else PyTorch SDPA.
    """
    if requested == "auto":
        return "flash_attention_2" if (device_type == "cuda" and flash_attn_available()) else "sdpa"
    if requested == "flash":
        if device_type != "cuda":
            raise InvalidInputError("model.attn_impl=flash needs a CUDA device; use auto or sdpa on CPU")
        if not flash_attn_available():
            raise InvalidInputError("model.attn_impl=flash but flash-attn is not installed: pip install .[flash]")
        return "flash_attention_2"
    if requested in ("sdpa", "eager"):
        return requested
    raise ValueError(f"model.attn_impl: unknown value {requested!r}")


def load_tokenizer(llm_path: str):
    """The LLM folder's tokenizer with MiniGPT-4's pad token.

    Each separately tokenized string gets sentencepiece's dummy prefix, as the original's slow
    LlamaTokenizer does; `$$` must be an existing piece (setting it must not grow the vocab).
    """
    if os.path.isfile(os.path.join(llm_path, "tokenizer.model")):
        tok = _tokenizer_from_sentencepiece(llm_path)
    else:
        tok = AutoTokenizer.from_pretrained(llm_path)
    vocab_before = len(tok)
    tok.pad_token = PAD_TOKEN
    if len(tok) != vocab_before:
        raise InvalidInputError(f"{llm_path}: the tokenizer has no '{PAD_TOKEN}' piece; MiniGPT-4 pads with it")
    return tok


def _tokenizer_from_sentencepiece(llm_path: str):
    """A tokenizer built from `tokenizer.model` alone, as the original's slow LlamaTokenizer reads it.

    transformers' converted LlamaTokenizer (and a saved tokenizer.json) drop the dummy prefix of
    text that starts with whitespace; building from the sentencepiece model keeps it. The other
    files are left behind so a tokenizer.json cannot take precedence.
    """
    from transformers import TokenizersBackend

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(os.path.join(llm_path, "tokenizer.model"), os.path.join(tmp, "tokenizer.model"))
        config = {}
        if os.path.isfile(os.path.join(llm_path, "tokenizer_config.json")):
            with open(os.path.join(llm_path, "tokenizer_config.json")) as f:
                config = json.load(f)
        config.update(tokenizer_class="TokenizersBackend", legacy=True)
        for key in ("bos_token", "eos_token", "unk_token"):
            config.setdefault(key, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}[key])
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        return TokenizersBackend.from_pretrained(tmp)


def load_llm(llm_path: str, dtype: torch.dtype, attn_impl: str = "sdpa", build=None) -> LlamaForCausalLM:
    if not llm_path:
        raise InvalidInputError("model.llm_path is empty: point it at a Hugging Face LLaMA folder "
                         "(mgpt4-make-tiny-assets writes a tiny one)")
    if not os.path.isfile(os.path.join(llm_path, "config.json")):
        raise MissingFileError(f"model.llm_path={llm_path}: no config.json there; expected a Hugging Face LLaMA folder")
    from mgpt4_dist.models.weights import log_weight_files

    log_weight_files("LLM (model.llm_path)", llm_path)
    if build is not None and build.sharded:
        return _load_llm_into_sharded(llm_path, dtype, attn_impl, build)
    # Old folders may carry rotary_emb.inv_freq buffers; transformers drops them. Anything missing
    # or mis-shaped would be silently re-initialised: refuse that instead.
    llm, info = LlamaForCausalLM.from_pretrained(llm_path, dtype=dtype, attn_implementation=attn_impl,
                                                 output_loading_info=True)
    missing, mismatched = sorted(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if missing or mismatched:

        raise CheckpointMismatchError(
            f"{llm_path}: the LLM weights do not fit its config.json: "
            + (f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})" if missing else "")
            + (f" mis-shaped {mismatched[:3]}" if mismatched else ""))
    log.info("loaded LLM %s (%s, attention=%s)", llm_path, dtype, attn_impl)
    return llm


# Keys of old LLM folders that current transformers computes instead of loading.
_DERIVED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


class _WeightFiles:
    """The tensors of an LLM folder (safetensors or .bin, single or sharded), by key, read lazily."""

    def __init__(self, llm_path: str):
        import glob

        from safetensors import safe_open

        files = sorted(glob.glob(os.path.join(llm_path, "*.safetensors")))
        self.shapes, self._where = {}, {}
        if files:
            for f in files:
                handle = safe_open(f, framework="pt")
                for key in handle.keys():
                    self.shapes[key] = tuple(handle.get_slice(key).get_shape())
                    self._where[key] = (handle, key)
            return
        files = sorted(glob.glob(os.path.join(llm_path, "pytorch_model*.bin")))
        if not files:
            raise MissingFileError(f"model.llm_path={llm_path}: no *.safetensors or pytorch_model*.bin weight files")
        for f in files:
            # Mapped, not read: pages are touched only for the tensors that are copied.
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            for key, value in state.items():
                self.shapes[key] = tuple(value.shape)
                self._where[key] = (state, key)

    def tensor(self, key: str) -> torch.Tensor:
        source, name = self._where[key]
        return source[name] if isinstance(source, dict) else source.get_tensor(name)


class _LazyState(dict):
    """A state dict whose values are read from the files only when copied (by the writing rank)."""

    def __init__(self, files: _WeightFiles, keys):
        super().__init__((k, None) for k in keys)
        self._files = files

    def __getitem__(self, key):
        return self._files.tensor(key)


def _load_llm_into_sharded(llm_path: str, dtype: torch.dtype, attn_impl: str, build) -> LlamaForCausalLM:
    """Construct the LLM with its parameters partitioned as they are created, then fill them one
    module at a time: every rank reads the files' keys and shapes (metadata only) so a bad folder
    fails on all ranks alike; only the rank whose writes are kept reads tensor values."""
    from transformers import LlamaConfig
    from transformers.initialization import no_init_weights

    from mgpt4_dist.models.build import copy_state_into

    config = LlamaConfig.from_pretrained(llm_path)
    config._attn_implementation = attn_impl
    # Random init of weights that are all overwritten next would cost a gather per module.
    with build.construct(dtype), no_init_weights():
        llm = LlamaForCausalLM(config)
    build.built(llm)
    files = _WeightFiles(llm_path)
    expected = {k: build.full_shape(v) for k, v in llm.state_dict(keep_vars=True).items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # the same tensor as the input embedding
    missing = sorted(k for k in expected if k not in files.shapes)
    mismatched = [(k, list(files.shapes[k]), list(want)) for k, want in expected.items()
                  if k in files.shapes and files.shapes[k] != want]
    if missing or mismatched:
        raise CheckpointMismatchError(
            f"{llm_path}: the LLM weights do not fit its config.json: "
            + (f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})" if missing else "")
            + (f" mis-shaped (key, file, model) {mismatched[:3]}" if mismatched else ""))
    unexpected = [k for k in files.shapes if k not in expected and not k.endswith(_DERIVED_KEY_SUFFIXES)]
    if unexpected:
        log.warning("%s: %d tensors not used by LlamaForCausalLM (e.g. %s)", llm_path, len(unexpected), unexpected[:3])
    copy_state_into(llm, _LazyState(files, expected), build)
    build.built(llm)
    log.info("loaded LLM %s (%s, attention=%s) into partitioned parameters", llm_path, dtype, attn_impl)
    return llm


# --------------------------------------------------------------------------- training forwards: padding-free rows, scored tail

@dataclass
class PackedRows:
    """A right-padded [B, T] batch without its padding: the real positions of every row back to back.

    Token-wise work (norms, projections, MLP) runs over these N positions only; attention scatters
    queries, keys and values back to the padded layout for one causal SDPA call, where padding trails
    each row's real tokens and so is never attended from a real position.
    """

    index: torch.Tensor  # [N] flat positions (row * T + t) of the real tokens, row-major
    positions: torch.Tensor  # [N] t: each token's position in its own row (for rotary)
    # [M] which of the N positions the last layer computes (from each row's first answer-predicting
    # position to its end: the scored tail); None: all of them.
    tail: Optional[torch.Tensor]
    batch: int
    seq_len: int

    @classmethod
    def build(cls, row_lengths: Sequence[int], row_score_from: Sequence[int], seq_len: int, device,
              tail: bool) -> "PackedRows":
        index, positions, tail_positions, packed = [], [], [], 0
        for row, (length, first) in enumerate(zip(row_lengths, row_score_from)):
            index.append(torch.arange(row * seq_len, row * seq_len + length))
            positions.append(torch.arange(length))
            if tail:
                tail_positions.append(torch.arange(packed + first, packed + length))
            packed += length
        to_device = lambda parts: torch.cat(parts).to(device, non_blocking=True)  # noqa: E731
        return cls(to_device(index), to_device(positions), to_device(tail_positions) if tail else None,
                   len(row_lengths), seq_len)

    def output_index(self) -> torch.Tensor:
        """Flat [B*T] positions of the rows `packed_hidden_states` returns."""
        return self.index if self.tail is None else self.index.index_select(0, self.tail)

    def attend(self, q_nHd: torch.Tensor, k_nHd: torch.Tensor, v_nHd: torch.Tensor, q_positions: Optional[torch.Tensor],
               groups: int, scale: float) -> torch.Tensor:
        """Causal attention of packed queries (all N positions, or those at `q_positions`) over the packed
        keys/values of their own rows; returns [queries, heads * head_dim]."""
        B, T = self.batch, self.seq_len
        q_index = self.index if q_positions is None else self.index.index_select(0, q_positions)

        def padded(t_nHd, at):  # [n, H, d] -> [B, H, T, d], zeros where nothing is placed
            # index_put rather than index_copy: its backward keeps the index only, not the source.
            full = t_nHd.new_zeros(B * T, *t_nHd.shape[1:]).index_put((at,), t_nHd)
            return full.view(B, T, *t_nHd.shape[1:]).transpose(1, 2)

        k, v = (repeat_kv(padded(t, self.index), groups) for t in (k_nHd, v_nHd))
        out = F.scaled_dot_product_attention(padded(q_nHd, q_index), k, v, is_causal=True, scale=scale)
        return out.transpose(1, 2).reshape(B * T, -1).index_select(0, q_index)


class PaddingFreeDecoderLayer(LlamaDecoderLayer):
    """A LLaMA decoder layer that also runs on `PackedRows` (model.padding_free; the loss forward only).

    `packed_hidden_states` hands every layer the packed [N, D] hidden states and `packing`; without
    it (generation, a KV cache, evaluation through `llm(...)`) this is the plain layer."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, packing: Optional[PackedRows] = None, **kwargs):
        if packing is None:
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                   **kwargs)
        return self.packed_forward(hidden_states, position_embeddings, packing, q_positions=None)

    def packed_forward(self, hidden_ND, position_embeddings, packing: PackedRows, q_positions: Optional[torch.Tensor]):
        """The layer over packed positions; with `q_positions`, only those positions' outputs are computed
        (keys and values still come from all of them)."""
        attn = self.self_attn
        N = hidden_ND.shape[0]
        normed = self.input_layernorm(hidden_ND)
        cos, sin = (t.reshape(N, 1, -1) for t in position_embeddings)  # [N, 1, head_dim]
        if q_positions is not None:
            hidden_ND, q_in = hidden_ND.index_select(0, q_positions), normed.index_select(0, q_positions)
            q_cos, q_sin = cos.index_select(0, q_positions), sin.index_select(0, q_positions)
        else:
            q_in, q_cos, q_sin = normed, cos, sin
        # unflatten, not view(n, -1, d): an empty tail (no row with an answer) has n = 0.
        q = attn.q_proj(q_in).unflatten(-1, (-1, attn.head_dim))
        k = attn.k_proj(normed).unflatten(-1, (-1, attn.head_dim))
        v = attn.v_proj(normed).unflatten(-1, (-1, attn.head_dim))
        q = (q * q_cos) + (rotate_half(q) * q_sin)
        k = (k * cos) + (rotate_half(k) * sin)
        out = packing.attend(q, k, v, q_positions, attn.num_key_value_groups, attn.scaling)
        hidden = hidden_ND + attn.o_proj(out)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def enable_padding_free(llm: LlamaForCausalLM) -> None:
    """Make every decoder layer a PaddingFreeDecoderLayer (same modules, parameters and keys)."""
    for layer in llm.model.layers:
        if type(layer) is not LlamaDecoderLayer:
            raise TypeError(f"model.padding_free: expected LlamaDecoderLayer, got {type(layer).__name__}")
        layer.__class__ = PaddingFreeDecoderLayer
    llm.padding_free = True  # a plain attribute: not a parameter, buffer or config entry


def runs_padding_free(llm: LlamaForCausalLM) -> bool:
    return getattr(llm, "padding_free", False)


def packed_hidden_states(llm: LlamaForCausalLM, inputs_BTD: torch.Tensor, packing: PackedRows) -> torch.Tensor:
    """The decoder stack and final norm over the packed positions: [rows of `packing.output_index()`, D].

    LlamaModel's own forward is not used: it would build a mask for the packed sequence that nothing
    here reads (and check it on the host); positions restart in every row, so rotary is per row."""
    B, T, D = inputs_BTD.shape
    hidden_ND = inputs_BTD.reshape(B * T, D).index_select(0, packing.index)
    position_embeddings = llm.model.rotary_emb(hidden_ND[None], position_ids=packing.positions[None])
    for layer in llm.model.layers[: llm.config.num_hidden_layers]:
        hidden_ND = layer(hidden_ND, position_embeddings=position_embeddings, packing=packing)
    return llm.model.norm(hidden_ND)


class TailScoringDecoderLayer(PaddingFreeDecoderLayer):
    """The LLM's last decoder layer, which in training computes only the tail that is scored.

    Only positions whose next token is scored reach the LM head, and in the last layer nothing else
    reads a position's output: from `score_from` on (padded batches), or from each row's first
    answer-predicting position (`PackedRows.tail`), the layer computes queries, attention output,
    o_proj and MLP; keys and values still come from every position. The same operations as
    LlamaDecoderLayer on the kept rows (rotary, causal softmax attention, residuals), so the same
    loss and gradients, for a fraction of the layer's query-side and MLP work. Without `score_from`
    or `packing` (generation, evaluation through `llm(...)`, a KV cache) it is the plain layer.

    `score_from` arrives as a keyword of the LlamaModel call (`tail_scoring_kwargs`): transformers
    hands call keywords to every decoder layer and its attention function, which ignore unknown
    ones, and an argument (unlike module state) is what activation checkpointing replays.
    """

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, score_from: int = 0, packing: Optional[PackedRows] = None, **kwargs):
        if packing is not None:
            return self.packed_forward(hidden_states, position_embeddings, packing, q_positions=packing.tail)
        start = score_from
        if not start or cache is not None or use_cache:
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                   **kwargs)
        # The training call: causal attention over the whole row, no padding mask (padding trails the
        # scored tokens), so whatever form `attention_mask` takes it is the causal pattern rebuilt below.
        attn = self.self_attn
        B, T, _ = hidden_states.shape
        keep = T - start
        normed = self.input_layernorm(hidden_states)
        q = attn.q_proj(normed[:, start:]).view(B, keep, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(B, T, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(B, T, -1, attn.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q = (q * cos[:, :, start:]) + (rotate_half(q) * sin[:, :, start:])
        k = (k * cos) + (rotate_half(k) * sin)
        k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
        # Query row i is position start + i: it sees keys 0 .. start + i.
        causal = torch.ones(keep, T, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=attn.scaling)
        hidden = hidden_states[:, start:] + attn.o_proj(out.transpose(1, 2).reshape(B, keep, -1))
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def enable_tail_scoring(llm: LlamaForCausalLM) -> None:
    """Make the last decoder layer a TailScoringDecoderLayer (same module, parameters and keys)."""
    last = llm.model.layers[-1]
    if type(last) not in (LlamaDecoderLayer, PaddingFreeDecoderLayer):
        raise TypeError(f"model.trim_last_layer: expected a LlamaDecoderLayer, got {type(last).__name__}")
    last.__class__ = TailScoringDecoderLayer


def tail_scoring_kwargs(llm: LlamaForCausalLM, score_from: int) -> dict:
    """Keywords for `llm.model(...)`: the last layer outputs positions score_from.. only, when it can."""
    if score_from > 0 and isinstance(llm.model.layers[-1], TailScoringDecoderLayer):
        return {"score_from": score_from}
    return {}
