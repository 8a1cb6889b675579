"""Image files <-> ComfyUI's IMAGE convention ((H, W, C) float32 in [0, 1], C = 1 gray, 2 gray+alpha,
3 RGB, 4 RGBA), for every mode Pillow reads.

Public API:
- `probe_image(path)` -> `ImageInfo`: opens, verifies and fully decodes the file (cheap next to
  upscaling it), so corrupt, truncated or non-image files are caught before any model loads.
- `read_image(path)` -> `LoadedImage` (pixels + what was done to them, e.g. "3 frames: only the first
  is upscaled"); `load_image(path)` -> just the pixels.
- `output_format(suffix, channels, bit_depth)` -> the Pillow format, or `ImageError` saying why the
  format cannot hold the image; `fallback_suffix(...)` picks one that can.
- `save_image(pixels, path, bit_depth=8, replace=True)`: written atomically (`batch.atomic`).
- `ImageError`: one-line, actionable, names the file and its folder.

Loading rules: EXIF orientation is applied; 1-bit becomes 0/1 gray; palette images become RGB, or
RGBA when they carry transparency; CMYK/YCbCr/LAB/HSV become RGB; grayscale stays one channel.
Integer and float grayscale (I;16*, I, F) are scaled by their real range, not clipped to 8 bits:
I;16 by 65535; I by its file's bits per sample when stated, else by 65535 when the values fit;
F is taken as is when it lies in [0, 1], divided by 255 or 65535 when its values fit those ranges,
else stretched from its minimum to its maximum (said in the notes). Multi-frame files give their
first frame, with a note. Pillow reads 16-bit colour PNG/TIFF at 8 bits; that is noted too.

16-bit output: Pillow can write 16 bits only for grayscale, so 16-bit PNGs are encoded here
(`_png16`, filter 0 + zlib: a few lines of the PNG spec); 16-bit TIFF is available for grayscale.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .atomic import TargetExistsError, atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
BIT_DEPTHS = (8, 16)
CHANNEL_NAMES = {1: "grayscale", 2: "grayscale+alpha", 3: "RGB", 4: "RGBA"}

# suffix -> (Pillow format, channel counts it holds, bit depths we can write in it)
_FORMATS: dict[str, tuple[str, frozenset[int], frozenset[int]]] = {
    ".png": ("PNG", frozenset({1, 2, 3, 4}), frozenset({8, 16})),
    ".jpg": ("JPEG", frozenset({1, 3}), frozenset({8})),
    ".jpeg": ("JPEG", frozenset({1, 3}), frozenset({8})),
    ".webp": ("WEBP", frozenset({3, 4}), frozenset({8})),
    ".bmp": ("BMP", frozenset({1, 3, 4}), frozenset({8})),
    ".tif": ("TIFF", frozenset({1, 2, 3, 4}), frozenset({8, 16})),
    ".tiff": ("TIFF", frozenset({1, 2, 3, 4}), frozenset({8, 16})),
}
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}, "PNG": {"compress_level": 6}}
_RGB_MODES = {"RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_ORIENTATION = 0x0112  # EXIF tag


class ImageError(ValueError):
    """An image cannot be read or written as asked; the message names the file and its folder."""


class ImageTooLargeError(ImageError):
    """`probe_image`'s pixel limit, found from the header before anything was decoded."""

    def __init__(self, message: str, width: int, height: int):
        super().__init__(message)
        self.width, self.height = width, height


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    width: int
    height: int
    mode: str  # Pillow's mode of the (first) frame
    channels: int  # channels of the loaded IMAGE (1..4)
    bit_depth: int  # 8, 16 or 32 (float) bits per sample of the source as read
    frames: int


@dataclass
class LoadedImage:
    pixels: torch.Tensor  # (H, W, C) float32 in [0, 1]
    info: ImageInfo
    notes: list[str] = field(default_factory=list)


def where(path: Path) -> str:
    """'name in /abs/folder': how every message names a file."""
    path = Path(path)
    return f"{path.name} in {path.parent.resolve()}"


def probe_image(path: Path | str, max_pixels: int | None = None) -> ImageInfo:
    """Header, `Image.verify()` and a full decode in the file's own mode (no float copy); raises
    `ImageError` for anything unreadable, or larger than `max_pixels` (checked before decoding)."""
    path = Path(path)
    with _open(path) as image:
        try:
            image.verify()
        except Exception as error:
            raise _unreadable(path, error) from None
    with _open(path) as image:
        width, height = image.size
        if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(f"{where(path)} is {width}x{height}, more than {max_pixels} pixels", width, height)
        try:
            image.seek(0)
            image.load()
        except Exception as error:
            raise _unreadable(path, error) from None
        if width == 0 or height == 0:
            raise ImageError(f"{where(path)} has no pixels")
        frames = int(getattr(image, "n_frames", 1) or 1)
        channels, bits = _channels_and_bits(image)
        return ImageInfo(path, width, height, image.mode, channels, bits, frames)


