"""OSEDiff training: the one-step generator and its objective (MSE + LPIPS x2 + VSD), on one base UNet.

Generator (as `OSEDiff_gen.forward`): z = VAE-enc-LoRA(x_lq).sample() * s; eps = UNet-LoRA(z, 999, c);
z0 = (z - sqrt(1 - a) eps) / sqrt(a); image = VAE-dec(z0 / s).clamp(-1, 1) - the same formula
(models/schedule.py `x0_from_eps`) and modules the inference pipeline uses.

VSD (as `OSEDiff_reg.distribution_matching_loss`), all without gradient except through z0:
  t ~ U[t_min, t_max), z_t = sqrt(a_t) z0 + sqrt(1 - a_t) n
  x0_fake = x0(z_t, eps_fake(z_t, t, c)),  x0_real = x0(z_t, eps_neg + w (eps_pos - eps_neg))
  grad = (x0_fake - x0_real) / mean|z0 - x0_real| (per sample),  loss = MSE(z0, sg(z0 - grad))
so d loss / d z0 = 2 grad / numel(z0). The fake score is trained by eps-MSE on sg(z0) noised at
t ~ U[0, 1000) (`diff_loss`).

Randomness (VAE sample, t, noise) is drawn per sample from generators seeded by (run seed, step,
sample id), so a batch split over processes gets the same numbers as one process with the whole batch,
and a resumed run the same numbers as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.schedule import alphas_cumprod, x0_from_eps
from .adapters import FAKE, GENERATOR, VAE_ADAPTER, activate, adapter_of

GENERATOR_TIMESTEP = 999


def sample_seed(seed: int, step: int, sample_id: int, stream: int) -> int:
    """A 62-bit seed for one random stream of one sample at one step."""
    value = (seed * 1_000_003 + step) * 1_000_033 + sample_id
    value = value * 16 + stream
    return value % (2**62)


def per_sample_randn(shape: tuple[int, ...], seeds: list[int], device: torch.device) -> torch.Tensor:
    parts = []
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        parts.append(torch.randn(shape, generator=generator))
    return torch.stack(parts).to(device)


def per_sample_randint(low: int, high: int, seeds: list[int], device: torch.device) -> torch.Tensor:
    values = [int(torch.randint(low, high, (), generator=torch.Generator().manual_seed(s))) for s in seeds]
    return torch.tensor(values, device=device, dtype=torch.long)


@dataclass
class StepRandom:
    """Per-sample random numbers of one training step (see module docstring)."""

    seeds: list[int]

    @classmethod
    def make(cls, seed: int, step: int, sample_ids: list[int]) -> StepRandom:
        return cls(seeds=[sample_seed(seed, step, int(i), 0) for i in sample_ids])

    def stream(self, k: int) -> list[int]:
        return [(s + 7919 * k) % (2**62) for s in self.seeds]


class OSEDiffTrainModel(nn.Module):
    """UNet (generator + fake adapters), VAE (encoder LoRA) and the frozen text encoder."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module | None, lpips: nn.Module | None,
                 loss_weights: dict[str, float], vsd_guidance: float = 7.5, vsd_t_range: tuple[int, int] = (20, 980)):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.lpips = lpips
        self.weights = dict(loss_weights)
        self.vsd_guidance = float(vsd_guidance)
        self.vsd_t_range = vsd_t_range
        self.register_buffer("schedule", alphas_cumprod(), persistent=False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    # -- the one-step generator -------------------------------------------------------------------
    def encode(self, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """Scaled latent of x in [-1, 1]: the posterior mean, or mean + std * noise (`.sample()`)."""
        activate(self.vae, (VAE_ADAPTER,))
        posterior = self.vae.encode(x).latent_dist
        latent = posterior.mean if noise is None else posterior.mean + posterior.std * noise.to(posterior.mean)
        return latent * self.scaling_factor

    def generate(self, x: torch.Tensor, prompt_embeds: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The one-step forward: (image in [-1, 1], z0 scaled latent)."""
        z = self.encode(x, noise)
        activate(self.unet, GENERATOR)
        t = torch.full((x.shape[0],), GENERATOR_TIMESTEP, device=x.device, dtype=torch.long)
        eps = self.unet(z, t, encoder_hidden_states=prompt_embeds.to(z.dtype)).sample
        z0 = x0_from_eps(z, eps, t, self.schedule)
        image = self.vae.decode(z0.to(z.dtype) / self.scaling_factor).sample.clamp(-1, 1)
        return image, z0

    # -- score networks ------------------------------------------------------------------------------
    def _x0(self, adapters: tuple[str, ...] | None, z_t: torch.Tensor, t: torch.Tensor,
            embeds: torch.Tensor) -> torch.Tensor:
        activate(self.unet, adapters)
        eps = self.unet(z_t, t, encoder_hidden_states=embeds.to(z_t.dtype)).sample
        return x0_from_eps(z_t, eps, t, self.schedule)

    def noised(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.schedule[t].to(z0).view(-1, 1, 1, 1)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def vsd_gradient(self, z0: torch.Tensor, embeds: torch.Tensor, negative: torch.Tensor, t: torch.Tensor,
                     noise: torch.Tensor) -> torch.Tensor:
        """(x0_fake - x0_real) / mean|z0 - x0_real|, computed without gradient."""
        with torch.no_grad():
            z0 = z0.detach()
            z_t = self.noised(z0, t, noise)
            x0_fake = self._x0(FAKE, z_t, t, embeds)
            real = self._x0(None, torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([negative, embeds]))
            # CFG on x0 equals CFG on eps: x0 is affine in eps with the same coefficients per sample.
            real_neg, real_pos = real.chunk(2)
            x0_real = real_neg + self.vsd_guidance * (real_pos - real_neg)
            weight = (z0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
            return (x0_fake - x0_real) / weight

    def vsd_loss(self, z0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(z0.float(), (z0 - grad).detach().float())

    def fake_loss(self, z0: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        activate(self.unet, FAKE)
        z_t = self.noised(z0.detach(), t, noise)
        eps = self.unet(z_t, t, encoder_hidden_states=embeds.detach().to(z_t.dtype)).sample
        return F.mse_loss(eps.float(), noise.float())

    # -- one DDP-friendly entry point -------------------------------------------------------------------
    def forward(self, mode: str, **inputs) -> dict[str, torch.Tensor]:
        if mode == "generator":
            return self.generator_losses(**inputs)
        if mode == "fake":
            return {"fake": self.fake_loss(**inputs)}
        raise ValueError(f"unknown mode {mode!r}")

    def generator_losses(self, lq: torch.Tensor, gt: torch.Tensor, embeds: torch.Tensor, negative: torch.Tensor,
                         random: StepRandom) -> dict[str, torch.Tensor]:
        """lq, gt in [-1, 1] at the same size. Returns the weighted losses and z0 for the fake step."""
        latent_shape = (4, lq.shape[-2] // 8, lq.shape[-1] // 8)
        vae_noise = per_sample_randn(latent_shape, random.stream(0), lq.device)
        image, z0 = self.generate(lq, embeds, vae_noise)
        losses = {"mse": F.mse_loss(image.float(), gt.float()) * self.weights["mse"]}
        if self.weights.get("lpips") and self.lpips is not None:
            losses["lpips"] = self.lpips(image.float(), gt.float()).mean() * self.weights["lpips"]
        losses.update(self.extra_losses(image, gt, random))
        if self.weights.get("vsd"):
            t = per_sample_randint(*self.vsd_t_range, random.stream(1), lq.device)
            noise = per_sample_randn(tuple(z0.shape[1:]), random.stream(2), lq.device).to(z0)
            grad = self.vsd_gradient(z0, embeds, negative, t, noise)
            losses["vsd"] = self.vsd_loss(z0, grad) * self.weights["vsd"]
            # Gradient checkpointing re-runs the generator's UNet blocks during backward with whatever
            # adapters are active then: switch back from the score passes before returning.
            activate(self.unet, GENERATOR)
        losses["total"] = sum(v for k, v in losses.items())
        losses["z0"] = z0.detach()
        losses["image"] = image.detach()
        return losses

    def extra_losses(self, image: torch.Tensor, gt: torch.Tensor, random: StepRandom) -> dict[str, torch.Tensor]:
        """More weighted terms on the generator's image (recipes built on this student, e.g. VPD-SR)."""
        return {}

    def fake_inputs(self, z0: torch.Tensor, embeds: torch.Tensor, random: StepRandom) -> dict[str, torch.Tensor]:
        t = per_sample_randint(0, 1000, random.stream(3), z0.device)
        noise = per_sample_randn(tuple(z0.shape[1:]), random.stream(4), z0.device).to(z0)
        return {"z0": z0, "embeds": embeds, "t": t, "noise": noise}


def generator_parameters(model: OSEDiffTrainModel) -> list[tuple[str, nn.Parameter]]:
    """The generator's trainable parameters (UNet generator LoRA + conv_in, VAE LoRA), with names."""
    params = [(f"unet.{n}", p) for n, p in model.unet.named_parameters()
              if p.requires_grad and adapter_of(n) not in FAKE]
    params += [(f"vae.{n}", p) for n, p in model.vae.named_parameters() if p.requires_grad]
    return params


def fake_parameters(model: OSEDiffTrainModel) -> list[tuple[str, nn.Parameter]]:
    return [(f"unet.{n}", p) for n, p in model.unet.named_parameters() if p.requires_grad and adapter_of(n) in FAKE]


def osediff_checkpoint(model: OSEDiffTrainModel, lists: dict[str, list[str]], rank: int) -> dict:
    """The dict `OSEDiff_gen.save_model` writes (published osediff.pkl layout), float32 on the CPU."""
    unet_state = {k: v.detach().float().cpu().clone() for k, v in model.unet.state_dict().items()
                  if ("lora" in k and adapter_of(k) in GENERATOR) or k.startswith("conv_in.base_layer.")}
    vae_state = {k: v.detach().float().cpu().clone() for k, v in model.vae.state_dict().items() if "lora" in k}
    return {
        "unet_lora_encoder_modules": list(lists["encoder"]),
        "unet_lora_decoder_modules": list(lists["decoder"]),
        "unet_lora_others_modules": list(lists["others"]),
        "vae_lora_encoder_modules": list(lists["vae"]),
        "rank_unet": int(rank),
        "rank_vae": int(rank),
        "state_dict_unet": unet_state,
        "state_dict_vae": vae_state,
    }
