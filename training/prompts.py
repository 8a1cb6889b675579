"""Prompt embeddings for the SD-based recipes: CLIP text embeddings padded to 77 tokens as the official
code does, computed once per distinct string and cached (a training set's prompts repeat)."""

from __future__ import annotations

import torch


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
