"""Original weight files: the strict loaders of the MiniGPT-4 files (EVA ViT, BLIP-2 Q-Former,
llama_proj), their logging (path, size, quick hash), and Vicuna v0 from LLaMA + delta
(`apply_delta`). Never a training checkpoint: those are read by `mgpt4_dist.checkpoint`, above.

The original loads everything with `strict=False`, so a wrong file is silently ignored or fails
late with a confusing size mismatch. Here every tensor the model needs must be found, by name,
with the right shape, or loading fails before training with the file, the key, the expected and
found shapes. Files handed to us are read with `weights_only=True` (or safetensors).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from mgpt4_dist.config import ConfigError
from mgpt4_dist.errors import CheckpointMismatchError, InvalidInputError, MissingFileError
from mgpt4_dist.models.build import LocalBuild, copy_state_into

log = logging.getLogger(__name__)

# Bytes read from each end of a weight file for its quick hash: cheap for a multi-GB file, and any
# two different real checkpoints differ within them (headers, first and last tensors).
QUICK_HASH_BYTES = 4 * 2 ** 20


def quick_hash(path: str) -> str:
    """12 hex digits of sha256(size, first and last 4 MiB): identifies a file without reading all of it."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(QUICK_HASH_BYTES))
        if size > 2 * QUICK_HASH_BYTES:
            f.seek(size - QUICK_HASH_BYTES)
        digest.update(f.read(QUICK_HASH_BYTES))
    return digest.hexdigest()[:12]


def _human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


WEIGHT_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors")


def log_weight_files(what: str, path: str) -> None:
    """One log line per weight file read for `what`: path, size and quick hash (a folder: each of
    its weight files)."""
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path) if n.endswith(WEIGHT_EXTENSIONS))
    for file in files:
        if os.path.isfile(file):
            log.info("weights: %s from %s (%s, quick hash %s = sha256 of size + first/last 4 MiB)", what, file,
                     _human_size(os.path.getsize(file)), quick_hash(file))


def require_frozen_weights(cfg, where: str = "") -> None:
    """Refuse empty frozen-tower paths of a ModelConfig unless random towers are asked for
    (model.allow_random_weights): a run on random towers trains and its loss falls, but the result
    is worthless. `where` says where the config came from, for the message."""
    empty = [key for key, needed in (("vit_checkpoint", True), ("qformer_checkpoint", cfg.has_qformer))
             if needed and not getattr(cfg, key)]
    if not empty:
        return
    names = " and ".join(f"model.{key}" for key in empty)
    if not cfg.allow_random_weights:
        towers = {"vit_checkpoint": ("ViT", "eva_vit_g.pth"),
                  "qformer_checkpoint": ("Q-Former", "blip2_pretrained_flant5xxl.pth")}
        raise ConfigError(f"{names} {'is' if len(empty) == 1 else 'are'} empty{where}: the frozen "
                        f"{' and '.join(towers[k][0] for k in empty)} would be random; set "
                        + " ".join(f"model.{k}=PATH/{towers[k][1]}" for k in empty)
                        + ", or model.allow_random_weights=true for a test run on random towers")
    log.warning("model.allow_random_weights=true and %s empty: the frozen towers are RANDOM (seeded), "
                "not pretrained", names)


def read_weights(path: str, mmap: bool = False) -> dict:
    """`mmap=True` maps the file instead of reading it: ranks of one node then share its pages."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # pre-1.6 (non-zip) files cannot be mapped
                if "mmap" not in str(e):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MissingFileError(f"weight file not found: {path} (check model.vit_checkpoint, model.qformer_checkpoint, "
                               f"model.proj_checkpoint)") from None
    except Exception as e:  # unpickling refused or corrupt
        raise CheckpointMismatchError(f"{path}: cannot be read as a weights-only checkpoint ({e})") from e


def load_strict(module: nn.Module, state: Dict[str, torch.Tensor], path: str, what: str,
                hint: Optional[Callable[[str, tuple, tuple], str]] = None, build: Optional[LocalBuild] = None) -> None:
    """Copy `state` into `module`, requiring exactly the module's keys with matching shapes."""
    build = build or LocalBuild()
    # Whole shapes: a partitioned parameter's own tensor is an empty placeholder.
    expected = {k: build.full_shape(v) for k, v in module.state_dict(keep_vars=True).items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, expected[k], tuple(state[k].shape))
                  for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
    for key, want, got in mismatched[:3]:
        extra = f": {hint(key, want, got)}" if hint else ""
        problems.append(f"{key} has shape {list(got)} but the model expects {list(want)}{extra}")
    if problems:
        raise CheckpointMismatchError(f"{path} does not fit the configured {what}: " + "; ".join(problems))
    copy_state_into(module, state, build)


