"""Hero-SR training: the one-step generator with the DTSM choosing t per image, and OWMS.

Generator (the release's `HeroSR.forward`, src/hero_sr.py, with the selection of src/model.py):
  logits = DTSM(nearest_128(x_lq)),  y = hard Gumbel-softmax(logits, tau) (straight-through),
  t* = y . candidates  (float, into the UNet's timestep embedding),
  z = VAE-enc-LoRA(x_lq).sample() * s,  eps = UNet-LoRA(z, t*, c(" ")),
  z0 = (z - sqrt(1 - a) eps) / sqrt(a),  a = alpha-bar(t*),  image = VAE-dec(z0 / s).clamp(-1, 1)
- the modules (`models.dtsm`) and formula (`models.schedule.x0_from_eps`'s) the inference pipeline uses.
With `alpha_gradient`, a = y . alpha-bar[candidates] (same value; gradient to the logits through the
x0 formula too, see training/losses/gumbel_timestep.py).

Objective: MSE + LPIPS(VGG) + OWMS (text-domain perceptual alignment of SR against quality texts,
optionally the image's caption; image-domain semantic alignment of CLIP(SR) vs CLIP(GT)). One CLIP
pass of SR feeds both OWMS terms.

Layout: the names `hero_sr_model.pkl` stores and the release loads (UNet adapter "default" from
`unet.add_adapter`, VAE adapter "vae"); the target lists and ranks are S3Diff's (Hero-SR's key names
are S3Diff's; its own lists live only inside the unreleased-training pkl), conv_in trained in full.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..models.dtsm import TimeStepSelector, dtsm_input
from ..models.schedule import alphas_cumprod
from .adapters import train_lora_and_conv_in
from .losses.feature_nets import clip_image_embeds
from .losses.gumbel_timestep import (
    TimestepChoice,
    alphas_cumprod_at,
    choose_timesteps,
    gumbel_noise,
    one_step_x0,
)
from .osediff import StepRandom, per_sample_randn

HERO_UNET_ADAPTER = "default"  # diffusers `add_adapter` without a name, as the release does
HERO_VAE_ADAPTER = "vae"
# S3Diff's lists (s3diff_tile.py): suffix-matched UNet modules (conv_in not among them: trained in
# full) and a regex over the VAE encoder.
HERO_UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                     "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj"]
HERO_VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"


def add_hero_adapters(unet: nn.Module, vae: nn.Module, rank_unet: int, rank_vae: int,
                      unet_targets: list[str] | str = HERO_UNET_TARGETS,
                      vae_targets: list[str] | str = HERO_VAE_TARGETS) -> None:
    """Inject the adapters exactly as the release's loader builds them (PEFT default alpha 8)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank_unet, init_lora_weights="gaussian", target_modules=unet_targets))
    vae.add_adapter(LoraConfig(r=rank_vae, init_lora_weights="gaussian", target_modules=vae_targets),
                    adapter_name=HERO_VAE_ADAPTER)


def set_hero_trainable(unet: nn.Module, vae: nn.Module, dtsm: nn.Module, train_dtsm: bool = True) -> None:
    """UNet LoRA + conv_in, VAE-encoder LoRA, the DTSM; everything else frozen."""
    train_lora_and_conv_in(unet, vae, "conv_in.")
    dtsm.requires_grad_(train_dtsm)


