"""`load_model`: a consolidated folder (mgpt4-consolidate) → MiniGPT4 + tokenizer for inference.

The folder holds the trained projection (`model.safetensors`) and the run's model config; the
frozen towers and the LLM come from the weight paths in that config (override them when the
folder moved to another machine), or from the folder itself when it was written with `--full`.
A transformers export (`mgpt4-export --format hf`) loads too: its tensors are mapped back onto
MiniGPT4 (`mgpt4_dist.models.hf_blip2`), so chat runs the same code on either folder.
No DeepSpeed, no process group.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from mgpt4_dist.config import ConfigError, JobConfig, config_from_dict, precision_dtype
from mgpt4_dist.errors import CheckpointMismatchError, InvalidInputError, MissingFileError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: "torch.nn.Module"  # MiniGPT4, eval mode
    tokenizer: object
    cfg: JobConfig
    conversation: str  # vicuna0 | llama2
    device: torch.device


def read_consolidated_config(path: str) -> tuple[JobConfig, dict]:
    import yaml

    conf_json = os.path.join(path, "config.json")
    conf_yaml = os.path.join(path, "config.yaml")
    if not os.path.isdir(path):
        raise MissingFileError(f"model folder {path}: no such folder; write one with "
                               f"mgpt4-consolidate RUN_DIR --out DIR")
    if os.path.isfile(os.path.join(path, "meta.json")) or os.path.isdir(os.path.join(path, "checkpoints")) or \
            os.path.isfile(os.path.join(path, "latest")):
        raise InvalidInputError(
            f"model folder {path}: a training run or checkpoint folder, not a consolidated model; run "
            f"`mgpt4-consolidate {path} --out DIR` and load DIR (mgpt4-chat --model DIR)")
    missing = [name for name in ("config.json", "config.yaml") if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise MissingFileError(f"model folder {path}: {' and '.join(missing)} missing there; pass a folder written by "
                               f"mgpt4-consolidate")
    with open(conf_json) as f:
        info = json.load(f)
    with open(conf_yaml) as f:
        cfg = config_from_dict(yaml.safe_load(f))
    return cfg, info


def check_device(device: Union[str, torch.device]) -> torch.device:
    """The device asked for; a malformed name or a CUDA device that is not there is refused up front."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise InvalidInputError(f"device {device!r}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise InvalidInputError(f"device {device}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                                f"false); use cpu, or check the driver and CUDA_VISIBLE_DEVICES")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidInputError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) visible "
                                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def _resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return precision_dtype(dtype)
    except ConfigError as e:
        raise InvalidInputError(f"dtype {dtype!r}: {str(e).split(': ', 1)[1]}") from None


def check_quantization(quantization: Optional[str], device: torch.device) -> None:
    """8-bit/4-bit LLM weights need bitsandbytes and a CUDA device; refuse anything else up front."""
    if quantization in (None, "", "none"):
        return
    if quantization not in ("8bit", "4bit"):
        raise InvalidInputError(f"quantization {quantization!r}: use 8bit, 4bit or none")
    if device.type != "cuda":
        raise InvalidInputError(f"{quantization} LLM weights need a CUDA device (bitsandbytes); this is {device}. "
                         f"Drop the quantization option to run in fp32/bf16 on {device.type}")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise InvalidInputError(f"{quantization} LLM weights need bitsandbytes: pip install bitsandbytes")


def _load_llm(cfg: JobConfig, dtype: torch.dtype, device: torch.device, quantization: Optional[str]):
    from mgpt4_dist.models.llm import choose_attn_impl, load_llm

    attn = choose_attn_impl(cfg.model.attn_impl, device.type)
    if quantization in (None, "", "none"):
        return load_llm(cfg.model.llm_path, dtype=dtype, attn_impl=attn)
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = (BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit"
             else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype))
    return LlamaForCausalLM.from_pretrained(cfg.model.llm_path, dtype=dtype, quantization_config=quant,
                                            device_map={"": device.index or 0}, attn_implementation=attn)


