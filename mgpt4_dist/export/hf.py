"""Export to Hugging Face transformers: MiniGPT-4 (Vicuna, with Q-Former) as a folder that
`Blip2ForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load with no
code of ours. The tensor mapping is `mgpt4_dist.models.hf_blip2`; this module writes the folder.

Beyond names:
- The image token. `<image>` is a new special token with the id right after the LLM's vocabulary;
  the LLM's embedding and LM head get one row for it (the embedding row is never read, an image
  embedding replaces it; the LM-head row is zero, so its logit is 0). Logits over the original
  vocabulary are unchanged.
- LayerNorm eps. `Blip2VisionConfig` has one `layer_norm_eps` for the ViT blocks' norms and
  `post_layernorm`, while the blocks use 1e-6 and `ln_vision` 1e-5. The export keeps the 2·depth
  block norms exact (1e-6); `post_layernorm` then normalises with 1e-6 instead of 1e-5, which
  changes each normalised value by a relative amount of at most (1e-5 - 1e-6) / (2·var) for a
  token whose variance over channels is var (`ln_vision_eps_bound`); the parity tests measure it.
- The processor. The chat template renders MiniGPT-4's conversation (`inference.conversation`)
  with `<Img><image></Img>` where the original has `<Img><ImageHere></Img>`; the processor
  repeats `<image>` num_query_tokens times there. The tokenizer keeps sentencepiece's dummy
  prefix after a special token (`legacy`), so the text after the image tokens is tokenized as the
  original tokenizes that piece on its own. Images: square bicubic resize, CLIP mean/std; load
  with `backend="pil"` for PIL's bicubic, bit for bit what training computes (transformers'
  default torchvision resize differs by a few 1/255 steps).

Weights are streamed: the towers are built once (as `load_model` builds them), the LLM is read
tensor by tensor from its shards, and output shards are written as they fill.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from mgpt4_dist.config import JobConfig
from mgpt4_dist.errors import InvalidInputError, UserError
from mgpt4_dist.export.inference_config import is_consolidated
from mgpt4_dist.export.shards import ShardWriter
from mgpt4_dist.models.hf_blip2 import IMAGE_TOKEN, to_hf_tensors

DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


class UnsupportedForHFError(UserError, ValueError):
    """A model transformers has no exact class for."""


# --------------------------------------------------------------------------- the one LayerNorm eps

def ln_vision_eps_bound(tokens_BND: torch.Tensor, used_eps: float, wanted_eps: float) -> float:
    """Largest relative change of a normalised value when LayerNorm uses `used_eps` instead of
    `wanted_eps`, for these tokens: |1 - sqrt((var + a)/(var + b))| <= |b - a| / (2 (var + min(a, b)))."""
    var = tokens_BND.float().var(dim=-1, unbiased=False)
    return float((abs(wanted_eps - used_eps) / (2 * (var + min(used_eps, wanted_eps)))).max())


# --------------------------------------------------------------------------- what is exported

@dataclass
class _Source:
    cfg: JobConfig
    proj: Dict[str, torch.Tensor]  # llama_proj.weight / .bias
    llm_dir: str  # LLM config + tokenizer
    full_weight_map: Optional[Dict[str, str]]  # a consolidated --full folder: name -> shard file
    description: str


def _resolve_source(checkpoint: Optional[str], cfg: Optional[JobConfig]) -> _Source:
    from mgpt4_dist.checkpoint.state import read_proj_source
    from mgpt4_dist.models.weights import proj_state_from_file

    if checkpoint and is_consolidated(checkpoint):
        from mgpt4_dist.inference.loader import read_consolidated_config

        cfg, info = read_consolidated_config(checkpoint)
        if info.get("full"):
            with open(os.path.join(checkpoint, "model.safetensors.index.json")) as f:
                weight_map = {k: os.path.join(checkpoint, v) for k, v in json.load(f)["weight_map"].items()}
            from safetensors import safe_open

            proj = {}
            for key in ("llama_proj.weight", "llama_proj.bias"):
                with safe_open(weight_map[key], framework="pt") as f:
                    proj[key.split(".", 1)[1]] = f.get_tensor(key)
            return _Source(cfg, proj, os.path.join(checkpoint, "llm"), weight_map, f"{checkpoint} (consolidated, full)")
        proj = proj_state_from_file(read_proj_source(os.path.join(checkpoint, "model.safetensors")))
        return _Source(cfg, proj, cfg.model.llm_path, None, f"{checkpoint} (consolidated)")
    if checkpoint:
        from mgpt4_dist.checkpoint.layout import read_run_config, resolve_step_dir
        from mgpt4_dist.checkpoint.state import TrainableState

        step_dir = resolve_step_dir(checkpoint)
        cfg = read_run_config(step_dir)
        proj = proj_state_from_file(TrainableState(step_dir).tensors("fp32"))
        return _Source(cfg, proj, cfg.model.llm_path, None, step_dir)
    if cfg is None:
        raise InvalidInputError("nothing to export: give a run, step or consolidated folder, or --config with the "
                                "original weight files (model.vit_checkpoint, model.qformer_checkpoint, "
                                "model.proj_checkpoint, model.llm_path)")
    _refuse_llama2_variant(cfg)
    if not cfg.model.proj_checkpoint:
        raise InvalidInputError("model.proj_checkpoint is empty: the export needs the trained llama_proj (a MiniGPT-4 "
                                ".pth such as pretrained_minigpt4.pth, or a run/step/consolidated folder)")
    proj = proj_state_from_file(read_proj_source(cfg.model.proj_checkpoint))
    if not proj:
        raise InvalidInputError(f"model.proj_checkpoint={cfg.model.proj_checkpoint}: no llama_proj.* tensors there")
    return _Source(cfg, proj, cfg.model.llm_path, None, "original weight files")


def _refuse_llama2_variant(cfg: JobConfig) -> None:
    if not cfg.model.has_qformer:
        raise UnsupportedForHFError(
            "the Llama-2 variant (model.has_qformer=false: ln_vision, then 4 consecutive ViT patch tokens "
            "concatenated per LLM position) has no exact class in transformers (Blip2ForConditionalGeneration "
            "needs a Q-Former; no transformers model groups ViT tokens this way); export it with --format "
            "minigpt4 or mgpt4-consolidate instead")


def _check_exportable(cfg: JobConfig, source: _Source) -> None:
    _refuse_llama2_variant(cfg)
    if source.full_weight_map is None:
        from mgpt4_dist.models.weights import require_frozen_weights

        require_frozen_weights(cfg.model, " (the export needs the frozen towers' weight files)")
        for name in ("llm_path", "vit_checkpoint", "qformer_checkpoint"):
            value = getattr(cfg.model, name)
            if value and not os.path.exists(value):
                raise InvalidInputError(f"model.{name}={value} (from {source.description}) does not exist here: "
                                        f"export with --config CONFIG.yaml model.proj_checkpoint=FOLDER and "
                                        f"model.{name}=PATH, or move the weights back")


def _our_tensors(source: _Source) -> Tuple[int, Callable[[], Iterator[Tuple[str, torch.Tensor]]]]:
    """(tensor count, a generator of every MiniGPT4 tensor under its state-dict name)."""
    from mgpt4_dist.models.weights import ShardReader, weight_shards

    if source.full_weight_map is not None:
        weight_map = source.full_weight_map
        names = [k for k in weight_map if not k.startswith("llama_proj.")]

        def full() -> Iterator[Tuple[str, torch.Tensor]]:
            reader = ShardReader(weight_map)
            for name in sorted(names, key=lambda n: (weight_map[n], n)):
                yield name, reader.get(name)
            for key, value in source.proj.items():
                yield "llama_proj." + key, value

        return len(names) + len(source.proj), full

    from mgpt4_dist.models.minigpt4 import build_vision_towers

    # Built as load_model builds them (same loaders, pos_embed interpolation, seed): the towers of a
    # ViT-g are ~1B parameters, held once; the LLM below is streamed.
    vit, qformer, _ = build_vision_towers(source.cfg.model, seed=source.cfg.train.seed)
    towers = [("visual_encoder." + k, v) for k, v in vit.state_dict().items()]
    towers += [("qformer." + k, v) for k, v in qformer.state_dict().items()]
    _, llm_map = weight_shards(source.cfg.model.llm_path, "model.llm_path")

    def stream() -> Iterator[Tuple[str, torch.Tensor]]:
        yield from towers
        for key, value in source.proj.items():
            yield "llama_proj." + key, value
        reader = ShardReader(llm_map)
        for name in sorted(llm_map, key=lambda n: (llm_map[n], n)):
            yield "llm." + name, reader.get(name)

    return len(towers) + len(source.proj) + len(llm_map), stream


# --------------------------------------------------------------------------- config, tokenizer, processor

def build_hf_config(cfg: JobConfig, llm_dir: str, image_token_id: int, pad_token_id: int):
    from transformers import AutoConfig, Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    vit, qf = cfg.model.vit, cfg.model.qformer
    vision = Blip2VisionConfig(
        hidden_size=vit.embed_dim, intermediate_size=int(vit.embed_dim * vit.mlp_ratio),  # timm's Mlp width
        num_hidden_layers=vit.depth, num_attention_heads=vit.num_heads, image_size=vit.img_size,
        patch_size=vit.patch_size, hidden_act="gelu", layer_norm_eps=vit.norm_eps, attention_dropout=0.0,
        qkv_bias=True)
    qformer = Blip2QFormerConfig(
        hidden_size=qf.hidden_size, num_hidden_layers=qf.num_layers, num_attention_heads=qf.num_heads,
        intermediate_size=qf.intermediate_size, cross_attention_frequency=qf.cross_attention_freq,
        encoder_hidden_size=vit.embed_dim, layer_norm_eps=qf.layer_norm_eps, hidden_act="gelu",
        use_qformer_text_input=False)
    text = AutoConfig.from_pretrained(llm_dir)
    if text.model_type != "llama":
        raise UnsupportedForHFError(f"{llm_dir}: a {text.model_type} LLM; the export maps a LLaMA text model")
    if text.vocab_size != image_token_id:
        raise UnsupportedForHFError(f"{llm_dir}: the LLM has {text.vocab_size} vocabulary rows but its tokenizer "
                                    f"{image_token_id} tokens; the image token must take the id right after both")
    text.vocab_size = image_token_id + 1
    text.pad_token_id = pad_token_id
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=qf.num_query_tokens, image_token_index=image_token_id)
    config.architectures = ["Blip2ForConditionalGeneration"]
    return config


def chat_template() -> str:
    """MiniGPT-4's Vicuna v0 conversation (`inference.conversation`, the original demo's
    `CONV_VISION_Vicuna0`) as a Jinja chat template: `{system}###Human: <Img>{image}</Img> {question}###Assistant: `."""
    from mgpt4_dist.inference.conversation import SYSTEM, STYLES

    (human, assistant), sep, _ = STYLES["vicuna0"]
    image = "<Img>" + IMAGE_TOKEN + "</Img>"  # the processor repeats the image token num_query_tokens times
    return (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
        "else messages[0]['content'] | map(attribute='text') | join('') -%}"
        "{%- set messages = messages[1:] -%}"
        "{%- else -%}{%- set system = " + json.dumps(SYSTEM) + " -%}{%- endif -%}"
        "{{- system + " + json.dumps(sep) + " -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- " + json.dumps(human) + " -}}"
        "{%- else -%}{{- " + json.dumps(assistant) + " -}}{%- endif -%}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for item in message['content'] -%}"
        # the original joins the image message and the question with one space (Chat.ask)
        "{%- if not loop.first -%}{{- ' ' -}}{%- endif -%}"
        "{%- if item['type'] == 'image' -%}{{- " + json.dumps(image) + " -}}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- " + json.dumps(sep) + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + json.dumps(assistant) + " -}}{%- endif -%}")


def build_processor(cfg: JobConfig, llm_dir: str):
    """The processor: our tokenizer (sentencepiece, `$$` pad) + `<image>`, the square bicubic
    resize with CLIP normalisation, and the chat template.

    transformers' `DeepseekVLProcessor` is its generic image + tokenizer processor: it expands
    each `<image>` of the text to a fixed count (`num_image_tokens`, here the 32 query tokens)
    where the chat template put it. `Blip2Processor` cannot serve: it prepends the image tokens
    before BOS, and its `__init__` drops the chat template when loaded (transformers 5.24)."""
    from transformers import AddedToken
    from transformers import DeepseekVLProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from mgpt4_dist.data.transforms import CLIP_MEAN, CLIP_STD
    from mgpt4_dist.models.llm import load_tokenizer

    tokenizer = load_tokenizer(llm_dir)
    vocab = len(tokenizer)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    # Saved as `image_token` in tokenizer_config.json: the processor reads `tokenizer.image_token`.
    tokenizer._set_model_specific_special_tokens({"image_token": IMAGE_TOKEN})
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != vocab:
        raise ValueError(f"{llm_dir}: {IMAGE_TOKEN} did not get the id after the vocabulary ({vocab})")
    size = cfg.model.vit.img_size
    # PIL's bicubic, as the training transform (torchvision Resize on PIL images) resizes.
    images = BlipImageProcessorPil(size={"height": size, "width": size}, resample=3, do_resize=True, do_rescale=True,
                                   rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN),
                                   image_std=list(CLIP_STD), do_convert_rgb=True)
    return DeepseekVLProcessor(images, tokenizer, chat_template=chat_template(),
                               num_image_tokens=cfg.model.qformer.num_query_tokens)


# --------------------------------------------------------------------------- writing

def _expected_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Every tensor transformers' model holds, with its shape, from a meta-device build (no memory)."""
    from transformers import Blip2ForConditionalGeneration

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(config.text_config, "tie_word_embeddings", False):
        shapes.pop("language_model.lm_head.weight", None)
    return shapes


