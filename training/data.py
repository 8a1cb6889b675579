"""Training data: HR images (a folder or a list file) or paired LR/HR folders, cropped and flipped.

Every random choice (which images make a step's batch, crop position, flip) is a function of
(run seed, step, position in the global batch), so:
  - a resumed run continues with exactly the batches an uninterrupted run would have seen
    (the data position is just the step number),
  - N processes with batch B see the same samples as one process with batch N * B.
Unreadable files are skipped at start-up with a count and their names; a dataset with nothing
readable is an error naming the folder. Images smaller than the crop are reflect-padded (as
Real-ESRGAN's dataset does), resized, or skipped (`data.small_images`), and the choice is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..batch.images import IMAGE_SUFFIXES

log = logging.getLogger("onestep_sr.training")


class DatasetError(ValueError):
    """The dataset is empty, unreadable or inconsistent."""


def list_images(source: str | Path) -> list[Path]:
    """Images in a folder (recursively, sorted) or listed one per line in a text file."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if path.is_file():
        base = path.parent
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [Path(line) if Path(line).is_absolute() else base / line for line in lines if line and not
                line.startswith("#")]
    raise DatasetError(f"training data {path.name} not found in {path.parent.resolve()}: give a folder of images "
                       "or a text file listing them")


def _probe(path: Path) -> tuple[int, int] | None:
    """(H, W) from the header only (a full decode of 85k images at start-up would take minutes); files
    that pass this but fail to decode later are replaced in their batch and reported then."""
    try:
        with Image.open(path) as image:
            return image.size[1], image.size[0]
    except Exception:  # noqa: BLE001 - any failure means the file is unusable
        return None


