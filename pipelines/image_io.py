"""Reading and writing image files for the CLI, in ComfyUI's IMAGE convention (H, W, C in [0, 1])."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, and the images inside any folder, sorted; a missing path is an error."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path.name} (looked in {path.parent.resolve()})")
    if not found:
        raise FileNotFoundError("no input images found (supported: " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    return found


def load_image(path: Path) -> torch.Tensor:
    """(H, W, C) float32 in [0, 1]; keeps gray (C=1), gray+alpha (2), RGB (3) or RGBA (4)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode not in ("L", "LA", "RGB", "RGBA"):
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
        array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.astype(np.float32) / 255.0)


def save_image(image: torch.Tensor, path: Path) -> None:
    """Round to 8 bits and write; the format follows the suffix."""
    array = (image.clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    if array.shape[-1] == 1:
        array = array[:, :, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