def export_hf(checkpoint: Optional[str], out_dir: str, cfg: Optional[JobConfig] = None,
              shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> dict:
    """Write the transformers folder; `checkpoint` is a run, step or consolidated folder, or None
    with `cfg` naming the original weight files. Returns {'source', 'out', 'files', 'tensors', 'bytes'}."""
    source = _resolve_source(checkpoint, cfg)
    cfg = source.cfg
    _check_exportable(cfg, source)
    if os.path.isfile(out_dir):
        raise InvalidInputError(f"--out {out_dir}: a file; the hf format writes a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise InvalidInputError(f"--out {out_dir}: the folder is not empty; give a new or empty folder")
    os.makedirs(out_dir, exist_ok=True)
    try:
        return _write(source, out_dir, shard_bytes, progress)
    except BaseException:
        # The folder was new or empty: a half-written export must not look like a model.
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _write(source: _Source, out_dir: str, shard_bytes: int, progress: bool) -> dict:
    from tqdm import tqdm

    from mgpt4_dist.errors import CheckpointMismatchError

    cfg = source.cfg
    processor = build_processor(cfg, source.llm_dir)
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = build_hf_config(cfg, source.llm_dir, image_token_id, tokenizer.pad_token_id)
    expected = _expected_shapes(config)

    count, tensors = _our_tensors(source)
    writer = ShardWriter(out_dir, shard_bytes)
    written = set()
    bar = tqdm(total=count, desc="exporting to transformers", unit="tensor", disable=not progress, file=sys.stderr)
    for name, tensor in to_hf_tensors(_counted(tensors(), bar)):
        want = expected.get(name)
        if want is None:
            raise ValueError(f"{name}: not a tensor of Blip2ForConditionalGeneration (mapping out of date?)")
        if tuple(tensor.shape) != want:
            raise CheckpointMismatchError(f"{name}: shape {tuple(tensor.shape)} in the weights, {want} in the config "
                                          f"({source.description}): the weight files do not fit the model config")
        writer.add(name, tensor)
        written.add(name)
    bar.close()
    missing = sorted(set(expected) - written)
    if missing:
        raise CheckpointMismatchError(f"the weights lack {len(missing)} tensors transformers needs (e.g. {missing[:3]})")
    files = writer.finish()

    config.dtype = _llm_dtype(source.llm_dir)
    config.save_pretrained(out_dir)
    _generation_config(tokenizer).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    files += sorted(n for n in os.listdir(out_dir) if n not in files and not n.startswith("."))
    return {"source": source.description, "out": out_dir, "files": files, "tensors": len(written),
            "bytes": writer.total_bytes}


def _counted(items: Iterator, bar) -> Iterator:
    for item in items:
        yield item
        bar.update(1)


def _llm_dtype(llm_dir: str) -> str:
    with open(os.path.join(llm_dir, "config.json")) as f:
        conf = json.load(f)
    return str(conf.get("dtype") or conf.get("torch_dtype") or "float32")


def _generation_config(tokenizer):
    """Token ids only: Blip2ForConditionalGeneration.generate decodes with its language model's own
    generation config, so decoding settings here would not apply."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