# --------------------------------------------------------------------------- EVA ViT

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def load_vit_checkpoint(vit: nn.Module, path: str, build: Optional[LocalBuild] = None) -> None:
    """`eva_vit_g.pth`: a flat state dict whose keys map 1:1 onto timm's Eva.

    The file holds 40 blocks; MiniGPT-4 uses the first `model.vit.depth` (39). The extra blocks
    are reported and ignored.
    """
    build = build or LocalBuild()
    log_weight_files("EVA ViT (model.vit_checkpoint)", path)
    state = read_weights(path, mmap=build.sharded)
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    depth = vit.cfg.depth
    extra_blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and int(m.group(1)) >= depth})
    if extra_blocks:
        log.info("%s: ignoring blocks %s (model.vit.depth=%d)", path, extra_blocks, depth)
    state = {k: v for k, v in state.items() if not ((m := _BLOCK_KEY.match(k)) and int(m.group(1)) >= depth)}

    state = interpolate_pos_embed(state, build.full_shape(vit.eva.pos_embed)[1], path)

    def hint(key: str, want: tuple, got: tuple) -> str:
        if key == "pos_embed":
            return "the checkpoint was made for another image size or patch size (model.vit.img_size/patch_size)"
        return "the checkpoint is for another ViT width (model.vit.embed_dim / mlp_ratio)"

    load_strict(vit.eva, state, path, "EVA ViT", hint, build)


