"""The image transform (shape, CLIP normalization, square resize) and full decoding of image bytes."""
import io

import pytest
import torch
from PIL import Image, ImageFile

from mgpt4_dist.data import BadSampleError
from mgpt4_dist.data.transforms import CLIP_MEAN, CLIP_STD, build_image_transform, decode_image


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_output_shape_and_dtype():
    out = build_image_transform(24)(Image.new("RGB", (40, 30), (10, 20, 30)))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_solid_colour_maps_to_the_clip_normalized_value():
    colour = (200, 100, 50)
    out = build_image_transform(16)(Image.new("RGB", (33, 21), colour))
    for channel, (c, mean, std) in enumerate(zip(colour, CLIP_MEAN, CLIP_STD)):
        expected = (c / 255 - mean) / std
        assert torch.allclose(out[channel], torch.full((16, 16), expected), atol=1.5 / 255 / std)


def test_non_square_input_is_squashed_not_cropped():
    # 4:1 wide, red | green | blue with the outer bands a quarter wide each: a centre crop would
    # keep only green; the squash keeps red at the left edge and blue at the right edge.
    image = Image.new("RGB", (128, 32), (0, 255, 0))
    image.paste((255, 0, 0), (0, 0, 32, 32))
    image.paste((0, 0, 255), (96, 0, 128, 32))
    out = build_image_transform(32)(image)
    assert out.shape == (3, 32, 32)
    left, right = out[:, :, :6], out[:, :, -6:]
    assert (left[0] > left[1]).all() and (left[0] > left[2]).all()
    assert (right[2] > right[0]).all() and (right[2] > right[1]).all()


def test_grey_and_rgba_inputs_become_three_channels():
    transform = build_image_transform(8)
    assert transform(Image.new("L", (10, 10), 128)).shape == (3, 8, 8)
    assert transform(Image.new("RGBA", (10, 10), (1, 2, 3, 4))).shape == (3, 8, 8)


def test_decode_image_gives_rgb_for_png_and_jpeg():
    png = decode_image(_encoded(Image.new("P", (5, 7), 3), "PNG"))
    jpeg = decode_image(_encoded(Image.new("RGB", (9, 4), (0, 255, 0)), "JPEG"))
    assert (png.mode, png.size) == ("RGB", (5, 7))
    assert (jpeg.mode, jpeg.size) == ("RGB", (9, 4))
    assert jpeg.getpixel((4, 2))[1] > 240


@pytest.mark.parametrize("cut", [2, 100])
def test_truncated_jpeg_raises_bad_sample_error(cut):
    data = _encoded(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")
    with pytest.raises(BadSampleError, match="truncated"):
        decode_image(data[:-cut])


def test_garbage_bytes_raise_bad_sample_error():
    with pytest.raises(BadSampleError, match="undecodable"):
        decode_image(b"this is not an image")


def test_nothing_in_the_data_package_enables_loading_truncated_images():
    import mgpt4_dist.data.pipeline  # noqa: F401  (imports shards, text and transforms too)
    import mgpt4_dist.cli.make_shards  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
