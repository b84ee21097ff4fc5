"""The one image decoder: every file that enters visiondet (training, evaluation, predict, demo) is read here.

``read_image`` returns ``(H, W, 3)`` uint8 RGB whatever the file holds: JPEG, PNG, BMP, TIFF or WebP;
grayscale, palette, alpha (composited on neutral grey), 16-bit, CMYK. Every failure (missing, empty,
truncated, not an image, too many pixels) is an ``ImageError`` naming the file and the reason, so one bad
file in a folder of thousands says which one it is.

EXIF orientation: ``read_image(path, exif=True)`` shows the image as a photo viewer does (predict, demo).
Datasets instead decide per image with ``exif_for_size``: annotations were drawn either on the raw pixels
or on the rotated ones, and the width/height stored with them says which.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Decompression-bomb guard: 100 megapixels (10,000 x 10,000) decodes to 300 MB of RGB, already more than any
# training pipeline wants; a crafted 1 kB PNG can otherwise claim billions of pixels.
DEFAULT_MAX_PIXELS = 100_000_000

# Pillow format names we accept (Pillow's JPEG opener also takes MPO, the multi-picture JPEG of many phones).
_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")

# Transparent pixels become this colour: mid grey biases no class and is what a normalised input calls zero.
BACKGROUND = (128, 128, 128)

# EXIF orientation tag value -> the Pillow transpose that shows the image upright.
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
# The same orientations on (H, W, C) arrays (views; the caller makes them contiguous).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
}


class ImageError(ValueError):
    """An image file that cannot be used; ``str(err)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keeps the fields when raised inside a DataLoader worker or a process pool
        return type(self), (self.path, self.reason)


class ImageHeader(NamedTuple):
    """The file header, read before any pixel is decoded; ``width``/``height`` are the stored (raw) size."""

    width: int
    height: int
    orientation: int  # EXIF orientation 1..8 (1: upright or no EXIF)
    format: str

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) after the EXIF orientation is applied."""
        if self.orientation in _SWAPS_AXES:
            return self.height, self.width
        return self.width, self.height


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and run every check that does not need the pixels."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except OSError as exc:
        raise ImageError(path, f"cannot read the file ({exc.strerror or exc})") from None
    if not path.is_file():
        raise ImageError(path, "not a file")
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel cap below replaces Pillow's warning; Pillow's hard limit still raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=_FORMATS)
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            head = f.read(8)
        fmt = _guess_other_format(head)
        reason = f"unsupported image format {fmt}" if fmt else f"not an image ({_describe_start(head)})"
        raise ImageError(path, f"{reason}; supported: {', '.join(_FORMATS)}") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"over-size image: {exc}") from None
    except OSError as exc:
        raise ImageError(path, f"cannot read the file ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            path,
            f"over-size image: {width}x{height} = {width * height / 1e6:.1f} megapixels, "
            f"over the limit of {max_pixels / 1e6:.1f}",
        )
    if width == 0 or height == 0:
        image.close()
        raise ImageError(path, f"image has no pixels ({width}x{height})")
    return image


def _describe_start(head: bytes) -> str:
    """What the first bytes look like, in words a user can act on (never a Python bytes literal)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f'a text file starting "{text.strip()}"'
    return f"unknown content starting with bytes {head[:8].hex(' ')}"


def _guess_other_format(head: bytes) -> str | None:
    """Name common image formats we refuse, so the message says 'GIF' rather than 'not an image'."""
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"\x00\x00\x01\x00",):
        return "ICO"
    if head[:4] == b"8BPS":
        return "PSD"
    return None


def _orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return 1
    return value if value in _TRANSPOSE else 1


