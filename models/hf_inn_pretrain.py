"""`onestep-sr train-inn`: pretrain HF-Diff's high-frequency feature extractor on an image folder.

The paper (HF-Diff sec. 4.1) trains the INN extractor "alongside convolutional and fully-connected
layers" as a classifier on ImageNet: 20 epochs, Adam, lr 5e-4, batch 32, learning rate x 0.95 every
5000 iterations. Those are the defaults here. The folder has the ImageNet / torchvision
ImageFolder layout: one sub-folder per class with its images (at least two classes).
Images are random-cropped to `crop` px (shorter side first resized up when smaller), randomly
flipped, and scaled to [-1, 1]. An unreadable image is logged and replaced by the next one; it does
not stop the run.

A plain single-device loop (not accelerate): one small CNN trained once; the checkpoint
(`models.hf_inn.save_hf_inn`) is written atomically at the end of every epoch, never over an existing
file unless --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .hf_inn import HFInnClassifier, HFInnConfig, save_hf_inn

log = logging.getLogger("onestep_sr")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class PretrainSettings:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 5e-4
    lr_decay: float = 0.95
    lr_decay_every: int = 5000
    crop: int = 128
    seed: int = 0
    workers: int = 4
    max_steps: int | None = None
    log_every: int = 100


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, class index)]) of an ImageFolder-layout folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root.name} (looked in {root.parent})")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                items.append((path, index))
    if len(classes) < 2:
        raise ValueError(f"{root} needs one sub-folder per class (at least two) holding the images; "
                         f"found {len(classes)} sub-folder(s)")
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {root}")
    return classes, items


class ImageFolderCrops(torch.utils.data.Dataset):
    """Random crops in [-1, 1] with their class index."""

    def __init__(self, items: list[tuple[Path, int]], crop: int) -> None:
        self.items, self.crop = items, crop

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, path: Path) -> torch.Tensor:
        with Image.open(path) as image:
            image = image.convert("RGB")
            short = min(image.size)
            if short < self.crop:
                scale = self.crop / short
                image = image.resize((max(self.crop, round(image.width * scale)),
                                      max(self.crop, round(image.height * scale))), Image.BICUBIC)
            left = random.randint(0, image.width - self.crop)
            top = random.randint(0, image.height - self.crop)
            array = np.asarray(image.crop((left, top, left + self.crop, top + self.crop)), dtype=np.float32)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1
        return tensor.flip(-1) if random.random() < 0.5 else tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self.items)):
            path, label = self.items[(index + attempt) % len(self.items)]
            try:
                return self._load(path), label
            except (OSError, ValueError) as error:
                log.warning("skipping unreadable image %s (in %s): %s", path.name, path.parent, error)
        raise RuntimeError("no readable image in the folder")


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def pretrain(folder: str | Path, output: str | Path, settings: PretrainSettings | None = None,
             config: HFInnConfig | None = None, device: torch.device | str = "cpu",
             overwrite: bool = False) -> dict[str, float]:
    """Train extractor + classifier head with cross-entropy; returns {"first_loss", "last_loss", "steps"}."""
    settings = settings or PretrainSettings()
    config = config or HFInnConfig()
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output.name} already exists in {output.parent}; pass --overwrite to replace it")
    classes, items = scan_image_folder(folder)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    loader = torch.utils.data.DataLoader(
        ImageFolderCrops(items, settings.crop), batch_size=settings.batch_size, shuffle=True,
        num_workers=settings.workers, drop_last=len(items) > settings.batch_size,
        worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(settings.seed))
    net = HFInnClassifier(config, num_classes=len(classes)).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=settings.lr_decay_every, gamma=settings.lr_decay)
    log.info("train-inn: %d images in %d classes, %d epochs of %d steps", len(items), len(classes),
             settings.epochs, len(loader))
    step, first, last = 0, math.nan, math.nan
    for epoch in range(settings.epochs):
        for images, labels in loader:
            loss = F.cross_entropy(net(images.to(device)), labels.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"train-inn: non-finite loss at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            last = float(loss.detach())
            first = last if math.isnan(first) else first
            if step % settings.log_every == 0:
                log.info("train-inn: epoch %d step %d loss %.4f lr %.2e", epoch + 1, step, last,
                         schedule.get_last_lr()[0])
            if settings.max_steps is not None and step >= settings.max_steps:
                break
        save_hf_inn(output, net.extractor, net.head, classes, overwrite=True if epoch else overwrite)
        if settings.max_steps is not None and step >= settings.max_steps:
            break
    return {"first_loss": first, "last_loss": last, "steps": float(step)}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-inn", help="pretrain HF-Diff's high-frequency INN feature extractor")
    p.add_argument("folder", help="image folder with one sub-folder per class (ImageNet layout)")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.safetensors)")
    defaults = PretrainSettings()
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--lr-decay", type=float, default=defaults.lr_decay, help="learning-rate factor (default 0.95)")
    p.add_argument("--lr-decay-every", type=int, default=defaults.lr_decay_every, help="iterations per decay")
    p.add_argument("--crop", type=int, default=defaults.crop, help="random crop size in px (default 128)")
    p.add_argument("--channels", type=int, default=HFInnConfig.channels, help="INN channels N (default 64)")
    p.add_argument("--layers", type=int, default=HFInnConfig.num_layers, help="invertible layers K (default 3)")
    p.add_argument("--hidden", type=int, default=HFInnConfig.hidden_channels, help="phi/rho/eta hidden channels")
    p.add_argument("--clamp", type=float, default=HFInnConfig.clamp, help="soft clamp of the log-scale (0: off)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--workers", type=int, default=defaults.workers, help="data-loading processes")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many iterations")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = PretrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
                                lr_decay_every=args.lr_decay_every, crop=args.crop, seed=args.seed,
                                workers=args.workers, max_steps=args.max_steps)
    config = HFInnConfig(channels=args.channels, num_layers=args.layers, hidden_channels=args.hidden,
                         clamp=args.clamp)
    result = pretrain(args.folder, args.output, settings, config, device=device, overwrite=args.overwrite)
    print(f"{args.output}: {int(result['steps'])} steps, loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}")
    return 0