def read_rgb(path: Path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


@dataclass
class Sample:
    path: Path
    size: tuple[int, int]
    lr_path: Path | None = None
    prompt: str = ""


def _prompt_for(path: Path, source: str) -> str:
    if source == "caption":
        caption = path.with_suffix(".txt")
        return caption.read_text().strip() if caption.is_file() else ""
    return ""


class TrainImages(torch.utils.data.Dataset):
    """HR crops (and LR crops when paired). Index with (sample_index, draw_seed, global_position)."""

    def __init__(self, source: str | Path, crop: int, scale: int = 4, flip: bool = True,
                 small_images: str = "pad", lr_folder: str | Path | None = None, prompts: str = "empty",
                 cache_decoded: bool = False, what: str = "training") -> None:
        self.crop, self.scale, self.flip, self.small_images = crop, scale, flip, small_images
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] | None = {} if cache_decoded else None
        paths = list_images(source)
        folder = Path(source).resolve()
        if not paths:
            raise DatasetError(f"no images in {folder} (supported: {', '.join(sorted(IMAGE_SUFFIXES))})")
        samples, unreadable, small, no_pair = [], [], [], []
        partners: dict[str, Path] = {}
        if lr_folder is not None:
            for candidate in sorted(Path(lr_folder).rglob("*")):
                if candidate.suffix.lower() in IMAGE_SUFFIXES:
                    partners.setdefault(candidate.stem, candidate)
        for path in paths:
            size = _probe(path) if path.is_file() else None
            if size is None:
                unreadable.append(path.name)
                continue
            lr_path = None
            if lr_folder is not None:
                lr_path = partners.get(path.stem)
                if lr_path is None or _probe(lr_path) is None:
                    no_pair.append(path.name)
                    continue
            if min(size) < crop:
                small.append(path.name)
                if small_images == "skip":
                    continue
            samples.append(Sample(path, size, lr_path, _prompt_for(path, prompts)))
        if unreadable:
            log.warning("%s data: skipped %d of %d file(s) that cannot be read as images: %s", what,
                        len(unreadable), len(paths), ", ".join(unreadable[:10]) + (" ..." if len(unreadable) > 10 else ""))
        if no_pair:
            log.warning("%s data: skipped %d image(s) with no readable LR partner in %s: %s", what, len(no_pair),
                        Path(lr_folder).resolve(), ", ".join(no_pair[:10]))
        if small:
            action = {"pad": "reflect-padded up to", "resize": "resized up to", "skip": "skipped (smaller than"}
            log.warning("%s data: %d image(s) smaller than the %d px crop were %s %d px: %s", what, len(small), crop,
                        action[small_images], crop, ", ".join(small[:10]))
        if not samples:
            raise DatasetError(f"no usable {what} images in {folder}: {len(paths)} found, {len(unreadable)} "
                               f"unreadable, {len(small) if small_images == 'skip' else 0} too small, "
                               f"{len(no_pair)} without an LR partner")
        self.samples = samples
        self.skipped = {"unreadable": unreadable, "small": small, "no_pair": no_pair}

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        sample = self.samples[index]
        hr = read_rgb(sample.path)
        lr = read_rgb(sample.lr_path) if sample.lr_path is not None else None
        if self.cache is not None:
            self.cache[index] = (hr, lr)
        return hr, lr

    def _fit(self, image: torch.Tensor, size: int) -> torch.Tensor:
        h, w = image.shape[-2:]
        if min(h, w) >= size:
            return image
        if self.small_images == "resize":
            factor = size / min(h, w)
            new = (max(size, round(h * factor)), max(size, round(w * factor)))
            return F.interpolate(image[None], size=new, mode="bicubic", align_corners=False)[0].clamp(0, 1)
        pad_h, pad_w = max(0, size - h), max(0, size - w)
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        return F.pad(image[None], (0, pad_w, 0, pad_h), mode=mode)[0]

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        index, draw_seed, position = key
        for _attempt in range(len(self.samples)):
            try:
                hr, lr = self._load(index)
                break
            except Exception as error:  # noqa: BLE001 - a file that cannot be decoded must not stop training
                log.warning("cannot decode %s (%s); using the next image instead", self.samples[index].path, error)
                index = (index + 1) % len(self.samples)
        else:
            raise DatasetError("no image of the dataset can be decoded")
        generator = torch.Generator().manual_seed(int(draw_seed))
        if lr is None:
            hr = self._fit(hr, self.crop)
            h, w = hr.shape[-2:]
            top = int(torch.randint(0, h - self.crop + 1, (), generator=generator))
            left = int(torch.randint(0, w - self.crop + 1, (), generator=generator))
            hr = hr[:, top:top + self.crop, left:left + self.crop]
        else:
            lr_crop = self.crop // self.scale
            lr = self._fit(lr, lr_crop)
            h, w = lr.shape[-2:]
            top = int(torch.randint(0, h - lr_crop + 1, (), generator=generator))
            left = int(torch.randint(0, w - lr_crop + 1, (), generator=generator))
            lr = lr[:, top:top + lr_crop, left:left + lr_crop]
            hr = self._fit(hr, self.crop)
            hr = hr[:, top * self.scale:top * self.scale + self.crop, left * self.scale:left * self.scale + self.crop]
            if hr.shape[-1] != self.crop or hr.shape[-2] != self.crop:
                raise DatasetError(f"{self.samples[index].path.name}: HR is not {self.scale}x its LR partner")
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            hr = hr.flip(-1)
            lr = lr.flip(-1) if lr is not None else None
        item = {"gt": hr.contiguous(), "id": position, "prompt": self.samples[index].prompt,
                "path": str(self.samples[index].path)}
        if lr is not None:
            item["lr"] = lr.contiguous()
        return item


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for each step from `start_step`, this rank's slice of the global batch as
    (sample_index, draw_seed, global_position) triples. Epochs are seeded permutations of the dataset."""

    def __init__(self, size: int, batch: int, seed: int, start_step: int, max_steps: int,
                 rank: int = 0, world: int = 1) -> None:
        self.size, self.batch, self.seed = size, batch, seed
        self.start_step, self.max_steps, self.rank, self.world = start_step, max_steps, rank, world

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def positions(self, step: int) -> list[int]:
        global_batch = self.batch * self.world
        first = step * global_batch + self.rank * self.batch
        return list(range(first, first + self.batch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cache: dict[int, torch.Tensor] = {}
        for step in range(self.start_step, self.max_steps):
            keys = []
            for position in self.positions(step):
                epoch, offset = divmod(position, self.size)
                if epoch not in cache:
                    cache.clear()
                    cache[epoch] = self._permutation(epoch)
                keys.append((int(cache[epoch][offset]), (self.seed * 1_000_003 + position) % (2**62), position))
            yield keys

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)


def collate(items: list[dict]) -> dict:
    batch = {"gt": torch.stack([i["gt"] for i in items]), "id": torch.tensor([i["id"] for i in items]),
             "prompt": [i["prompt"] for i in items], "path": [i["path"] for i in items]}
    if "lr" in items[0]:
        batch["lr"] = torch.stack([i["lr"] for i in items])
    return batch
