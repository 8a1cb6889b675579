"""OneStep SR: one-step diffusion super-resolution nodes for ComfyUI.

This folder is both a ComfyUI custom-node folder (loaded under whatever folder name it was
installed as, so every import inside the pack is relative) and the `onestep_sr` Python package.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
