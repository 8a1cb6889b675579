"""Pure tensor code: model construction, checkpoint formats, LoRA, tiled VAE. No ComfyUI imports."""
