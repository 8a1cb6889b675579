"""S3Diff training: the one-step generator with degradation-guided LoRA, and its objective.

The generator is built from the same modules the inference runs (models/modulated_lora.py wrappers,
models/s3diff_weights.py `DegradationModulator`, models/degradation_estimator.py de_net), freshly
initialised the way src/s3diff.py initialises them (METHODS.md section 2):
  LoRA A ~ N(0, 1/r), B = 0 (peft "gaussian"), UNet rank 32 on the suffix list, VAE-encoder rank 16
  on the regex, scale 8/r; conv_in fully trained; w ~ N(0, 1) fixed; the six MLPs basicsr
  `default_init_weights(scale=1e-5)` (kaiming-normal x 1e-5, bias 0); the block tables N(0, 1).
Forward (`S3Diff.forward`): M_unet, M_vae = modulator(de_net(LR)); z = VAE-enc(x).sample() * s;
eps = UNet(z, 999, c) (one pass, no CFG in training); z0 = x0(z, eps); image = VAE-dec(z0 / s).clamp(-1, 1).

Objective (src/train_s3diff.py), per micro step, in the official order:
  1. reconstruction: with probability p = negative_sample_prob per sample the prompt is the negative
     prompt and the target is the degraded input itself; loss = 2 MSE + 5 LPIPS(VGG) -> generator step;
  2. adversarial: a second forward with the positive prompt; loss = 0.5 * multilevel_sigmoid_s(D(x), 0.8)
     -> generator step (D's heads get no gradient from it: see training/losses/dino_discriminator.py);
  3. D on the real GT (target 0.8) x 0.5 -> discriminator step;
  4. D on the detached output of pass 2 (target 0) x 0.5 -> discriminator step.
Randomness (VAE samples, the negative-sample draw, DiffAugment) is drawn per sample from generators
seeded by (run seed, micro step, sample id), as in training/osediff.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.degradation_estimator import DegradationEstimator
from ..models.lora import PEFT_DEFAULT_ALPHA, LoRAPair
from ..models.modulated_lora import (
    inject_modulated_lora,
    modulated_lora_names,
    peft_targets,
    set_modulation,
    unet_block_index,
    vae_block_index,
)
from ..models.s3diff_weights import UNET_ADAPTER, VAE_ADAPTER, DegradationModulator
from ..models.schedule import alphas_cumprod, x0_from_eps
from .losses.dino_discriminator import (
    discriminator_fake_loss,
    discriminator_real_loss,
    generator_adversarial_loss,
)
from .osediff import StepRandom, per_sample_randn

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj"]
VAE_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"
GENERATOR_TIMESTEP = 999
MLP_INIT_SCALE = 1e-5
# StepRandom streams
RECON_NOISE, NEGATIVE_DRAW, GAN_NOISE, AUG_GENERATOR, AUG_REAL, AUG_FAKE = range(6)


# -- building the generator ------------------------------------------------------------------------------------
def _gaussian_pair(layer: nn.Module, rank: int, generator: torch.Generator) -> LoRAPair:
    """peft's init_lora_weights="gaussian": A ~ N(0, 1/r), B = 0."""
    if isinstance(layer, nn.Linear):
        down_shape, up_shape = (rank, layer.in_features), (layer.out_features, rank)
    else:
        down_shape, up_shape = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return LoRAPair(down=torch.randn(down_shape, generator=generator) / rank, up=torch.zeros(up_shape))


def add_s3diff_lora(unet: nn.Module, vae: nn.Module, rank_unet: int, rank_vae: int, seed: int) -> None:
    """Wrap every layer the official target list / regex selects in a modulated LoRA (fresh weights)."""
    generator = torch.Generator().manual_seed(seed)
    for model, targets, rank, block_index, what in ((unet, UNET_TARGETS, rank_unet, unet_block_index, "UNet"),
                                                     (vae, VAE_TARGETS, rank_vae, vae_block_index, "VAE")):
        pairs = {name: _gaussian_pair(model.get_submodule(name), rank, generator)
                 for name in peft_targets(model, targets)}
        inject_modulated_lora(model, pairs, rank, PEFT_DEFAULT_ALPHA, block_index, what)


def new_modulator(rank_unet: int, rank_vae: int, seed: int) -> DegradationModulator:
    """The degradation MLPs and block tables as src/s3diff.py initialises them."""
    generator = torch.Generator().manual_seed(seed)
    modulator = DegradationModulator(rank_unet, rank_vae)
    with torch.no_grad():
        modulator.w.copy_(torch.randn(modulator.w.shape, generator=generator))
        for name in ("vae_de_mlp", "unet_de_mlp", "vae_block_mlp", "unet_block_mlp", "vae_fuse_mlp", "unet_fuse_mlp"):
            for layer in getattr(modulator, name).modules():
                if isinstance(layer, nn.Linear):  # kaiming_normal_(fan_in, leaky_relu a=0) * scale, bias 0
                    std = math.sqrt(2.0 / layer.in_features)
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std * MLP_INIT_SCALE)
                    layer.bias.zero_()
        for table in (modulator.vae_block_embeddings, modulator.unet_block_embeddings):
            table.weight.copy_(torch.randn(table.weight.shape, generator=generator))
    return modulator