def interpolate_pos_embed(state: dict, num_positions: int, path: str) -> dict:
    """Resize a checkpoint's square grid of patch position embeddings to the model's image size
    (bicubic, CLS position kept), as the original does when image_size differs from 224."""
    pos = state.get("pos_embed")
    if pos is None or pos.shape[1] == num_positions:
        return state
    extra = 1  # the CLS position
    old_side, new_side = round((pos.shape[1] - extra) ** 0.5), round((num_positions - extra) ** 0.5)
    if old_side ** 2 + extra != pos.shape[1] or new_side ** 2 + extra != num_positions:
        return state  # not a square grid: let the strict shape check report it
    log.info("%s: interpolating pos_embed from %dx%d to %dx%d patches", path, old_side, old_side, new_side, new_side)
    dim = pos.shape[-1]
    grid = pos[:, extra:].float().reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    resized = torch.cat([pos[:, :extra].float(), grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    return {**state, "pos_embed": resized.to(pos.dtype)}


# --------------------------------------------------------------------------- BLIP-2 Q-Former

_QFORMER_RENAMES = (
    ("Qformer.bert.embeddings.LayerNorm.", "layernorm."),
    ("Qformer.bert.encoder.", "encoder."),
    (".attention.self.", ".attention.attention."),
    (".crossattention.self.", ".crossattention.attention."),
)
# Text-branch and embedding weights of BLIP-2 that MiniGPT-4 deletes or never uses.
_QFORMER_UNUSED = re.compile(
    r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|"
    r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)|"
    r"^Qformer\.cls\."
)


def qformer_state_from_blip2(state: Dict[str, torch.Tensor]) -> tuple[dict, list]:
    """Split a BLIP-2 state dict into our QFormer's keys and the keys MiniGPT-4 does not use."""
    ours, skipped = {}, []
    for key, value in state.items():
        if key in ("query_tokens",) or key.startswith("ln_vision."):
            ours[key] = value
        elif key.startswith("Qformer.") and not _QFORMER_UNUSED.match(key):
            new = key
            for old, rep in _QFORMER_RENAMES:
                new = new.replace(old, rep)
            ours["bert." + new] = value
        else:
            skipped.append(key)
    return ours, skipped


def load_qformer_checkpoint(qformer: nn.Module, path: str, build: Optional[LocalBuild] = None) -> None:
    """`blip2_pretrained*.pth`: `{'model': {...}}` with query_tokens, ln_vision, Qformer.bert.*."""
    build = build or LocalBuild()
    log_weight_files("Q-Former (model.qformer_checkpoint)", path)
    raw = read_weights(path, mmap=build.sharded)
    state = raw["model"] if isinstance(raw.get("model"), dict) else raw
    ours, skipped = qformer_state_from_blip2(state)
    if skipped:
        prefixes = sorted({k.split(".")[0] if not k.startswith("Qformer") else ".".join(k.split(".")[:3]) for k in skipped})
        log.info("%s: skipping %d keys MiniGPT-4 does not use (%s)", path, len(skipped), ", ".join(prefixes[:8]))

    def hint(key: str, want: tuple, got: tuple) -> str:
        if "crossattention" in key and key.endswith(("key.weight", "value.weight")) or key.startswith("ln_vision"):
            return "the Q-Former was trained for another ViT width (model.vit.embed_dim)"
        if key == "query_tokens":
            return "another number of query tokens (model.qformer.num_query_tokens)"
        return "another Q-Former size (model.qformer.*)"

    load_strict(qformer, ours, path, "Q-Former", hint, build)


# --------------------------------------------------------------------------- llama_proj

def proj_state_from_file(state: dict) -> Dict[str, torch.Tensor]:
    """llama_proj tensors from a MiniGPT-4 .pth (`{'model': {...}}`, maybe with optimizer etc.),
    or a flat dict with `llama_proj.*` keys (our consolidated files)."""
    if isinstance(state.get("model"), dict):
        state = state["model"]
    for prefix in ("llama_proj.", "module.llama_proj."):
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


CONSOLIDATED_PROJ_FILES = ("minigpt4.pth", "model.safetensors")  # what mgpt4-consolidate writes, in this order


def is_weight_folder(path: str) -> bool:
    """A folder written by mgpt4-consolidate (its minigpt4.pth or model.safetensors)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in CONSOLIDATED_PROJ_FILES)


def read_proj_file(path: str) -> dict:
    """A llama_proj weight file (a MiniGPT-4 .pth, our minigpt4.pth or model.safetensors), or an
    mgpt4-consolidate folder (its minigpt4.pth). A training run or step folder is read one layer up
    (`mgpt4_dist.checkpoint.state.read_proj_source`): models/ never reads training checkpoints."""
    if not os.path.isdir(path):
        log_weight_files("llama_proj (model.proj_checkpoint)", path)
        return read_weights(path)
    for name in CONSOLIDATED_PROJ_FILES:
        if os.path.isfile(os.path.join(path, name)):
            log_weight_files("llama_proj (model.proj_checkpoint)", os.path.join(path, name))
            return read_weights(os.path.join(path, name))
    raise CheckpointMismatchError(f"{path}: a folder without {' or '.join(CONSOLIDATED_PROJ_FILES)}; a training run "
                                  f"or step folder is read by mgpt4_dist.checkpoint.state.read_proj_source")


def load_ln_vision_from_proj_checkpoint(ln_vision: nn.LayerNorm, path: str, build: Optional[LocalBuild] = None,
                                        tensors: Optional[dict] = None) -> None:
    """The Llama-2 variant's ln_vision comes from the MiniGPT-4 file when it carries `ln_vision.*`,
    else it keeps its default init (weight 1, bias 0), as in the original. `tensors`: the file's
    tensors when the caller has read them already (a training checkpoint's, say)."""
    raw = tensors if tensors is not None else read_proj_file(path)
    state = raw["model"] if isinstance(raw.get("model"), dict) else raw
    norm = {k[len("ln_vision."):]: v for k, v in state.items() if k.startswith("ln_vision.")}
    if norm:
        load_strict(ln_vision, norm, path, "ln_vision", build=build)


def load_proj_checkpoint(proj: nn.Linear, path: str, build: Optional[LocalBuild] = None,
                         tensors: Optional[dict] = None) -> None:
    """llama_proj from a MiniGPT-4 file or our own exported/consolidated file; `tensors`: the tensors of
    `path` when the caller has read them already (a training checkpoint's, say)."""
    found = proj_state_from_file(tensors if tensors is not None else read_proj_file(path))
    if not found:
        raise CheckpointMismatchError(f"{path}: no llama_proj.* tensors found (is this a MiniGPT-4 checkpoint?)")

    def hint(key: str, want: tuple, got: tuple) -> str:
        return proj_shape_hint(got, want) if key == "weight" else "another projection shape"

    load_strict(proj, found, path, "llama_proj", hint, build)


LLM_SIZES = {4096: "7B", 5120: "13B"}  # hidden size -> the Vicuna/Llama-2 size that has it


def proj_shape_hint(got: tuple, want: tuple) -> str:
    """Why a llama_proj weight of shape `got` does not fit one of shape `want` (both [LLM width, visual width]),
    for every place that compares them (weight files here, training checkpoints on resume)."""
    if got[0] != want[0]:
        return (f"this checkpoint is for a {LLM_SIZES.get(got[0], f'{got[0]}-wide')} LLM: an LLM of hidden size "
                f"{got[0]}, the config has {want[0]} (model.llm_path)")
    if len(got) > 1 and got[1] != want[1]:
        return ("the checkpoint was made for another visual feature width (Q-Former vs the Llama-2 variant, "
                "model.has_qformer / model.qformer.hidden_size)")
    return "another projection shape"


# --------------------------------------------------------------------------- Vicuna v0 from LLaMA + delta
# The original README builds Vicuna v0 with FastChat's `apply_delta`: every tensor is base + delta,
# and the config and tokenizer come from the delta. Here one delta shard and the base tensors it
# needs are in memory at a time, so a 13B model needs about one shard of RAM, not both models.

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.json", "added_tokens.json")


def weight_shards(folder: str, what: str = "model folder") -> Tuple[List[str], Dict[str, str]]:
    """(shard files in order, tensor name → shard file) of a Hugging Face model folder."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
            return [os.path.join(folder, f) for f in files], {k: os.path.join(folder, v) for k, v in weight_map.items()}
    for single in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(folder, single)
        if os.path.isfile(path):
            return [path], {name: path for name in shard_tensor_names(path)}
    if not os.path.isdir(folder):
        raise MissingFileError(f"{what} {folder}: no such folder")
    raise MissingFileError(f"{what} {folder}: no model.safetensors, pytorch_model.bin or their index files; "
                           f"expected a Hugging Face model folder")


def shard_tensor_names(path: str) -> List[str]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys())


class ShardReader:
    """Reads tensors by name, keeping at most one shard open (safetensors lazily, .bin memory-mapped)."""

    def __init__(self, weight_map: Dict[str, str]):
        self.weight_map = weight_map
        self._path, self._handle = None, None

    def get(self, name: str) -> torch.Tensor:
        path = self.weight_map[name]
        if path != self._path:
            self._path = path
            if path.endswith(".safetensors"):
                from safetensors import safe_open

                self._handle = safe_open(path, framework="pt")
            else:
                self._handle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if path.endswith(".safetensors"):
            return self._handle.get_tensor(name)
        return self._handle[name]


def _read_shard(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def apply_delta(base_dir: str, delta_dir: str, out_dir: str, progress: bool = True) -> dict:
    from safetensors.torch import save_file
    from tqdm import tqdm

    base_files, base_map = weight_shards(base_dir, "--base")
    delta_files, delta_map = weight_shards(delta_dir, "--delta")
    missing = sorted(set(delta_map) - set(base_map))
    if missing:
        raise InvalidInputError(f"--base {base_dir} lacks {len(missing)} tensors of the delta (e.g. {missing[:3]}): "
                                f"is this the LLaMA base the delta was made for?")
    os.makedirs(out_dir, exist_ok=True)
    base = ShardReader(base_map)
    out_map: Dict[str, str] = {}
    total = len(delta_files)
    for i, delta_path in enumerate(tqdm(delta_files, desc="applying delta", unit="shard", disable=not progress,
                                        file=sys.stderr), start=1):
        merged = {}
        for name, delta in _read_shard(delta_path).items():
            b = base.get(name)
            if b.shape == delta.shape:
                merged[name] = (delta.float() + b.float()).to(delta.dtype).contiguous()
            elif b.ndim == delta.ndim == 2 and b.shape[1] == delta.shape[1] and b.shape[0] < delta.shape[0]:
                # Vicuna v0 adds a pad token: its embedding/lm_head have extra rows the base lacks.
                full = delta.float().clone()
                full[: b.shape[0]] += b.float()
                merged[name] = full.to(delta.dtype).contiguous()
            else:
                raise InvalidInputError(f"{name}: base shape {list(b.shape)} does not fit delta shape "
                                        f"{list(delta.shape)}: is --base the LLaMA the delta was made for?")
        shard_name = f"model-{i:05d}-of-{total:05d}.safetensors" if total > 1 else "model.safetensors"
        save_file(merged, os.path.join(out_dir, shard_name), metadata={"format": "pt"})
        out_map.update({name: shard_name for name in merged})
        del merged
    if total > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": out_map}, f, indent=1)
    copied = []
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(delta_dir, name)):
            shutil.copyfile(os.path.join(delta_dir, name), os.path.join(out_dir, name))
            copied.append(name)
    return {"tensors": len(out_map), "shards": total, "out": out_dir, "copied": copied}