def load_model(path: str, device: Union[str, torch.device] = "cpu", dtype: Union[None, str, torch.dtype] = None,
               quantization: Optional[str] = None, llm_path: Optional[str] = None,
               vit_checkpoint: Optional[str] = None, qformer_checkpoint: Optional[str] = None) -> LoadedModel:
    """Build MiniGPT-4 for inference from a consolidated folder.

    device: "cpu", "cuda", "cuda:1", ...; dtype: default fp16 on CUDA, fp32 on CPU.
    quantization: None | "8bit" | "4bit" (LLM only; bitsandbytes on CUDA, refused otherwise).
    llm_path / vit_checkpoint / qformer_checkpoint override the frozen weight paths of the config.
    """
    from mgpt4_dist.models.llm import load_tokenizer
    from mgpt4_dist.models.weights import load_proj_checkpoint, require_frozen_weights
    from mgpt4_dist.models.minigpt4 import MiniGPT4, build_vision_towers

    device = check_device(device)
    dtype = _resolve_dtype(dtype, device)
    check_quantization(quantization, device)
    if is_hf_export(path):
        return _load_hf_export(path, device, dtype, quantization)
    cfg, info = read_consolidated_config(path)
    full = bool(info.get("full"))
    if full:
        cfg.model.llm_path = os.path.join(path, "llm")
        cfg.model.vit_checkpoint = cfg.model.qformer_checkpoint = ""
    for name, value in (("llm_path", llm_path), ("vit_checkpoint", vit_checkpoint),
                        ("qformer_checkpoint", qformer_checkpoint)):
        if value:
            setattr(cfg.model, name, value)
    cfg.model.proj_checkpoint = ""
    for name in ("llm_path", "vit_checkpoint", "qformer_checkpoint"):
        value = getattr(cfg.model, name)
        if value and not full and not os.path.exists(value):
            raise MissingFileError(f"{path}/config.yaml: model.{name}={value} does not exist here; pass "
                                    f"{name}=... (mgpt4-chat --{name.replace('_', '-')}) to point at the frozen weights")
    if not full:  # a --full folder carries the towers' weights itself
        require_frozen_weights(cfg.model, f" in {path}/config.yaml (pass --vit-checkpoint/--qformer-checkpoint to "
                                          f"mgpt4-chat, or the same arguments to load_model)")
    vit, qformer, ln_vision = build_vision_towers(cfg.model, seed=cfg.train.seed)
    if full:
        llm = _llm_skeleton(cfg, dtype)
    else:
        llm = _load_llm(cfg, dtype, device, quantization)
    model = MiniGPT4(vit, qformer, llm, ln_vision=ln_vision)
    if full:
        _load_full_weights(model, path)
    else:
        load_proj_checkpoint(model.llama_proj, os.path.join(path, "model.safetensors"))
    if quantization in (None, "", "none"):
        model.to(device=device, dtype=dtype)
    else:  # the quantized LLM is placed already; move the rest
        for module in (model.visual_encoder, model.qformer, getattr(model, "ln_vision", None), model.llama_proj):
            if module is not None:
                module.to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(cfg.model.llm_path)
    return LoadedModel(model, tokenizer, cfg, info.get("conversation", "vicuna0"), device)


