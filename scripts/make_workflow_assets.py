"""Generate the template assets: a thumbnail per workflow (`workflows/<stem>.jpg`, what ComfyUI's template
browser shows), the sample input the workflows' Load Image names (`workflows/onestep_sr_sample.png`) and the
pack icon (`docs/icon.png`).

Everything is drawn from a synthetic scene (no downloaded art), deterministically, so the files can be
re-made and reviewed:  python scripts/make_workflow_assets.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
SAMPLE_NAME = "onestep_sr_sample.png"
SAMPLE_SIZE = (128, 96)
THUMB_SIZE = 256
TITLES = {
    "osediff_upscale_image": "OSEDiff x4",
    "txt2img_then_osediff_upscale": "txt2img + x4",
    "s3diff_degradation_upscale": "S3Diff x4",
    "hero_sr_tags_timestep_upscale": "Hero-SR x4",
    "hf_diff_upscale_image": "HF-Diff x4",
}


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """A small landscape: sky gradient, sun, hills, a striped fence and fine texture (detail to restore)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([0.35 + 0.3 * y / height, 0.55 + 0.25 * y / height, 0.95 - 0.2 * y / height], -1)
    image = sky.copy()
    sun = (x - 0.72 * width) ** 2 + (y - 0.28 * height) ** 2 < (0.11 * min(width, height)) ** 2
    image[sun] = (1.0, 0.85, 0.35)
    hills = y > height * (0.62 + 0.08 * np.sin(x / width * 6.3))
    image[hills] = np.stack([0.2 + 0.1 * np.sin(x / 3.0), 0.55 + 0.1 * np.cos(y / 2.0), 0.25 + 0 * x], -1)[hills]
    fence = (y > height * 0.7) & (y < height * 0.86) & ((x // max(2, width // 32)) % 2 == 0)
    image[fence] = (0.55, 0.35, 0.2)
    image += rng.normal(0, 0.02, image.shape)
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), "RGB")


def sample_input() -> Image.Image:
    """The low-resolution input: the scene rendered small and slightly blurred, as a real LR image is."""
    return scene(*SAMPLE_SIZE, seed=1).filter(ImageFilter.GaussianBlur(0.6))


def thumbnail(title: str) -> Image.Image:
    """Left: the sample input enlarged with nearest neighbour (what x4 starts from); right: the scene drawn
    at full size (what the upscale aims at); a divider and the workflow's title."""
    size = THUMB_SIZE
    low = sample_input().resize((size * 4 // 3, size), Image.Resampling.NEAREST).crop((0, 0, size, size))
    high = scene(size * 4 // 3, size, seed=1).crop((0, 0, size, size))
    canvas = high.copy()
    canvas.paste(low.crop((0, 0, size // 2, size)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.line([(size // 2, 0), (size // 2, size)], fill=(255, 255, 255), width=3)
    draw.rectangle([(0, size - 34), (size, size)], fill=(20, 20, 28))
    draw.text((10, size - 26), title, fill=(255, 255, 255), font_size=18)
    return canvas


def icon() -> Image.Image:
    """Square 256 px icon: a pixelated 'before' half and a smooth 'after' half of a sun over hills."""
    image = thumbnail("").crop((0, 0, THUMB_SIZE, THUMB_SIZE - 34)).resize((256, 256), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle([(0, 0), (255, 255)], radius=36, outline=(255, 255, 255), width=6)
    return image


def main() -> None:
    sample_input().save(WORKFLOWS / SAMPLE_NAME, optimize=True)
    for path in sorted(WORKFLOWS.glob("*.json")):
        thumbnail(TITLES.get(path.stem, path.stem)).save(path.with_suffix(".jpg"), quality=82, optimize=True)
    (ROOT / "docs").mkdir(exist_ok=True)
    icon().quantize(64).save(ROOT / "docs" / "icon.png", optimize=True)
    print(f"wrote {SAMPLE_NAME}, {len(list(WORKFLOWS.glob('*.json')))} thumbnails and docs/icon.png")


if __name__ == "__main__":
    main()
