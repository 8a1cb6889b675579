"""Prompts for the SD-based recipes: CLIP text embeddings padded to 77 tokens as the official code does,
computed once per distinct string and cached (a training set's prompts repeat); and per-image CLIP tags
(data.prompts "clip_tags"), cached per image."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("onestep_sr.training")


class PromptEncoder:
    """Text -> (1, 77, D) float32 embeddings on the training device, cached per string."""

    def __init__(self, text_encoder, tokenizer, device: torch.device) -> None:
        self.text_encoder, self.tokenizer, self.device = text_encoder, tokenizer, device
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for prompt in prompts:
            if prompt not in self.cache:
                length = int(self.text_encoder.config.max_position_embeddings)
                ids = self.tokenizer(prompt, max_length=length, padding="max_length", truncation=True,
                                     return_tensors="pt").input_ids
                self.cache[prompt] = self.text_encoder(ids.to(self.device))[0].float()
            out.append(self.cache[prompt])
        return torch.cat(out)


class ClipTagPrompts:
    """data.prompts "clip_tags": each GT image's tags from the pack's zero-shot CLIP tagger (the one
    `onestep-sr tags` and the CLIP Prompt Extract node use), computed once per image on the whole image
    and cached in memory and, when `cache_file` is given, in a JSON file keyed by path, size and
    modification time (so a resumed or repeated run does not tag again, and an edited image is)."""

    def __init__(self, clip_folder: str | Path, device: torch.device, cache_file: Path | None = None,
                 top_k: int | None = None, threshold: float | None = None, scorer=None) -> None:
        from ..models.clip_tags import DEFAULT_THRESHOLD, DEFAULT_TOP_K

        self.clip_folder, self.device, self.cache_file = clip_folder, device, cache_file
        self.top_k = DEFAULT_TOP_K if top_k is None else top_k
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self._scorer = scorer
        self.cache: dict[str, str] = {}
        if cache_file is not None and cache_file.is_file():
            try:
                self.cache = dict(json.loads(cache_file.read_text()))
            except (ValueError, TypeError):
                log.warning("ignoring the unreadable tag cache %s in %s", cache_file.name, cache_file.parent)

    @property
    def scorer(self):
        if self._scorer is None:
            from ..models.clip_tags import transformers_clip_encoders

            self._scorer = transformers_clip_encoders(self.clip_folder, device=self.device).scorer()
        return self._scorer

    @staticmethod
    def key(path: str | Path) -> str:
        stat = Path(path).stat()
        return f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}"

    def __call__(self, paths: list[str]) -> list[str]:
        from .data import read_rgb

        keys = [self.key(p) for p in paths]
        new = False
        for path, key in zip(paths, keys, strict=True):
            if key not in self.cache:
                image = read_rgb(Path(path))[None].to(self.device)
                tags = self.scorer.top_tags(image, self.top_k, self.threshold)[0]
                self.cache[key] = ", ".join(t.tag for t in tags)  # the tag string, as OSEDiff trains with
                new = True
        if new and self.cache_file is not None:
            temporary = self.cache_file.with_name(self.cache_file.name + ".partial")
            temporary.write_text(json.dumps(self.cache, indent=0))
            os.replace(temporary, self.cache_file)
        return [self.cache[k] for k in keys]
