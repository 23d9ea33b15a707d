"""An image a client sent, checked before anything decodes it for real: a known format, a size read from
its header and bounded (a decompression bomb is refused without being decoded), then decoded once in
full (a truncated file fails here, not on a GPU). Failures are 422s in fal's model-error shape: a `type`
(`image_load_error`, `unsupported_image_format`, `image_too_large`, `image_too_small`, `file_too_large`)
at the field's `loc`."""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from serve_app.contract.errors import ValidationFailed
from serve_app.contract.requests import MAX_SIDE, MIN_SIDE

# MPO: the multi-picture JPEG most phones and many cameras write; its first picture is a plain JPEG.
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp"}
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error)
ROTATED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
EXIF_ORIENTATION = 0x0112
SIDE_STEP = 8  # SDXL's sizes are multiples of 8


@dataclass(frozen=True)
class CheckedImage:
    data: bytes  # the file as sent
    content_type: str
    width: int  # upright (after its EXIF orientation)
    height: int


def input_error(field: str, kind: str, message: str, **context: object) -> ValidationFailed:
    entry: dict = {"type": kind, "loc": ["body", field], "msg": message}
    if context:
        entry["ctx"] = context
    return ValidationFailed([entry])


def check_image(data: bytes, field: str, max_bytes: int, max_pixels: int) -> CheckedImage:
    """The image if it is one this service can use; a 422 saying why not. Decodes it: call off the event loop."""
    if len(data) > max_bytes:
        raise input_error(field, "file_too_large", f"the image is over {max_bytes} bytes", max_bytes=max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower bound applies below
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise input_error(field, "image_too_large", "the image has too many pixels", max_pixels=max_pixels) from error
    except (UnidentifiedImageError, *DECODE_ERRORS) as error:
        raise input_error(field, "image_load_error", "the file is not an image this service can read") from error
    with image:
        if image.format not in FORMATS:
            message = f"{image.format or 'this'} images are not supported: send PNG, JPEG or WebP"
            raise input_error(field, "unsupported_image_format", message, supported=sorted(FORMATS))
        width, height = image.size
        if width * height > max_pixels:
            message = f"the image is {width}x{height}, over {max_pixels} pixels"
            raise input_error(field, "image_too_large", message, max_pixels=max_pixels)
        try:
            image.load()  # the whole file decodes (a truncated one fails here)
        except DECODE_ERRORS as error:
            raise input_error(field, "image_load_error", "the image is damaged or truncated") from error
        if exif_orientation(image) in ROTATED_ORIENTATIONS:
            width, height = height, width
        return CheckedImage(data, FORMATS[image.format], width, height)


def exif_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation, or None when there is none or the EXIF block cannot be read (the image is
    then taken as it is stored, as the model replica takes it)."""
    try:
        return image.getexif().get(EXIF_ORIENTATION)
    except DECODE_ERRORS:
        return None


def fitted_size(image: CheckedImage, field: str = "image_url") -> tuple[int, int]:
    """The output size an input gives when the request names none: its own, scaled down (aspect kept) to
    at most `MAX_SIDE` a side, each side down to a multiple of 8; a 422 when a side ends under `MIN_SIDE`."""
    scale = min(1.0, MAX_SIDE / max(image.width, image.height))
    width, height = (int(side * scale) // SIDE_STEP * SIDE_STEP for side in (image.width, image.height))
    if min(width, height) < MIN_SIDE:
        message = f"the image is {image.width}x{image.height}: each side must be at least {MIN_SIDE} pixels"
        raise input_error(field, "image_too_small", message, min_width=MIN_SIDE, min_height=MIN_SIDE)
    return width, height
