"""Loading images safely: RGB, EXIF orientation applied, pixel limit, clear errors."""
from __future__ import annotations

import io
import os
from typing import Union

from PIL import Image, ImageOps

from ..errors import DataError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb warning threshold


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert grayscale / palette / RGBA / CMYK to RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def load_image(source: Union[str, os.PathLike, bytes], max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None, max_side: int | None = None) -> Image.Image:
    """Open ``source`` (a path or encoded bytes) fully and return an RGB PIL image.

    ``max_side``: shrink the image to fit a ``max_side`` square (aspect kept) once decoded, to keep
    it small in memory; ``info["original_size"]`` then holds the size it had.
    Raises DataError naming the file when it is missing, unreadable, truncated,
    not an image, or larger than ``max_pixels``.
    """
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<image bytes>")
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except FileNotFoundError:
        raise DataError(f"{label}: image file not found") from None
    except OSError as e:
        raise DataError(f"{label}: cannot read image file ({e.strerror or e})") from None
    with fp:
        try:
            img = Image.open(fp)
            w, h = img.size
            if w * h > max_pixels:
                raise DataError(f"{label}: image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
            img.load()  # decode now: truncated files fail here, not later in a batch
        except DataError:
            raise
        except Image.DecompressionBombError as e:
            raise DataError(f"{label}: image refused as a decompression bomb ({e})") from None
        except Image.UnidentifiedImageError:
            raise DataError(f"{label}: not an image file (or an unsupported format)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{label}: corrupt or truncated image ({e})") from None
        rgb = to_rgb(img)
    if max_side is not None and max(rgb.size) > max_side:
        size = rgb.size
        rgb.thumbnail((max_side, max_side))
        rgb.info["original_size"] = size
    return rgb


def describe_image(img: Image.Image) -> dict:
    """``{width, height, summary}`` of a decoded image, as it was before :func:`load_image` shrank it."""
    width, height = img.info.get("original_size", img.size)
    return {"width": width, "height": height, "summary": f"{width} × {height}"}