def _llm_skeleton(cfg: JobConfig, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mgpt4_dist.models.llm import choose_attn_impl

    config = LlamaConfig.from_pretrained(cfg.model.llm_path)
    config._attn_implementation = choose_attn_impl(cfg.model.attn_impl, "cpu")
    return LlamaForCausalLM(config).to(dtype)


def _load_full_weights(model: torch.nn.Module, path: str) -> None:
    """Every tensor the model has, by name, from the sharded safetensors of a `--full` folder: a
    missing one is refused; tensors the model does not have (e.g. rotary buffers) are ignored."""
    from safetensors import safe_open

    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    expected = model.state_dict()
    missing = [k for k in expected if k not in weight_map and not k.endswith("inv_freq")]
    if missing:
        raise CheckpointMismatchError(f"{path}: the full checkpoint lacks {len(missing)} tensors (e.g. {missing[:3]})")
    by_file = {}
    for key, file in weight_map.items():
        by_file.setdefault(file, []).append(key)
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(os.path.join(path, file), framework="pt") as f:
                for key in keys:
                    if key in expected:
                        expected[key].copy_(f.get_tensor(key))


# --------------------------------------------------------------------------- transformers exports

def is_hf_export(path: str) -> bool:
    """A folder written by `mgpt4-export --format hf` (a transformers BLIP-2 folder)."""
    conf = os.path.join(path, "config.json")
    if not os.path.isfile(conf):
        return False
    try:
        with open(conf) as f:
            return json.load(f).get("model_type") == "blip-2"
    except (OSError, ValueError):
        return False


def _load_hf_export(path: str, device: torch.device, dtype: torch.dtype, quantization: Optional[str]) -> LoadedModel:
    """MiniGPT4 from a transformers export: towers and LLM built to its config, every tensor read
    back by name, strictly; the image token's extra LLM row is dropped."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from mgpt4_dist.models.hf_blip2 import from_hf_tensors, model_config_from_hf
    from mgpt4_dist.models.llm import PAD_TOKEN, choose_attn_impl
    from mgpt4_dist.errors import CheckpointMismatchError
    from mgpt4_dist.models.minigpt4 import MiniGPT4, build_vision_towers
    from mgpt4_dist.models.weights import ShardReader, weight_shards

    if quantization not in (None, "", "none"):
        raise InvalidInputError(f"{path}: {quantization} weights of a transformers export: load it with transformers "
                                f"(BitsAndBytesConfig), or quantize the consolidated folder it came from")
    config = AutoConfig.from_pretrained(path)
    text = config.text_config
    image_id = config.image_token_index
    if text.model_type != "llama" or image_id is None or image_id != text.vocab_size - 1:
        raise InvalidInputError(f"{path}: a BLIP-2 folder, but not one written by mgpt4-export --format hf (needs a "
                                f"LLaMA text model and the image token as the last vocabulary id)")
    cfg = JobConfig()
    cfg.model = model_config_from_hf(config)
    cfg.model.llm_path = path
    vit, qformer, _ = build_vision_towers(cfg.model, seed=cfg.train.seed)  # every tensor is overwritten below
    text = copy.deepcopy(text)
    text.vocab_size = image_id
    text._attn_implementation = choose_attn_impl(cfg.model.attn_impl, device.type)
    llm = LlamaForCausalLM._from_config(text, dtype=dtype)
    model = MiniGPT4(vit, qformer, llm)
    expected = model.state_dict()
    _, weight_map = weight_shards(path, "transformers export")
    reader = ShardReader(weight_map)
    found = set()
    with torch.no_grad():
        for name, tensor in from_hf_tensors(((k, reader.get(k)) for k in sorted(weight_map, key=weight_map.get)),
                                            vocab_size=image_id):
            if name not in expected or expected[name].shape != tensor.shape:
                want = tuple(expected[name].shape) if name in expected else "no such tensor"
                raise CheckpointMismatchError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model: {want}")
            expected[name].copy_(tensor)
            found.add(name)
    missing = [k for k in expected if k not in found and not k.endswith("inv_freq")]
    if missing:
        raise CheckpointMismatchError(f"{path}: the export lacks {len(missing)} tensors (e.g. {missing[:3]})")
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token != PAD_TOKEN:
        tokenizer.pad_token = PAD_TOKEN
    log.info("loaded transformers export %s (%s)", path, dtype)
    return LoadedModel(model, tokenizer, cfg, "vicuna0", device)