def read_image(path: Path | str) -> LoadedImage:
    """Pixels of the first frame in [0, 1] plus notes on what the conversion did."""
    path = Path(path)
    notes: list[str] = []
    with _open(path) as image:
        frames = int(getattr(image, "n_frames", 1) or 1)
        if frames > 1:
            notes.append(f"{frames} frames: only the first is upscaled")
        try:
            image.seek(0)
            raw_mode = _tile_rawmode(image)
            image.load()
            mode = image.mode
            transposed = ImageOps.exif_transpose(image)
            array, bits, note = _to_array(transposed, path)
        except ImageError:
            raise
        except Exception as error:
            raise _unreadable(path, error) from None
    if note:
        notes.append(note)
    if ";16" in raw_mode and bits == 8:
        notes.append("16-bit colour read at 8 bits (Pillow reads colour images at 8 bits per channel)")
    height, width, channels = array.shape
    info = ImageInfo(path, width, height, mode, channels, bits, frames)
    return LoadedImage(torch.from_numpy(np.ascontiguousarray(array)), info, notes)


def load_image(path: Path | str) -> torch.Tensor:
    """(H, W, C) float32 in [0, 1]; see the module docstring for the conversions."""
    return read_image(path).pixels


def output_format(suffix: str, channels: int, bit_depth: int = 8) -> str:
    """Pillow format name for writing `channels` at `bit_depth` to `suffix`, or `ImageError`."""
    suffix = suffix.lower()
    if suffix not in _FORMATS:
        raise ImageError(f"cannot write {suffix or 'files without a suffix'}; use one of {', '.join(OUTPUT_SUFFIXES)}")
    name, holds, depths = _FORMATS[suffix]
    if bit_depth not in BIT_DEPTHS:
        raise ImageError(f"bit depth must be 8 or 16, got {bit_depth}")
    if channels not in holds:
        raise ImageError(f"{name} cannot hold {CHANNEL_NAMES.get(channels, f'{channels}-channel')} images")
    if bit_depth not in depths or (name == "TIFF" and bit_depth == 16 and channels != 1):
        raise ImageError(f"{name} cannot be written with {bit_depth} bits per channel here; use .png")
    return name


def fallback_suffix(suffix: str, channels: int, bit_depth: int = 8) -> str:
    """`suffix` when it can hold the image, else .png (which holds every case)."""
    try:
        output_format(suffix, channels, bit_depth)
        return suffix
    except ImageError:
        return ".png"


def save_image(pixels: torch.Tensor | np.ndarray, path: Path | str, bit_depth: int = 8, replace: bool = True) -> None:
    """Write (H, W, C) values in [0, 1] (clamped) atomically; the format follows the suffix."""
    path = Path(path)
    array = pixels.detach().float().cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in CHANNEL_NAMES:
        raise ImageError(f"cannot save {where(path)}: expected (H, W, C) with 1..4 channels, got {array.shape}")
    try:
        fmt = output_format(path.suffix, array.shape[2], bit_depth)
    except ImageError as error:
        raise ImageError(f"cannot save {where(path)}: {error}") from None
    if not np.isfinite(array).all():
        raise ImageError(f"cannot save {where(path)}: the image has NaN or infinite values")
    array = np.clip(array.astype(np.float64), 0.0, 1.0)
    if bit_depth == 16 and fmt == "PNG":
        data = _png16(np.round(array * 65535.0).astype(np.uint16))
    else:
        buffer = io.BytesIO()
        _pil_image(array, bit_depth).save(buffer, format=fmt, **_SAVE_OPTIONS.get(fmt, {}))
        data = buffer.getvalue()
    try:
        with atomic_write(path, replace=replace) as stream:
            stream.write(data)
    except TargetExistsError:
        raise
    except OSError as error:
        raise ImageError(f"cannot write {where(path)}: {error.strerror or error}") from None


# -- reading ---------------------------------------------------------------------------------------

def _open(path: Path) -> Image.Image:
    if path.is_dir():
        raise ImageError(f"{where(path)} is a folder, not an image")
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise ImageError(f"image not found: {where(path)}") from None
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        what = "is empty" if size == 0 else "is not an image Pillow can read"
        raise ImageError(f"{where(path)} {what}; remove it or replace it with a valid image") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"{where(path)} is too large to open safely ({error})") from None
    except OSError as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: BaseException) -> ImageError:
    reason = str(error).strip().rstrip(".") or type(error).__name__
    return ImageError(f"{where(path)} could not be read ({reason}); it may be corrupt or truncated")


