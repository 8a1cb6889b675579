"""The one-step super-resolution pipeline and method descriptions. No ComfyUI imports."""