class HeroSRTrainModel(nn.Module):
    """SD-Turbo UNet/VAE with the Hero-SR adapters, the DTSM, LPIPS and the frozen CLIP losses."""

    def __init__(self, unet: nn.Module, vae: nn.Module, dtsm: TimeStepSelector, lpips: nn.Module | None,
                 text_loss: nn.Module | None, image_loss: nn.Module | None, loss_weights: Mapping[str, float],
                 tau: float = 1.0, alpha_gradient: bool = True, content_weight: float = 0.0) -> None:
        super().__init__()
        self.unet, self.vae, self.dtsm = unet, vae, dtsm
        self.lpips, self.text_loss, self.image_loss = lpips, text_loss, image_loss
        self.weights = dict(loss_weights)
        self.tau, self.alpha_gradient, self.content_weight = float(tau), bool(alpha_gradient), float(content_weight)
        self.register_buffer("schedule", alphas_cumprod(), persistent=False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def clip(self) -> nn.Module | None:
        for loss in (self.text_loss, self.image_loss):
            if loss is not None:
                return loss.clip
        return None

    # -- the one-step generator -------------------------------------------------------------------
    def choose(self, x: torch.Tensor, gumbel: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> TimestepChoice:
        """The DTSM's straight-through choice of t* per image from the upscaled input in [-1, 1]."""
        parameter = next(self.dtsm.parameters())
        logits = self.dtsm(dtsm_input(x.to(parameter.dtype))).float()
        return choose_timesteps(logits, self.dtsm.candidates, tau=self.tau, generator=generator, noise=gumbel)

    def encode(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Scaled latent of x in [-1, 1]: the posterior mean, or mean + std * noise (`.sample()`)."""
        posterior = self.vae.encode(x).latent_dist
        latent = posterior.mean if noise is None else posterior.mean + posterior.std * noise.to(posterior.mean)
        return latent * self.scaling_factor

    def generate(self, x: torch.Tensor, prompt_embeds: torch.Tensor, noise: torch.Tensor | None = None,
                 gumbel: torch.Tensor | None = None, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, TimestepChoice]:
        """(image in [-1, 1], z0, the timestep choice)."""
        choice = self.choose(x, gumbel, generator)
        z = self.encode(x, noise)
        eps = self.unet(z, choice.timesteps, encoder_hidden_states=prompt_embeds.to(z.dtype)).sample
        alpha = alphas_cumprod_at(choice, self.schedule, self.dtsm.candidates, differentiable=self.alpha_gradient)
        z0 = one_step_x0(z, eps, alpha)
        image = self.vae.decode(z0.to(z.dtype) / self.scaling_factor).sample.clamp(-1, 1)
        return image, z0, choice

    # -- the objective ------------------------------------------------------------------------------
    def forward(self, lq: torch.Tensor, gt: torch.Tensor, embeds: torch.Tensor, random: StepRandom,
                content: torch.Tensor | None = None, content_mask: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """lq, gt in [-1, 1] at the same size; `content` (B, D) caption embeddings where `content_mask`."""
        latent_shape = (4, lq.shape[-2] // 8, lq.shape[-1] // 8)
        vae_noise = per_sample_randn(latent_shape, random.stream(0), lq.device)
        count = int(self.dtsm.time_list.numel())
        gumbel = torch.cat([gumbel_noise((1, count), torch.Generator().manual_seed(s)) for s in random.stream(1)])
        image, _, choice = self.generate(lq, embeds, vae_noise, gumbel)
        w = self.weights
        losses = {"mse": F.mse_loss(image.float(), gt.float()) * w["mse"]}
        if w.get("lpips") and self.lpips is not None:
            losses["lpips"] = self.lpips(image.float(), gt.float()).mean() * w["lpips"]
        if self.clip is not None:
            e_sr = clip_image_embeds(self.clip, image)
            if self.text_loss is not None:
                losses["text"] = self.text_loss.per_image(e_sr).mean() * w["text"]
                if content is not None and self.content_weight and content_mask is not None and content_mask.any():
                    cosine = F.cosine_similarity(e_sr, content.to(e_sr), dim=-1)
                    per_image = (1 - cosine) * content_mask.to(e_sr)
                    losses["content"] = per_image.sum() / lq.shape[0] * self.content_weight * w["text"]
            if self.image_loss is not None:
                losses["image"] = self.image_loss.from_embeds(e_sr, self._gt_embeds(gt)).mean() * w["image"]
        losses["total"] = sum(losses.values())
        losses["t"] = choice.timesteps.detach().float().mean()
        return losses

    def _gt_embeds(self, gt: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return clip_image_embeds(self.clip, gt)


def hero_parameters(model: HeroSRTrainModel) -> list[tuple[str, nn.Parameter]]:
    params = [(f"unet.{n}", p) for n, p in model.unet.named_parameters() if p.requires_grad]
    params += [(f"vae.{n}", p) for n, p in model.vae.named_parameters() if p.requires_grad]
    params += [(f"dtsm.{n}", p) for n, p in model.dtsm.named_parameters() if p.requires_grad]
    return params


def hero_checkpoint(model: HeroSRTrainModel, rank_unet: int, rank_vae: int,
                    unet_targets: list[str] | str = HERO_UNET_TARGETS,
                    vae_targets: list[str] | str = HERO_VAE_TARGETS) -> dict:
    """The `hero_sr_model.pkl` dict the release's loader reads, float32 on the CPU: UNet entries with
    "lora" or conv_in, VAE LoRA entries, the DTSM state dict (incl. time_list and BN statistics)."""
    def copy(state: Mapping[str, torch.Tensor], keep) -> dict[str, torch.Tensor]:
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in state.items() if keep(k)}

    return {
        "rank_unet": int(rank_unet),
        "unet_lora_target_modules": list(unet_targets) if not isinstance(unet_targets, str) else unet_targets,
        "state_dict_unet": copy(model.unet.state_dict(), lambda k: "lora" in k or k.startswith("conv_in.")),
        "rank_vae": int(rank_vae),
        "vae_lora_target_modules": list(vae_targets) if not isinstance(vae_targets, str) else vae_targets,
        "state_dict_vae": copy(model.vae.state_dict(), lambda k: "lora" in k),
        "state_dict_time_adaptive": copy(model.dtsm.state_dict(), lambda k: True),
    }