def read_header(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """Size, EXIF orientation and format from the file header, without decoding the pixels."""
    path = Path(path)
    with _open(path, max_pixels) as image:
        return ImageHeader(image.size[0], image.size[1], _orientation(image), image.format or "")


def image_size(
    path: str | os.PathLike, *, exif: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[int, int]:
    """(width, height) of what ``read_image(path, exif=exif)`` returns, read from the header only."""
    header = read_header(path, max_pixels=max_pixels)
    return header.oriented_size if exif else (header.width, header.height)


def exif_for_size(header: ImageHeader, width: int, height: int) -> bool | None:
    """Whether annotations drawn on a ``width`` x ``height`` image refer to the EXIF-rotated pixels.

    True: apply the EXIF orientation; False: use the raw pixels; None: neither size matches.
    When both match (no rotation, a square image, or a mirror-only orientation) the size cannot tell, and we
    apply EXIF, as annotation tools display the image that way.
    """
    if header.oriented_size == (width, height):
        return True
    if (header.width, header.height) == (width, height):
        return False
    return None


def read_raw(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, int]:
    """Decode without applying EXIF: ``((H, W, 3) uint8 RGB of the stored pixels, EXIF orientation 1..8)``."""
    path = Path(path)
    with _open(path, max_pixels) as image:
        orientation = _orientation(image)
        try:
            image.load()
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error ... here
            raise ImageError(path, f"truncated or corrupt image data ({exc})") from None
        try:
            array = _to_rgb(image)
        except ValueError as exc:
            raise ImageError(path, str(exc)) from None
    return array, orientation


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an ``(H, W, C)`` array; returns a contiguous array."""
    if orientation not in _ORIENT:
        return image
    return np.ascontiguousarray(_ORIENT[orientation](image))


def read_image(
    path: str | os.PathLike, *, exif: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode any supported image file to ``(H, W, 3)`` uint8 RGB.

    Args:
        path: the image file.
        exif: apply the EXIF orientation (what a photo viewer shows). Datasets pass the value
            ``exif_for_size`` chose for the annotations.
        max_pixels: refuse images with more pixels than this (decompression bombs).

    Raises:
        ImageError: missing, empty, truncated, not an image, unsupported format or over-size; the message
            names the file and the reason.
    """
    image, orientation = read_raw(path, max_pixels=max_pixels)
    return apply_orientation(image, orientation) if exif else image


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> writable ``(H, W, 3)`` uint8 RGB."""
    mode = image.mode
    if mode == "RGB":
        return _writable(np.asarray(image))
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        return _to_rgb(image)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = np.asarray(image.convert("RGBA"))
        return _composite(rgba)
    if mode == "L":
        return _gray_to_rgb(np.asarray(image))
    if mode == "1":
        return _gray_to_rgb(np.asarray(image.convert("L")))
    if mode.startswith("I;16") or mode == "I":
        # 16-bit data: the full 0..65535 range maps linearly (rounded) onto 0..255.
        values = np.asarray(image).astype(np.int64)
        values = np.clip(values, 0, 65535)
        return _gray_to_rgb(((values * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        # Floating-point TIFFs: [0, 1] when they look normalised, otherwise read as 0..255.
        values = np.nan_to_num(np.asarray(image, dtype=np.float32))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        return _gray_to_rgb(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8))
    try:
        # CMYK, YCbCr, LAB, HSV: Pillow's own conversion (no colour management).
        return _writable(np.asarray(image.convert("RGB")))
    except (ValueError, OSError) as exc:
        raise ValueError(f"unsupported pixel mode {mode!r} ({exc})") from None


def _writable(array: np.ndarray) -> np.ndarray:
    # Pillow may hand out read-only buffers; augmentations write in place.
    return array if array.flags.writeable and array.flags.c_contiguous else np.array(array)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _composite(rgba: np.ndarray) -> np.ndarray:
    """Alpha-blend ``(H, W, 4)`` uint8 over ``BACKGROUND`` with integer rounding."""
    rgb = rgba[:, :, :3].astype(np.uint16)
    alpha = rgba[:, :, 3:4].astype(np.uint16)
    background = np.asarray(BACKGROUND, dtype=np.uint16)
    out = (rgb * alpha + background * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)
