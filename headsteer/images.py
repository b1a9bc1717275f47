"""Images in, RGB out: the one place an image a user gives (a path, bytes, a PIL image of any mode)
becomes what the model's processor reads.

How each PIL mode becomes 8-bit RGB (a plain ``convert("RGB")`` clips 16-bit grey to white, and a
model then answers about another picture):

- ``RGB``, ``L``, ``1``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``, ``P`` (no transparency): PIL's conversion.
- Transparency (``RGBA``, ``LA``, ``La``, ``RGBa``, ``PA``, and ``P``/``L``/``RGB`` with a transparent
  colour): composited on white — what transformers' own ``convert_rgb`` does for the processors
  that convert, so a transparent pixel reads the same whichever of the two converts it.
- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): scaled from its full range 0–65535 to 0–255.
- 32-bit integer ``I`` (how Pillow holds a 16-bit PNG or TIFF): values must lie in 0–65535 and are
  scaled like 16-bit grey; other values are refused (no range to scale them from).
- 32-bit float ``F``: values in [0, 1] are scaled by 255, values in [0, 255] are taken as they are;
  other values (or NaN/inf) are refused.
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import HeadsteerError
from .paths import input_file

_ALPHA = ("RGBA", "LA", "La", "RGBa", "PA")
_SIXTEEN = ("I;16", "I;16B", "I;16L", "I;16N")


def _from_grey(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(im: Image.Image, name: str = "image") -> Image.Image:
    """8-bit RGB of ``im`` by the rules in the module docstring; a one-line HeadsteerError for a
    mode or a value range that has no faithful RGB."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN:
        return _from_grey(np.asarray(im, dtype=np.float64) * (255.0 / 65535.0))
    if mode == "I":
        a = np.asarray(im, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise HeadsteerError(f"{name}: a 32-bit integer image with values {a.min()} to {a.max()}, outside the 16-bit "
                                 "range 0-65535: save it as an 8- or 16-bit image")
        return _from_grey(a * (255.0 / 65535.0))
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and not np.isfinite(a).all():
            raise HeadsteerError(f"{name}: a floating-point image holding NaN or infinite values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            return _from_grey(a * 255.0)
        if lo >= 0 and hi <= 255:
            return _from_grey(a)
        raise HeadsteerError(f"{name}: a floating-point image with values {lo:g} to {hi:g}; headsteer reads [0, 1] or "
                             "[0, 255]: save it as an 8-bit image")
    try:
        if mode in _ALPHA or "transparency" in im.info:
            rgba = im.convert("LA").convert("RGBA") if mode == "La" else im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise HeadsteerError(f"{name}: cannot convert a {mode} image to RGB ({e}): save it as RGB") from None


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Image.DecompressionBombError as e:
        raise HeadsteerError(f"{name}: {e}") from None
    except Exception as e:
        raise HeadsteerError(f"cannot read {name}: not an image file ({type(e).__name__}: {str(e)[:120]})") from None
    return to_rgb(im, name)


def open_image(value, root: Path | None = None, name: str | None = None) -> Image.Image:
    """RGB image of ``value``: a PIL image, a path (relative ones to ``root``), encoded image bytes,
    a ``{"bytes": ..., "path": ...}`` record (the ``datasets`` Image feature; bytes as raw bytes or
    base64 text) or a ``data:image/...;base64,`` URI."""
    if isinstance(value, Image.Image):
        return to_rgb(value, name or "image")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode(bytes(value), name or "image bytes")
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None:
            if isinstance(data, str):
                try:
                    data = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError):
                    raise HeadsteerError(f"{name or 'image'}: its \"bytes\" are text but not base64") from None
            elif isinstance(data, list) and all(isinstance(b, int) and 0 <= b < 256 for b in data):
                data = bytes(data)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise HeadsteerError(f"{name or 'image'}: \"bytes\" must hold the encoded image; got {type(data).__name__}")
            return _decode(bytes(data), name or "image bytes")
        value = value.get("path")
    if isinstance(value, str) and value.startswith("data:image/"):
        _, _, payload = value.partition(",")
        try:
            return _decode(base64.b64decode(payload, validate=True), name or "data: URI image")
        except (binascii.Error, ValueError):
            raise HeadsteerError(f"{name or 'image'}: a data: URI that is not base64") from None
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise HeadsteerError(f"{name or 'image'} must be a file path or image bytes; got {str(value)[:60]!r}")
    p = Path(value).expanduser()
    if root is not None and not p.is_absolute():
        p = Path(root) / p
    input_file(p, "image")
    try:
        im = Image.open(p)
        try:
            im.load()
            rgb = to_rgb(im, str(p))
            return rgb.copy() if rgb is im else rgb  # closing the file would free the pixels of ``im`` itself
        finally:
            im.close()
    except HeadsteerError:
        raise
    except Image.DecompressionBombError as e:
        raise HeadsteerError(f"image {p}: {e}") from None
    except Exception as e:
        raise HeadsteerError(f"cannot read image {p}: {e.__class__.__name__}: {str(e)[:120]}") from None