def set_s3diff_trainable(unet: nn.Module, vae: nn.Module, modulator: nn.Module) -> None:
    """The published trainable set: every LoRA A/B, UNet conv_in, the MLPs and block tables."""
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    for model in (unet, vae):
        for name in modulated_lora_names(model):
            module = model.get_submodule(name)
            module.lora_down.requires_grad_(True)
            module.lora_up.requires_grad_(True)
    unet.conv_in.requires_grad_(True)
    modulator.requires_grad_(True)  # w is a buffer: fixed, as in the official code


# -- the published layout ----------------------------------------------------------------------------------------
def published_key(name: str) -> tuple[str, ...] | None:
    """Where a trainable parameter of `S3DiffTrainModel` lives in s3diff.pkl (a path of dict keys)."""
    part, _, rest = name.partition(".")
    if part in ("unet", "vae"):
        adapter = UNET_ADAPTER if part == "unet" else VAE_ADAPTER
        for ours, theirs in ((".lora_down.weight", "lora_A"), (".lora_up.weight", "lora_B")):
            if rest.endswith(ours):
                return (f"state_dict_{part}", f"{rest[: -len(ours)]}.{theirs}.{adapter}.weight")
        if part == "unet" and rest in ("conv_in.weight", "conv_in.bias"):
            return ("state_dict_unet", rest)
        return None
    if part == "modulator":
        module, _, key = rest.partition(".")
        if module.endswith("_block_embeddings"):
            return ("state_embeddings", f"state_dict_{module.split('_')[0]}_block", key)
        return (f"state_dict_{module}", key)
    return None


def generator_parameters(model: S3DiffTrainModel) -> list[tuple[str, nn.Parameter]]:
    return [(f"{part}.{n}", p) for part in ("unet", "vae", "modulator")
            for n, p in getattr(model, part).named_parameters() if p.requires_grad]


def discriminator_parameters(model: S3DiffTrainModel) -> list[tuple[str, nn.Parameter]]:
    if model.discriminator is None:
        return []
    return [(f"discriminator.{n}", p) for n, p in model.discriminator.named_parameters() if p.requires_grad]


def s3diff_checkpoint(model: S3DiffTrainModel) -> dict:
    """The dict `S3Diff.save_model` writes (published s3diff.pkl layout), float32 on the CPU."""
    data: dict = {
        "unet_lora_target_modules": list(UNET_TARGETS),
        "vae_lora_target_modules": VAE_TARGETS,
        "rank_unet": int(model.modulator.rank_unet),
        "rank_vae": int(model.modulator.rank_vae),
        "state_dict_unet": {}, "state_dict_vae": {},
        **{f"state_dict_{m}_{p}": {} for m in ("vae", "unet") for p in ("de_mlp", "block_mlp", "fuse_mlp")},
        "state_embeddings": {"state_dict_vae_block": {}, "state_dict_unet_block": {}},
    }
    for name, param in generator_parameters(model):
        *path, key = published_key(name)
        target = data
        for step in path:
            target = target[step]
        target[key] = param.detach().float().cpu().clone()
    data["w"] = nn.Parameter(model.modulator.w.detach().float().cpu().clone(), requires_grad=False)
    return data


def load_published(model: S3DiffTrainModel, data: dict, filename: str) -> None:
    """Copy a published s3diff.pkl into the model's trainable weights (fine-tuning), checking coverage."""
    from ..models.weights_io import WeightsFileError

    missing = []
    with torch.no_grad():
        for name, param in generator_parameters(model):
            value = data
            for step in published_key(name):
                value = value.get(step) if isinstance(value, dict) else None
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                missing.append(name)
                continue
            param.copy_(value)
        w = data.get("w")
        if not isinstance(w, torch.Tensor) or w.shape != model.modulator.w.shape:
            missing.append("w")
        else:
            model.modulator.w.copy_(w)
    if missing:
        raise WeightsFileError(f"{filename} does not fit this S3Diff model ({len(missing)} weight(s) missing or "
                               f"of another shape, e.g. {missing[0]}): different ranks or base?")


