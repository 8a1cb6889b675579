"""The ResShift family (ResShift, SinSR, HF-Diff): Swin UNet denoiser in a VQ-f4 latent space,
residual-shifting diffusion, official sampler and chopping. No ComfyUI imports."""
