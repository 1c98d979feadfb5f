"""The loss of given answers for given images, through the training code's own sequence and loss.

Used by `mgpt4-eval-loss` to compare with the original MiniGPT-4 on the same batch: the model is
built from the config exactly as training builds it (same loaders, same `SequenceBuilder`, same
`MiniGPT4.loss_terms`), put in eval mode, and all samples go through one batch.
"""
from __future__ import annotations

import os
import random
from typing import List, Optional, Sequence

import torch

from mgpt4_dist.checkpoint.state import proj_state_for
from mgpt4_dist.config import JobConfig, load_prompts, precision_dtype
from mgpt4_dist.data import BadSampleError
from mgpt4_dist.data.transforms import build_image_transform, load_image_file
from mgpt4_dist.errors import InvalidInputError, MissingFileError
from mgpt4_dist.models.llm import load_tokenizer
from mgpt4_dist.models.weights import require_frozen_weights
from mgpt4_dist.models.minigpt4 import build_minigpt4
from mgpt4_dist.models.sequence import SequenceBuilder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_images(spec: str, image_size: int) -> torch.Tensor:
    """A `.pt` file with a normalized float tensor [B,3,H,W], a directory of images (sorted by
    name), or comma-separated image files; images get the eval transform (square bicubic resize,
    CLIP normalization)."""
    if spec.endswith(".pt"):
        if not os.path.isfile(spec):
            raise MissingFileError(f"--images {spec}: no such file")
        images = torch.load(spec, map_location="cpu", weights_only=True)
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise InvalidInputError(f"--images {spec}: expected a float tensor [B, 3, H, W], got "
                                    f"{type(images).__name__} {tuple(images.shape) if torch.is_tensor(images) else ''}")
        return images.float()
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, n) for n in os.listdir(spec) if n.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise MissingFileError(f"--images {spec}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    else:
        paths = [p for p in spec.split(",") if p]
    transform = build_image_transform(image_size)
    tensors = []
    for path in paths:
        try:
            tensors.append(transform(load_image_file(path)))
        except FileNotFoundError:
            raise MissingFileError(f"--images: {path}: no such file") from None
        except BadSampleError as e:
            raise InvalidInputError(f"--images: {path}: {e}") from None
    return torch.stack(tensors)


def resolve_instruction(cfg: JobConfig, instruction: Optional[str]) -> Optional[str]:
    """--instruction formatted with data.prompt_template; else one of data.prompts drawn as the
    original draws per batch (seeded by train.seed); else None (stage 1)."""
    if instruction:
        return (cfg.data.prompt_template or "{}").format(instruction)
    prompts = load_prompts(cfg.data)
    return random.Random(cfg.train.seed).choice(prompts) if prompts else None


def eval_loss(cfg: JobConfig, images_BCHW: torch.Tensor, answers: Sequence[str],
              instruction: Optional[str] = None, device: str = "cpu") -> dict:
    if len(answers) != images_BCHW.shape[0]:
        raise InvalidInputError(f"{images_BCHW.shape[0]} images but {len(answers)} answers (--images, --answers): "
                                f"give one answer per image")
    require_frozen_weights(cfg.model)
    dtype = precision_dtype(cfg.train.precision)
    model = build_minigpt4(cfg.model, seed=cfg.train.seed, dtype=dtype, device_type=torch.device(device).type,
                           proj_source=proj_state_for(cfg.model))
    model.to(device).eval()
    build = SequenceBuilder(load_tokenizer(cfg.model.llm_path), model.num_image_tokens, cfg.data.max_txt_len,
                            cfg.data.end_sym, cfg.model.max_context_len)
    prompt = resolve_instruction(cfg, instruction)
    text = build(list(answers), prompt)
    with torch.no_grad():
        terms = model.loss_terms(images_BCHW.to(device), text.to(device))
    per_sample: List[List[float]] = [terms.token_ce[terms.token_rows == row].tolist() for row in range(len(answers))]
    return {"loss": float(terms.loss), "num_scored_tokens": terms.num_scored_tokens,
            "per_sample_token_ce": per_sample, "instruction": prompt}