# -- the model ---------------------------------------------------------------------------------------------------
class S3DiffTrainModel(nn.Module):
    """Generator (UNet + VAE with modulated LoRA, modulator), frozen de_net, LPIPS and the discriminator."""

    def __init__(self, unet: nn.Module, vae: nn.Module, modulator: DegradationModulator,
                 de_net: DegradationEstimator | None, lpips: nn.Module | None, discriminator: nn.Module | None,
                 loss_weights: dict[str, float]) -> None:
        super().__init__()
        self.unet, self.vae, self.modulator = unet, vae, modulator
        self.de_net = de_net.eval().requires_grad_(False) if de_net is not None else None
        self.lpips = lpips
        self.discriminator = discriminator
        self.weights = dict(loss_weights)
        self.register_buffer("schedule", alphas_cumprod(), persistent=False)

    def train(self, mode: bool = True) -> S3DiffTrainModel:
        super().train(mode)
        if self.de_net is not None:
            self.de_net.eval()
        return self

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def degradation_scores(self, lr01: torch.Tensor) -> torch.Tensor:
        """(B, 2) de_net scores of the original-size LR in [0, 1]."""
        if self.de_net is None:
            raise RuntimeError("S3Diff training needs the degradation estimator (model.de_net)")
        return self.de_net(lr01.float()).float()

    def generate(self, x: torch.Tensor, prompt_embeds: torch.Tensor, scores: torch.Tensor,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """The one-step forward on x in [-1, 1]: the image in [-1, 1]."""
        unet_m, vae_m = self.modulator(scores)
        set_modulation(self.unet, unet_m, keep_graph=True)
        set_modulation(self.vae, vae_m, keep_graph=True)
        posterior = self.vae.encode(x).latent_dist
        latent = posterior.mean if noise is None else posterior.mean + posterior.std * noise.to(posterior.mean)
        z = latent * self.scaling_factor
        t = torch.full((x.shape[0],), GENERATOR_TIMESTEP, device=x.device, dtype=torch.long)
        eps = self.unet(z, t, encoder_hidden_states=prompt_embeds.to(z.dtype)).sample
        z0 = x0_from_eps(z, eps, t, self.schedule)
        return self.vae.decode(z0.to(z.dtype) / self.scaling_factor).sample.clamp(-1, 1)

    def forward(self, mode: str, **inputs) -> dict[str, torch.Tensor]:
        if mode == "reconstruction":
            return self.reconstruction_losses(**inputs)
        if mode == "adversarial":
            return self.adversarial_loss(**inputs)
        if mode == "disc_real":
            return {"d_real": discriminator_real_loss(self.discriminator, inputs["gt"], inputs["augment"])
                    * self.weights["gan"]}
        if mode == "disc_fake":
            return {"d_fake": discriminator_fake_loss(self.discriminator, inputs["fake"], inputs["augment"])
                    * self.weights["gan"]}
        raise ValueError(f"unknown mode {mode!r}")

    def _latent_noise(self, x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return per_sample_randn((4, x.shape[-2] // 8, x.shape[-1] // 8), seeds, x.device)

    def reconstruction_losses(self, lq: torch.Tensor, target: torch.Tensor, embeds: torch.Tensor,
                              scores: torch.Tensor, random: StepRandom) -> dict[str, torch.Tensor]:
        image = self.generate(lq, embeds, scores, self._latent_noise(lq, random.stream(RECON_NOISE)))
        losses = {"mse": F.mse_loss(image.float(), target.float()) * self.weights["mse"]}
        if self.weights.get("lpips") and self.lpips is not None:
            losses["lpips"] = self.lpips(image.float(), target.float()).mean() * self.weights["lpips"]
        losses["rec"] = sum(losses.values())
        return losses

    def adversarial_loss(self, lq: torch.Tensor, embeds: torch.Tensor, scores: torch.Tensor,
                         random: StepRandom) -> dict[str, torch.Tensor]:
        image = self.generate(lq, embeds, scores, self._latent_noise(lq, random.stream(GAN_NOISE)))
        loss = generator_adversarial_loss(self.discriminator, image, augment_generators(random, AUG_GENERATOR))
        return {"gan_g": loss * self.weights["gan"], "image": image.detach()}


def augment_generators(random: StepRandom, stream: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in random.stream(stream)]


def negative_mask(random: StepRandom, probability: float, device: torch.device) -> torch.Tensor:
    """(B,) bool: which samples become online negative samples this step (u < p, u ~ U[0, 1) per sample)."""
    draws = [float(torch.rand((), generator=torch.Generator().manual_seed(s), dtype=torch.float64))
             for s in random.stream(NEGATIVE_DRAW)]
    return torch.tensor([u < probability for u in draws], device=device)


def mix(mask: torch.Tensor, where_true: torch.Tensor, where_false: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, *([1] * (where_true.dim() - 1))), where_true, where_false)
