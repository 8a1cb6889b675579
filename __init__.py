"""OneStep SR: one-step diffusion super-resolution nodes for ComfyUI.

This folder is both a ComfyUI custom-node folder (loaded under whatever folder name it was
installed as, so every import inside the pack is relative) and the `onestep_sr` Python package.
"""

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"  # a small frontend extension: the pack's seed controls start as "fixed"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

# ComfyUI and `import onestep_sr` load this file as a package. pytest also imports it, as a plain
# file with no package, when the checkout's folder name is not an identifier (`git clone` gives
# `onestep-sr`); the relative import cannot work there and nothing needs the nodes.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
