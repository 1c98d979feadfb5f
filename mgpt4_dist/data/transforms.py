"""The image side of a sample: bytes or an image file to a fully decoded PIL image (the one image
loader of the package: shards, caption-file ingest, mgpt4-eval-loss and chat all decode through
`decode_image`), and PIL image to model input.

Owns the MiniGPT-4 image transform: a square bicubic resize that neither keeps the aspect ratio nor
crops, then CLIP normalization. It is deterministic and the same for training and evaluation.

Truncated images must fail in `decode_image`: nothing in this package sets PIL's
`ImageFile.LOAD_TRUNCATED_IMAGES`, which would make PIL pad a cut-off JPEG with grey instead.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Callable

from PIL import Image

from mgpt4_dist.data import BadSampleError

if TYPE_CHECKING:
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def build_resize_transform(image_size: int) -> Callable[[Image.Image], "torch.Tensor"]:
    """PIL image -> uint8 tensor [3, image_size, image_size]: the resize half of the transform.

    Kept apart from normalization so the training stream can hold decoded images at a quarter of
    the fp32 size (length-grouped batching buffers a window of them) and normalize a whole batch
    at once; `normalize_images` after this gives bit for bit what `build_image_transform` gives.
    """
    # Imported here: torchvision takes seconds to import, and the shard-writing CLI, which needs
    # `decode_image` from this module, never builds a transform.
    from torchvision import transforms

    return transforms.Compose([
        transforms.Lambda(_to_rgb),
        transforms.Resize((image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.PILToTensor(),
    ])


def normalize_images(images_uint8: "torch.Tensor") -> "torch.Tensor":
    """uint8 [..., 3, H, W] -> float32 CLIP-normalized; the same arithmetic as ToTensor + Normalize."""
    import torch
    from torchvision.transforms import functional

    return functional.normalize(images_uint8.to(torch.float32).div(255), CLIP_MEAN, CLIP_STD)


def build_image_transform(image_size: int) -> Callable[[Image.Image], "torch.Tensor"]:
    """PIL image -> float tensor [3, image_size, image_size], CLIP-normalized."""
    resize = build_resize_transform(image_size)
    return lambda image: normalize_images(resize(image))


def decode_image(data: bytes) -> Image.Image:
    """Fully decoded RGB image; BadSampleError for bytes that are not a complete, readable image."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # PIL opens lazily; decoding now makes a truncated file fail here, not later
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # a direct P->RGB conversion warns about the lost alpha
        return _to_rgb(image)
    except Exception as e:  # PIL's format plugins raise OSError, SyntaxError, ValueError, struct.error...
        raise BadSampleError(f"undecodable or truncated image ({type(e).__name__}: {e})") from e


def load_image_file(path: str) -> Image.Image:
    """`decode_image` of a file's bytes; FileNotFoundError if it is missing, BadSampleError if it does not decode."""
    with open(path, "rb") as f:
        return decode_image(f.read())
