"""Samples: a raw shard sample (bytes per field) to what training and evaluation use.

Owns the field rules of a sample: the image comes from the first of `IMAGE_FIELDS`, the caption
from `json["caption"]` or else `txt` (img2dataset leaves the json caption null when it had none),
the reference captions from `json["captions"]` (several per image, for evaluation) or else the
caption alone, and cached vision features (mgpt4-cache-features) from the `.npy` field. Every
problem is a `BadSampleError` naming the sample's key and shard, which the stream skips and counts.
"""
from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Tuple

from PIL import Image

from mgpt4_dist.data import BadSampleError
from mgpt4_dist.data.text import blip_caption
from mgpt4_dist.data.transforms import decode_image

if TYPE_CHECKING:
    import torch

__all__ = ["FEATURES_FIELD", "IMAGE_FIELDS", "decode_feature_sample", "decode_sample", "encode_features",
           "raw_caption", "sample_references"]

# Fields a raw sample may carry its image in, in order of preference.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def _where(raw: Mapping[str, Any]) -> str:
    key = raw.get("__key__", "<no __key__>")
    url = raw.get("__url__")
    return f"sample {key!r} of {url}" if url else f"sample {key!r}"


def _as_text(value: Any, what: str, where: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except (TypeError, UnicodeDecodeError) as e:
        raise BadSampleError(f"{where}: {what} is not UTF-8 text ({e})") from e


def _json_meta(raw: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(_as_text(raw["json"], "json", where))
    except json.JSONDecodeError as e:
        raise BadSampleError(f"{where}: bad JSON ({e})") from e
    if not isinstance(meta, dict):
        raise BadSampleError(f"{where}: bad JSON (a {type(meta).__name__}, not an object)")
    return meta


def _json_caption(raw: Mapping[str, Any], where: str) -> Optional[str]:
    caption = _json_meta(raw, where).get("caption")
    if caption is not None and not isinstance(caption, str):
        raise BadSampleError(f"{where}: json caption is a {type(caption).__name__}, not a string")
    return caption


def raw_caption(raw: Mapping[str, Any], where: Optional[str] = None) -> str:
    """The caption as stored (uncleaned); BadSampleError if there is none."""
    where = where or _where(raw)
    caption = _json_caption(raw, where)
    # img2dataset leaves json["caption"] null when it had no caption column; txt is then the source.
    if (caption is None or not caption.strip()) and "txt" in raw:
        caption = _as_text(raw["txt"], "txt", where)
    if caption is None or not caption.strip():
        raise BadSampleError(f"{where}: missing or empty caption (no json 'caption', no txt)")
    return caption


def sample_references(raw: Mapping[str, Any]) -> List[str]:
    """The reference captions of a sample, as stored (uncleaned): `json["captions"]` when the shard
    carries several per image (mgpt4-make-shards writes them from a record's `captions` list),
    else `[caption]`. Evaluation scores against all of them; training uses the caption only."""
    where = _where(raw)
    references = _json_meta(raw, where).get("captions")
    if references is None:
        return [raw_caption(raw, where)]
    if (not isinstance(references, list) or not references
            or not all(isinstance(r, str) and r.strip() for r in references)):
        raise BadSampleError(f"{where}: json captions must be a non-empty list of non-empty strings")
    return list(references)


def _training_caption(raw: Mapping[str, Any], where: str, clean: bool, max_words: int) -> str:
    """The caption as training uses it: raw, or BLIP-cleaned (stage 1); never empty."""
    caption = raw_caption(raw, where)
    if clean:
        caption = blip_caption(caption, max_words)
        if not caption:
            raise BadSampleError(f"{where}: caption is empty after cleaning")
    return caption


def decode_sample(raw: Mapping[str, Any], transform: Callable[[Image.Image], "torch.Tensor"], clean: bool,
                  max_words: int) -> Tuple["torch.Tensor", str]:
    """(image tensor, caption) of a raw sample from `read_shard_samples`.

    The image comes from the first of `jpg`/`jpeg`/`png`/`webp`, the caption from `json["caption"]`
    or else `txt`; with `clean` it goes through `blip_caption`. Raises BadSampleError naming the
    key and the problem: no image, undecodable or truncated image, missing or empty caption, bad JSON.
    """
    where = _where(raw)
    field = next((f for f in IMAGE_FIELDS if f in raw), None)
    if field is None:
        raise BadSampleError(f"{where}: no image (none of {', '.join(IMAGE_FIELDS)}; has {sorted(raw)})")
    # The caption is checked before the image: rejecting a sample should not cost a decode.
    caption = _training_caption(raw, where, clean, max_words)
    try:
        image = decode_image(raw[field])
    except BadSampleError as e:
        raise BadSampleError(f"{where}: {field}: {e}") from e
    return transform(image), caption


# Precomputed vision features (mgpt4-cache-features) are stored as a `.npy` field: numpy's own
# format, read without pickle.
FEATURES_FIELD = "npy"


def encode_features(features: "torch.Tensor") -> bytes:
    import numpy as np
    import torch

    tensor = features.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: float32 holds it exactly
        tensor = tensor.float()
    buf = io.BytesIO()
    np.save(buf, tensor.numpy(), allow_pickle=False)
    return buf.getvalue()


def decode_feature_sample(raw: Mapping[str, Any], clean: bool, max_words: int) -> Tuple["torch.Tensor", str]:
    """(features [image tokens, width], caption) of a sample written by mgpt4-cache-features."""
    import numpy as np
    import torch

    where = _where(raw)
    if FEATURES_FIELD not in raw:
        raise BadSampleError(f"{where}: no cached features ({FEATURES_FIELD}); is data.features=true "
                             f"pointing at image shards? Run mgpt4-cache-features first")
    caption = _training_caption(raw, where, clean, max_words)
    try:
        array = np.load(io.BytesIO(raw[FEATURES_FIELD]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadSampleError(f"{where}: unreadable features: {e}") from e
    if array.ndim != 2:
        raise BadSampleError(f"{where}: features of shape {array.shape}, expected [image tokens, width]")
    return torch.from_numpy(array), caption

