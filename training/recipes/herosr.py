"""The Hero-SR recipe: DTSM (straight-through Gumbel) trained jointly with the SD-Turbo LoRA generator
under MSE + LPIPS + OWMS; saves `hero_sr_model.pkl` in the release's layout.

The model and the objective's math live in `training/herosr.py`; this module wires them to the loop:
base, CLIP and LPIPS loading, one "generator" phase (LoRA, conv_in and the DTSM together), the
published dict. The release's training code is unpublished: every choice is in docs/training.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import buffers_state, load_buffers
from ..config import TrainConfig
from ..prompts import PromptEncoder
from .base import Phase, PhaseLoss, Recipe, RecipeError, StepInputs
from .osediff import load_lpips


def load_owms(config: TrainConfig, device: torch.device):
    """(text loss, image loss, CLIP tokenizer) from `herosr.clip`, or Nones when both weights are 0."""
    from ..losses.feature_nets import FeatureNetworkError, load_clip
    from ..losses.owms import DEFAULT_QUALITY_PAIRS, ImageSemanticAlignmentLoss, TextPerceptualAlignmentLoss

    h = config.herosr
    if not (h.text_weight or h.image_weight):
        return None, None, None
    try:
        clip, tokenizer = load_clip(h.clip, device=device)
    except FeatureNetworkError as error:
        raise RecipeError(f"herosr.clip: {error}") from None
    text = None
    if h.text_weight:
        pairs = [tuple(p) for p in h.quality_pairs] or list(DEFAULT_QUALITY_PAIRS)
        text = TextPerceptualAlignmentLoss.from_texts(clip, tokenizer, pairs, mode=h.text_mode,
                                                      temperature=h.clip_temperature or None)
    image = ImageSemanticAlignmentLoss(clip) if h.image_weight else None
    return text, image, tokenizer


class HeroSRRecipe(Recipe):
    method = "hero_sr"
    published_file = "hero_sr_model.pkl"
    export_method = "hero_sr"
    progress_keys = ("total", "text", "image", "t")

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        from ...models.base_models import load_base
        from ...models.dtsm import TimeStepSelector
        from ..herosr import (
            HERO_UNET_TARGETS,
            HERO_VAE_TARGETS,
            HeroSRTrainModel,
            add_hero_adapters,
            hero_parameters,
            set_hero_trainable,
        )

        super().__init__(config, device)
        m, h = config.model, config.herosr
        base = load_base(m.base, m.tokenizer)
        self.prompts = PromptEncoder(base.text_encoder.to(device).float(), base.tokenizer, device)
        lpips = load_lpips(config, device)
        text, image, self.clip_tokenizer = load_owms(config, device)
        self.layout = {"rank_unet": m.rank_unet, "rank_vae": m.rank_vae,
                       "unet_targets": HERO_UNET_TARGETS, "vae_targets": HERO_VAE_TARGETS}
        published = self.read_published(m.init_weights) if m.init_weights else None
        if published is not None:  # fine-tuning: the file's own ranks and target lists
            self.layout = {"rank_unet": int(published["rank_unet"]), "rank_vae": int(published["rank_vae"]),
                           "unet_targets": published["unet_lora_target_modules"],
                           "vae_targets": published["vae_lora_target_modules"]}
        torch.manual_seed(config.seed)  # LoRA A ("gaussian") and the DTSM draw from the global RNG
        unet, vae, dtsm = base.unet, base.vae, TimeStepSelector()
        add_hero_adapters(unet, vae, self.layout["rank_unet"], self.layout["rank_vae"],
                          self.layout["unet_targets"], self.layout["vae_targets"])
        if published is not None:
            self.load_published(unet, vae, dtsm, published, Path(m.init_weights).name)
        set_hero_trainable(unet, vae, dtsm, h.train_dtsm)
        if not h.train_dtsm:
            dtsm.eval()
        if m.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        weights = {"mse": config.loss.mse, "lpips": config.loss.lpips, "text": h.text_weight,
                   "image": h.image_weight}
        self.model = HeroSRTrainModel(unet, vae, dtsm, lpips, text, image, weights, tau=h.gumbel_tau,
                                      alpha_gradient=h.alpha_gradient, content_weight=h.content_weight)
        self.model.to(device)
        self.phases = [Phase("generator", hero_parameters(self.model), config.optim.lr)]
        self.content_cache: dict[str, torch.Tensor] = {}

    @staticmethod
    def read_published(path: str) -> dict:
        from ...models.method_weights import detect_method
        from ...models.weights_io import read_weights_file

        data = read_weights_file(Path(path))
        if detect_method(data, Path(path).name) != "hero_sr":
            raise RecipeError(f"model.init_weights {Path(path).name} is not Hero-SR weights (hero_sr_model.pkl)")
        return data

    @staticmethod
    def load_published(unet: nn.Module, vae: nn.Module, dtsm: nn.Module, data: dict, name: str) -> None:
        from ...models.dtsm import load_dtsm_state

        for module, key in ((unet, "state_dict_unet"), (vae, "state_dict_vae")):
            result = module.load_state_dict(data[key], strict=False)
            if result.unexpected_keys:
                raise RecipeError(f"{name}: {key} has entries the model lacks, e.g. {result.unexpected_keys[0]}")
        dtsm.load_state_dict(load_dtsm_state(data["state_dict_time_adaptive"]).state_dict())

    def content(self, captions: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """CLIP text embeddings of the images' captions (cached) and which images have one."""
        if self.model.text_loss is None or not self.config.herosr.content_weight or not any(captions):
            return None, None
        from ..losses.feature_nets import clip_text_embeds

        missing = sorted({c for c in captions if c and c not in self.content_cache})
        if missing:
            for caption, embed in zip(missing, clip_text_embeds(self.model.clip, self.clip_tokenizer, missing),
                                      strict=True):
                self.content_cache[caption] = embed
        dim = next(iter(self.content_cache.values())).shape[-1]
        embeds = torch.stack([self.content_cache[c] if c else torch.zeros(dim, device=self.device)
                              for c in captions])
        mask = torch.tensor([bool(c) for c in captions], device=self.device)
        return embeds, mask

    def micro_step(self, model: nn.Module, unwrapped: nn.Module, inputs: StepInputs) -> Iterator[PhaseLoss]:
        from ..osediff import StepRandom

        batch = inputs.lq.shape[0]
        embeds = self.prompts([self.config.herosr.prompt]).expand(batch, -1, -1)
        content, mask = self.content(list(inputs.batch["prompt"]))
        random = StepRandom.make(inputs.seed, inputs.micro_step, inputs.batch["id"].tolist())
        out = model(lq=inputs.lq, gt=inputs.gt, embeds=embeds, random=random, content=content, content_mask=mask)
        yield PhaseLoss("generator", out["total"], out)

    def extra_state(self) -> dict:
        """The DTSM's BatchNorm running statistics: buffers, which the loop's trainable state lacks."""
        return {"dtsm_buffers": buffers_state(self.model.dtsm)}

    def load_extra_state(self, state: dict) -> None:
        buffers = state.get("dtsm_buffers")
        if not buffers:
            raise RecipeError("the checkpoint lacks the DTSM's BatchNorm statistics (dtsm_buffers); "
                              "it was not written by the hero_sr recipe")
        load_buffers(self.model.dtsm, buffers)

    def published(self, unwrapped: nn.Module) -> dict:
        from ..herosr import hero_checkpoint

        return hero_checkpoint(unwrapped, self.layout["rank_unet"], self.layout["rank_vae"],
                               self.layout["unet_targets"], self.layout["vae_targets"])