def _tile_rawmode(image: Image.Image) -> str:
    tile = getattr(image, "tile", None) or []
    try:
        return str(tile[0][3] if not hasattr(tile[0], "args") else tile[0].args)
    except (IndexError, TypeError, AttributeError):
        return ""


def _to_array(image: Image.Image, path: Path) -> tuple[np.ndarray, int, str]:
    """(H, W, C) float32 in [0, 1], bits per sample of the source, and a note (or '')."""
    mode = image.mode
    if mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float32)
        return (values / 65535.0)[:, :, None], 16, ""
    if mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        scaled, note = _scale_by_range(values, mode, _bits_per_sample(image))
        return scaled.astype(np.float32)[:, :, None], 16 if mode == "I" else 32, note
    if mode == "1":
        image = image.convert("L")
    elif mode in ("P", "PA"):
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
    elif mode == "La":
        image = image.convert("LA")
    elif mode == "RGBa":
        image = image.convert("RGBA")
    elif mode in _RGB_MODES:
        image = image.convert("RGB")
    elif mode == "L" and "transparency" in image.info:
        image = image.convert("LA")
    elif mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    array = np.asarray(image, dtype=np.uint8).astype(np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{where(path)} has no pixels")
    return array, 8, ""


def _channels_and_bits(image: Image.Image) -> tuple[int, int]:
    """What `_to_array` will make of this image: channels of the IMAGE and bits of the source."""
    mode, transparent = image.mode, "transparency" in image.info
    if mode.startswith("I;16") or mode == "I":
        return 1, 16
    if mode == "F":
        return 1, 32
    if mode in ("1", "L"):
        return (2 if transparent and mode == "L" else 1), 8
    if mode in ("LA", "La"):
        return 2, 8
    if mode in ("P", "PA"):
        return (4 if mode == "PA" or transparent else 3), 8
    if mode in ("RGBA", "RGBa"):
        return 4, 8
    if mode in _RGB_MODES:
        return (4 if mode == "RGB" and transparent else 3), 8
    return (4 if "A" in image.getbands() else 3), 8


def _bits_per_sample(image: Image.Image) -> int | None:
    """Bits per sample the file declares (TIFF tag 258), when it does."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return None
    bits = tags.get(258)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if bits else None


def _scale_by_range(values: np.ndarray, mode: str, declared_bits: int | None) -> tuple[np.ndarray, str]:
    if values.size == 0:
        return values, ""
    if not np.isfinite(values).all():
        finite = values[np.isfinite(values)]
        fill = finite.min() if finite.size else 0.0
        values = np.where(np.isnan(values), fill, values)
        values = np.clip(values, finite.min() if finite.size else 0, finite.max() if finite.size else 1)
        note = "NaN/infinite pixels replaced by the nearest finite value; "
    else:
        note = ""
    low, high = float(values.min()), float(values.max())
    if mode == "I" and declared_bits and declared_bits <= 32 and low >= 0:
        return values / float(2**declared_bits - 1), note.rstrip("; ")
    if low >= 0 and mode == "F" and high <= 1.0:
        return values, note.rstrip("; ")
    if low >= 0 and mode == "F" and high <= 255.0:
        return values / 255.0, note.rstrip("; ")
    if low >= 0 and high <= 65535.0:
        return values / 65535.0, note.rstrip("; ")
    if high == low:
        return np.zeros_like(values), note + f"constant value {low:g} mapped to 0"
    return (values - low) / (high - low), note + f"values stretched from [{low:g}, {high:g}] to [0, 1]"


# -- writing ---------------------------------------------------------------------------------------

def _pil_image(array: np.ndarray, bit_depth: int) -> Image.Image:
    channels = array.shape[2]
    if bit_depth == 16:  # grayscale TIFF only (output_format checked)
        return Image.fromarray(np.round(array[:, :, 0] * 65535.0).astype(np.uint16))
    values = np.round(array * 255.0).astype(np.uint8)
    if channels == 1:
        return Image.fromarray(values[:, :, 0])
    return Image.fromarray(values)  # (H, W, 2|3|4) uint8 -> LA, RGB, RGBA


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG (colour type from the channel count, no interlace, filter 0 on every row)."""
    height, width, channels = values.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = np.zeros((height, 1 + width * channels * 2), dtype=np.uint8)
    rows[:, 1:] = values.astype(">u2").reshape(height, -1).view(np.uint8)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))


__all__ = ["IMAGE_SUFFIXES", "OUTPUT_SUFFIXES", "ImageError", "ImageInfo", "LoadedImage", "fallback_suffix",
           "load_image", "output_format", "probe_image", "read_image", "save_image", "where"]
